"""The Q&A document's questions, in its order, mapped to the lesson cells that answer them (lesson 11).

The course exists for people preparing inference interviews from a Chinese Q&A document (P0: Q1-Q5, P1: Q6-Q9,
P2: Q10-Q12, each with its follow-ups, and the questions a candidate asks back). ``DOCUMENT`` lists each question
with the cells that answer it, named by **notebook and cell id**: ``crosswalk_rows`` looks every id up in the
notebook file, so a renamed or deleted cell makes the table (and ``tests/test_crosswalk.py``) fail instead of
pointing at the wrong place. Each entry carries a short 中文 answer summary; a summary states no measured number of
its own: the numbers are in the cells it names, or filled in from ``values`` (computed in the notebook) through
``{placeholders}``. ``gap`` says what the course does not measure (vendor claims, what is not built).
"""
from __future__ import annotations

import html
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from course_lib.review.review import NOTEBOOKS_DIR, html_table


@dataclass(frozen=True)
class DocQuestion:
    key: str                                # "Q1", "Q1 追问", "反问 1" (a question the candidate asks back)
    question: str                           # the document's question, as it asks it
    cells: tuple[tuple[str, str], ...]      # (lesson "04", cell id), in reading order
    summary: str                            # 中文 answer summary; ``{name}`` placeholders come from ``values``
    gap: str = ""                           # what the course does not measure or build


DOCUMENT: tuple[DocQuestion, ...] = (
    DocQuestion("Q1", "KV Cache为什么能加速推理？",
                (("01", "c03"), ("01", "c14"), ("01", "c18"), ("11", "c08")),
                "因果掩码下，过去 token 的 K、V 之后不会再变：只为新 token 计算一次并缓存，每步注意力的计算量从 O(t²) "
                "降到 "
                "O(t)，投影和 MLP 从 t 个 token 降到 1 个。有无缓存生成的 token 完全相同（第 01 课逐个比对）。"),
    DocQuestion("Q1 追问", "KV Cache有多大？",
                (("01", "c28"), ("01", "c34"), ("11", "c32")),
                "每个 token 占 2（K、V）× 层数 × KV 头数 × 头维度 × 字节数。LLaMA-2-13B（40 层、40 个 KV 头、D=128）在"
                " 2048 "
                "token、fp16 下为 {kv13_gb:.2f} GB = {kv13_gib:.2f} GiB，即文档的「约 1.7GB」；GQA/MQA 按 KV 头数成"
                "比例缩小。"),
    DocQuestion("Q2", "PagedAttention原理？",
                (("02", "cell-3"), ("02", "cell-7"), ("02", "cell-13"), ("02", "cell-16"), ("02", "cell-19"),
                 ("02", "cell-25"), ("10", "a15c4903")),
                "连续预分配按最大长度占位，浪费大部分显存；分页把 KV 切成固定大小的块（如 16 token），按需分配，块表把"
                "逻辑块映射到"
                "物理块（类似页表）；引用计数 + 写时复制让并行采样、beam search 共享块"
                "（论文与 vLLM V0 的做法；V1 改由前缀缓存共享满块）。第 02 课在 ShareGPT 式长度分"
                "布上复现浪费比例。",
                "「vs HF 14-24x、vs TGI 2.2-3.5x」是 vLLM 发布博客（2023 年 6 月）在其设置下的数字"
                "（TGI 的 3.5x 是 3 路并行采样，单路为 2.2-2.5x）；"
                "第 10 课测的是本课程引擎对 transformers generate() 的倍数，并说明倍数从何而来。"),
    DocQuestion("Q2 追问", "为什么浪费只有4%？",
                (("02", "cell-7"), ("02", "cell-9"), ("11", "c10")),
                "分页后只有每个序列最后一块可能未填满，平均浪费约半块（P/2 个 token）；浪费比例 = 半块 / 序列长度，序"
                "列越长越小，"
                "块越大越大。"),
    DocQuestion("Q3", "Continuous Batching是什么？",
                (("04", "082d640c"), ("04", "8cb91d5e"), ("04", "869999cc"), ("04", "692040ab"), ("04", "bd1a7785"),
                 ("11", "c16")),
                "迭代级（token 级）调度：每一步重新组成 batch，完成的请求立即离开，新请求下一步就能加入。本课程的调度器"
                "（与 vLLM V0 一样；V1 没有 Swapped 队列，只以重计算抢占）维护 Waiting、Running、"
                "Swapped 三个队列和三个上限（max_num_seqs、每步 token 预算、空闲 KV 块）。收益取决于长度差异：等长请求"
                "时几乎没有"
                "（第 04 课的 Myth vs measurement），录制结果给出具体倍数。"),
    DocQuestion("Q3 追问", "Swap机制怎么工作？",
                (("04", "d2a0708e"), ("04", "ksana-swap-md"), ("04", "ksana-swap-run"), ("04", "ksana-swap-read"),
                 ("05", "swapin-dedup-md"), ("05", "swapin-dedup"), ("04", "prefetch-md"), ("04", "prefetch-sim")),
                "显存不够时，调度器抢占最晚到达的运行序列：recompute（释放块，之后重算）或 swap（块拷到 CPU 池，之后拷"
                "回）。KsanaLLM 的 "
                "SwapoutRequestAsync 从尾到头遍历，保留仍被其他运行请求引用的前缀块，其余块异步换出；换入后 MergeSwapi"
                "nRequest 把与"
                "前缀树中内容相同的块合并。本课程引擎的 enable_partial_swap 只换出本步需要的尾部块、前缀留在显存，换入"
                "只拷回换出的"
                "部分（第 04 课计数对比整序列 swap）；开启前缀缓存时，换入跳过缓存仍持有的块（第 05 课计数）。"),
    DocQuestion("Q4", "FlashAttention为什么快？",
                (("00", "c12"), ("03", "efcdde74"), ("03", "632a2590"), ("03", "9309790f"), ("03", "dcff67d6"),
                 ("03", "1126c266"), ("11", "c14")),
                "标准注意力把 S_q×S_kv 的分数和概率矩阵写回 HBM，受访存限制；FlashAttention 分块（tiling）在片上 SRAM "
                "里算完一块再"
                "合并（online softmax），不写回中间矩阵：显存从 O(N²) 降到 O(N)，HBM 读写大幅减少。加速倍数取决于 N、D"
                " 和 mask，"
                "见第 03 课录制的 GPU 结果。",
                "「SRAM 19 TB/s」是 FlashAttention 论文对 A100（40/80GB，HBM 1.5–2.0 TB/s）的估算"
                "，本课程未直接测量 "
                "SRAM 带宽。"),
    DocQuestion("Q4 追问", "Online Softmax怎么工作？",
                (("03", "1b1d0e36"), ("03", "df81abcd"), ("03", "13d03f38")),
                "逐块维护当前最大值 m 和指数和 l；新块出现更大的最大值时，把之前的 l 和输出都乘以 exp(m_旧 − m_新) 修"
                "正。结果与一次性 "
                "softmax 数学等价，第 03 课在普通、极大（约 1000）和 −inf 的 logits 上验证。"),
    DocQuestion("Q5", "KsanaLLM有什么技术亮点？",
                (("05", "4edb2a29"), ("05", "bb490f4e"), ("04", "cfbbbf76"), ("04", "ksana-swap-md"),
                 ("05", "swapin-dedup-md"), ("09", "ksana-pp-md"), ("09", "ksana-pp-bytes"), ("09", "ksana-pp-read")),
                "前缀缓存是按块组织的树，子节点以该块的 token 序列为键（KsanaLLM 的 PrefixCachedBlock；第 05 课实现并"
                "与 vLLM 的哈希链"
                "比较）；调度时先查前缀缓存再分配块，Split-fuse 把长 prefill 切块与 decode 混合（第 04 课第 7 节）；换"
                "出从尾到头、换入"
                "去重（第 04、05 课）；多机时 PP 跨机、多个 batch 同时在流水线中（第 09 课）。按最简单的计数，「跨机通"
                "信 −98.3%」"
                "对应约 {layers_for_983:.0f} 层、每个阶段边界传两份张量的模型（第 09 课计算）。",
                "「推理单价比 vLLM/TensorRT-LLM 低 20%+」和昇腾 NPU 支持是厂商说法，本课程无法测量；−98.3% 的推导假"
                "设未公开。"),
    DocQuestion("Q6", "TP和PP什么时候用哪个？",
                (("08", "c03"), ("08", "c05"), ("08", "c16"), ("08", "c22"), ("09", "c22"), ("09", "ksana-pp-bytes"),
                 ("11", "c26")),
                "TP 把每层切到多卡：QKV 和 MLP 的 up/gate 列切分，O 投影和 MLP down 行切分，每层 2 次 all-reduce，适合"
                " NVLink 这样"
                "高带宽低延迟的互联；PP 按层切分，只在阶段边界点对点传激活，适合跨机，需要 micro-batch 填满流水线。常"
                "见布局是机内 TP、"
                "机间 PP；NVL72 级 NVLink 域、MoE 的专家并行 + DP attention、PD 分离也会改变布局。文档「列切分 MLP、行"
                "切分 "
                "Attention」不准确：每个块都是先列切分再行切分（第 08 课）。",
                "「NVLink 50-450 GB/s」混合了单条链路和整卡聚合带宽（第 08 课的互联表）。"),
    DocQuestion("Q7", "长思维链(CoT)场景有什么挑战？",
                (("11", "c28"), ("10", "6da67357"), ("04", "ksana-swap-run"), ("07", "cell-3"), ("02", "cell-25")),
                "输出很长：KV 随输出线性增长，显存决定并发（INT8 KV 约减半）；decode 占主导，每步读全部权重和 KV，越长"
                "越慢；抢占代价"
                "也随上下文增长（长上下文时部分尾部换出省得最多，第 04 课）。decode 时 S_q=1，没有 N×N 矩阵，FlashAtte"
                "ntion 省显存的那部分收益用不上；decode 需要的是沿 key 维的并行 split-K / Flash-Decoding（第 02 课 "
                "paged 内核的 split-K；FlashAttention 库和 FlashInfer 也提供）。"),
    DocQuestion("Q8", "大模型推理是计算密集还是访存密集？",
                (("00", "c14"), ("00", "c16"), ("00", "c20"), ("01", "c38"), ("11", "c06")),
                "分阶段看：prefill 是 GEMM，算术强度高于 ridge point，受算力限制；decode 在小 batch 下是 GEMV，每步读"
                "全部权重和 KV，"
                "算术强度低，受 HBM 带宽限制。增大 batch 提高权重复用，但 KV 读取随 batch 同步增长（第 00、01 课测量"
                "）。"),
    DocQuestion("Q9", "Speculative Decoding是什么？",
                (("06", "3201e4ff"), ("06", "6d84d8d1"), ("06", "3e9ac7e3"), ("06", "367dbe9d"), ("11", "c22")),
                "小模型起草 γ 个 token，大模型一次前向验证 γ+1 个位置；拒绝采样保证输出分布与大模型完全一致（第 06 课"
                "卡方检验）。"
                "每次目标前向的期望 token 数为 (1−α^(γ+1))/(1−α)，实际加速还取决于草稿模型的相对成本 c。"),
    DocQuestion("Q10", "多模态推理有什么特点？",
                (("04", "cfbbbf76"), ("04", "0a4748c6"), ("04", "mm-encoder-md"), ("04", "mm-encoder-sim"),
                 ("10", "c80f733d"), ("11", "c18")),
                "一张图编码成数百到数千个 token，prefill 比纯文本长得多；chunked prefill 把长 prefill 切块，与 decode "
                "共享每一步，"
                "避免 decode 长时间停顿（第 04 课测最长的 token 间隔）。视觉编码器是单独的预算项：每步的编码器 token 预"
                "算（vLLM 的 max_num_encoder_input_tokens）和按图像内容哈希共享的编码器缓存；图像 token 的前缀缓存键"
                "也要带上内容哈希，同一张图可跳过编码器，不同的图不会误命中（第 04 课在调度器上模拟并计数）。",
                "模拟只计步数和 token 数，不计编码器的真实耗时；编码器与 decoder 分开部署（E/P/D 分离）本课程未实现。"),
    DocQuestion("Q11", "KV Cache量化有什么影响？",
                (("07", "cell-3"), ("07", "cell-10"), ("07", "cell-20"), ("07", "cell-22"), ("07", "cell-32"),
                 ("11", "c24")),
                "K/V 存成 8 位（本课程 INT8：每个 (token, KV 头) 一个 fp16 scale；vLLM/TensorRT-LLM 的 FP8：静态 "
                "per-tensor scale，vLLM 可选 per-head），字节约减半，同样显存放下约两倍 token；误差随"
                "层数、上下文"
                "长度和位宽变化，第 07 课在本课程小模型能到的长度上测误差和 token 一致率；更深的模型、更长的上下文、更"
                "低位宽需要重新"
                "评估。"),
    DocQuestion("Q12", "vLLM的Block Table具体是什么结构？",
                (("02", "cell-16"), ("02", "cell-25"), ("11", "c12")),
                "二维 int32 张量 [max_num_seqs, max_blocks_per_seq]，每个元素是物理块号；token i 的槽位 = block_table["
                "i // P]·P + "
                "i % P（slot mapping）；kernel 通过块表间接读取 K/V。"),
    DocQuestion("反问 1", "KsanaLLM在长思维链场景下，KV Cache的swap策略是怎么设计的？有没有考虑预测性的预加载？",
                (("04", "ksana-swap-md"), ("04", "ksana-swap-run"), ("04", "prefetch-md"), ("04", "prefetch-sim"),
                 ("04", "prefetch-read")),
                "换出策略见 Q3 追问。预测性预加载：异步拷贝时，恢复的序列要等拷贝完成；调度器能提前一步预测谁会恢复（"
                "本步哪些序列到达 "
                "max_tokens、释放多少块），提前开始拷贝。第 04 课在调度器上模拟（不是真实引擎），统计有无预取时的等"
                "待步数。"),
    DocQuestion("反问 2", "团队目前在多模态推理调度上有什么挑战？图像encoder和文本decoder的调度是分开还是统一的？",
                (("04", "cfbbbf76"), ("04", "mm-encoder-md"), ("04", "mm-encoder-sim"), ("10", "c80f733d")),
                "统一调度时，编码器在同一个调度器里有自己的每步预算和缓存（第 04 课的模拟）；decoder 一侧是长图像 "
                "prompt 的 chunked prefill。",
                "encoder 与 decoder 分开部署的调度比较本课程尚未实现。"),
)


@cache
def _cells(lesson: str) -> tuple[str, tuple[tuple[str, str, str], ...]]:
    """(notebook file name, ((cell id, cell type, first line), ...)) of lesson ``lesson`` ("04")."""
    paths = sorted(NOTEBOOKS_DIR.glob(f"{lesson}_*.ipynb"))
    if len(paths) != 1:
        raise KeyError(f"lesson {lesson!r}: expected one notebooks/{lesson}_*.ipynb, found {len(paths)}")
    cells = json.loads(Path(paths[0]).read_text(encoding="utf-8"))["cells"]
    return paths[0].name, tuple((c.get("id", ""), c["cell_type"], "".join(c["source"]).strip().split("\n")[0])
                                for c in cells)


def locate(lesson: str, cell_id: str) -> tuple[str, int, str]:
    """(notebook file, cell number from 0, a label: its first line, "code · " before a code cell's) of a cell;
    KeyError naming both when the id is not in the notebook."""
    name, cells = _cells(lesson)
    for i, (cid, kind, first) in enumerate(cells):
        if cid == cell_id:
            label = first.lstrip("# ").replace("**", "").strip()
            return name, i, ("code · " if kind == "code" else "") + label
    raise KeyError(f"cell id {cell_id!r} is not in notebooks/{name} (renamed or deleted? update "
                   "course_lib/review/crosswalk.py)")


def crosswalk_rows(values: dict | None = None, *, label_chars: int = 60) -> list[list]:
    """One row per document question: key, question, the cells that answer it (a list of ``04 [37] label``), the
    中文 summary with ``values`` filled in, and what the course does not measure."""
    rows = []
    for q in DOCUMENT:
        where = []
        for lesson, cell_id in q.cells:
            _, index, label = locate(lesson, cell_id)
            where.append(f"{lesson} [{index}] {label[:label_chars]}{'…' if len(label) > label_chars else ''}")
        rows.append([q.key, q.question, where, q.summary.format(**(values or {})), q.gap])
    return rows


def crosswalk_html(values: dict | None = None) -> str:
    """``crosswalk_rows`` as an HTML table (the cells one per line, linked to their notebook)."""
    rows = []
    for key, question, where, summary, gap in crosswalk_rows(values):
        links = "<br>".join(f"<a href='{_cells(w[:2])[0]}'>{html.escape(w)}</a>" for w in where)
        rows.append([key, question, links, summary, gap])
    return html_table(["#", "the document's question", "lesson [cell]", "中文 answer summary", "not measured here"],
                      rows, raw_columns=(2,))
