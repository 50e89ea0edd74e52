"""An English / 中文 glossary of the course's vocabulary (lesson 11), as data.

The Chinese terms are those used in the Chinese LLM-serving community (vLLM / SGLang Chinese docs, Zhihu and
WeChat engineering posts, Chinese vendor documentation); where two are in use, both are given, the more common
one first. Many engineers keep the English name (KV cache, PagedAttention, FlashAttention, TTFT): the Chinese
column then shows how it is written in Chinese text.
"""
from __future__ import annotations

from typing import NamedTuple

from course_lib.review.review import html_table, lesson_link


class Term(NamedTuple):
    english: str
    chinese: str
    definition: str       # one sentence, English
    definition_zh: str    # 一句话中文释义
    lessons: str          # lessons that teach it, e.g. "01, 07"


GLOSSARY: tuple[Term, ...] = (
    # --- phases and the cache
    Term("token", "词元（token）", "The unit a model reads and writes: an id into the vocabulary.",
         "模型读写的基本单位：词表中的一个编号。", "01"),
    Term("autoregressive decoding", "自回归解码", "Generating one token at a time, each conditioned on all before it.",
         "逐个生成 token，每个 token 都以之前的全部 token 为条件。", "01"),
    Term("prefill", "预填充（Prefill 阶段）",
         "The first forward pass over the whole prompt; fills the KV cache; compute-bound.",
         "对整段提示词做一次前向计算并填满 KV 缓存的阶段，通常是计算受限。", "00, 01"),
    Term("decode", "解码（Decode 阶段）", "The steps that each produce one new token per sequence; memory-bound.",
         "每步为每个序列生成一个新 token 的阶段，通常是访存受限。", "00, 01"),
    Term("KV cache", "KV 缓存（键值缓存）",
         "The keys and values of past tokens, kept so decode computes only the new token.",
         "保存已处理 token 的键和值，使解码时只需计算新 token。", "01"),
    Term("causal mask", "因果掩码", "Each position attends only to itself and earlier positions.",
         "每个位置只能关注自身及之前的位置。", "01, 03"),
    Term("GQA (grouped-query attention)", "分组查询注意力（GQA）",
         "Several query heads share one key/value head: a Hq/Hkv times smaller KV cache.",
         "多个查询头共享一组键/值头，KV 缓存缩小为原来的 Hkv/Hq。", "01"),
    Term("MQA (multi-query attention)", "多查询注意力（MQA）", "GQA with a single key/value head for all query heads.",
         "所有查询头共享同一个键/值头的 GQA 特例。", "01"),
    Term("RoPE (rotary position embedding)", "旋转位置编码（RoPE）",
         "Encodes a token's position by rotating its query and key vectors.",
         "通过旋转查询和键向量来编码 token 的位置。", "01, 05"),
    # --- hardware and the roofline
    Term("HBM (high-bandwidth memory)", "高带宽内存（HBM，显存）",
         "The GPU's main memory: large, but slow next to on-chip SRAM.",
         "GPU 的主存：容量大，但比片上 SRAM 慢得多。", "00"),
    Term("SRAM / shared memory", "片上 SRAM / 共享内存", "Small, fast on-chip memory per SM where kernels stage tiles.",
         "每个 SM 上小而快的片上存储，算子在这里暂存数据块。", "00, 03"),
    Term("kernel", "算子 / 核函数（kernel）", "A function launched on the GPU over a grid of programs (thread blocks).",
         "在 GPU 上以网格方式并行启动的函数。", "00"),
    Term("roofline model", "屋顶线模型（Roofline 模型）",
         "Attainable FLOP/s = min(peak FLOP/s, intensity x memory bandwidth).",
         "可达算力 = min(峰值算力, 算术强度 × 内存带宽)。", "00"),
    Term("arithmetic intensity", "算术强度（计算强度）", "FLOPs per byte moved to or from main memory.",
         "每从主存搬运一个字节所做的浮点运算次数。", "00"),
    Term("ridge point", "脊点（屋顶线拐点）", "The intensity peak FLOP/s / bandwidth where the two roofs meet.",
         "峰值算力除以带宽：两条屋顶相交处的算术强度。", "00"),
    Term("memory-bound", "访存受限（访存密集型，内存带宽瓶颈）",
         "Limited by bytes per second, left of the ridge point (decode).",
         "受内存带宽限制、位于脊点左侧的状态（如解码）。", "00"),
    Term("compute-bound", "计算受限（计算密集型，算力瓶颈）", "Limited by FLOP/s, right of the ridge point (prefill).",
         "受算力限制、位于脊点右侧的状态（如预填充）。", "00"),
    # --- PagedAttention
    Term("PagedAttention", "分页注意力（PagedAttention）",
         "Attention over a KV cache stored in fixed-size blocks, like OS memory pages.",
         "把 KV 缓存按固定大小的块存放（类似操作系统分页）并在其上计算注意力。", "02"),
    Term("KV block", "KV 块（缓存块）", "P token slots of K/V for every layer and KV head; the unit of allocation.",
         "包含 P 个 token 槽位的 K/V 存储单元，是分配的基本单位。", "02"),
    Term("block table", "块表", "Per sequence, the physical block ids of its logical blocks, in token order.",
         "每个序列的逻辑块到物理块编号的映射表，按 token 顺序排列。", "02"),
    Term("slot mapping", "槽位映射（slot mapping）",
         "Where each new token's K/V is written: block_table[i // P] * P + i % P.",
         "每个新 token 的 K/V 写入位置：block_table[i // P] * P + i % P。", "02"),
    Term("internal fragmentation", "内部碎片",
         "Reserved but unused slots inside an allocation (the last block's tail).",
         "已分配但未使用的空间（如最后一个块的空余部分）。", "02"),
    Term("reference count", "引用计数", "How many owners (sequences, the prefix cache) a block has; freed at zero.",
         "一个块被多少个序列或前缀缓存持有；降为 0 时释放。", "02, 05"),
    Term("copy-on-write", "写时复制", "A shared block is copied only when one of its owners writes into it.",
         "共享块只在某个持有者要写入时才复制。", "02"),
    Term("split-K (flash-decoding)", "Split-K 并行（Flash-Decoding）",
         "Splitting a long context across programs and merging partial softmaxes.",
         "把长上下文切给多个程序并行计算，再合并各部分的 softmax 结果。", "02"),
    # --- FlashAttention
    Term("FlashAttention", "FlashAttention（通常不译）",
         "Exact attention computed tile by tile in SRAM, never storing the score matrix.",
         "在片上 SRAM 中分块计算的精确注意力，不把注意力分数矩阵写回显存。", "03"),
    Term("online softmax", "在线 softmax", "One pass with a running max and sum, rescaled when the max grows.",
         "单遍扫描，维护运行最大值和累加和，最大值变大时重新缩放。", "03"),
    Term("tiling", "分块计算（tiling）", "Processing matrices in blocks that fit in on-chip memory.",
         "把矩阵切成能放进片上存储的小块逐块计算。", "03"),
    # --- scheduling
    Term("static batching", "静态批处理", "A padded batch that runs until its longest request finishes.",
         "填充对齐后的一批请求一直运行到最长的请求结束。", "04"),
    Term("continuous batching", "连续批处理（continuous batching，token 级调度）",
         "Re-forming the batch at every step (iteration-level scheduling): finished requests leave, waiting ones join.",
         "每一步（迭代级调度）重新组批：完成的请求立即离开，等待的请求随即加入。", "04"),
    Term("preemption", "抢占", "Evicting a running sequence's KV blocks when memory runs out.",
         "显存不足时把正在运行的序列的 KV 块让出来。", "04"),
    Term("swap", "换出 / 换入（swap）", "Preemption that copies KV blocks to CPU memory and back later.",
         "把 KV 块复制到 CPU 内存、之后再拷回的抢占方式。", "04"),
    Term("recomputation", "重计算", "Preemption that drops KV blocks and prefills the tokens again later.",
         "丢弃 KV 块、之后重新预填充这些 token 的抢占方式。", "04"),
    Term("chunked prefill", "分块预填充（chunked prefill）",
         "Cutting a long prompt into chunks that share steps with decodes.",
         "把长提示词切成小块，与解码请求在同一步中一起执行。", "04"),
    Term("token budget", "token 预算（每步最大 token 数）",
         "The most tokens one step may process (max_num_batched_tokens).",
         "每一步最多处理的 token 数（max_num_batched_tokens）。", "04"),
    # --- prefix caching
    Term("prefix caching", "前缀缓存", "Reusing the KV blocks of a prompt prefix computed by an earlier request.",
         "复用之前请求已计算过的提示词前缀的 KV 块。", "05"),
    Term("radix tree", "基数树（RadixAttention）", "A tree of token sequences used to find the longest cached prefix.",
         "按 token 序列组织的树，用于查找最长的已缓存前缀。", "05"),
    Term("LRU eviction", "LRU 淘汰", "Freeing the least recently used cached blocks first, leaves first.",
         "优先释放最久未使用的缓存块，从叶子开始。", "05"),
    Term("hit rate", "命中率", "The fraction of prompt tokens served from the cache.",
         "从缓存中直接得到的提示词 token 所占比例。", "05"),
    # --- speculative decoding
    Term("speculative decoding", "推测解码（投机解码）",
         "A draft proposes several tokens, the target verifies them in one pass.",
         "草稿模型先提出若干 token，目标模型一次前向验证。", "06"),
    Term("draft model", "草稿模型", "The small, cheap model that proposes tokens.",
         "负责提出候选 token 的小而便宜的模型。", "06"),
    Term("target model", "目标模型", "The large model whose output distribution is kept exactly.",
         "输出分布被精确保持的大模型。", "06"),
    Term("acceptance rate", "接受率", "alpha = sum over x of min(p(x), q(x)): how often a draft token is kept.",
         "α = Σ min(p(x), q(x))：草稿 token 被接受的概率。", "06"),
    Term("rejection sampling", "拒绝采样",
         "Accept with probability min(1, p/q); otherwise sample max(0, p - q), normalised.",
         "以 min(1, p/q) 的概率接受，否则从归一化的 max(0, p − q) 中重新采样。", "06"),
    # --- quantization
    Term("quantization", "量化", "Storing numbers in fewer bits (INT8, FP8) with a scale per group.",
         "用更少的比特（INT8、FP8）存储数值，每组配一个缩放因子。", "07"),
    Term("scale", "缩放因子（scale）", "The step of the quantization grid: x is stored as round(x / scale).",
         "量化网格的步长：x 存储为 round(x / scale)。", "07"),
    Term("zero point", "零点（zero point）", "The offset of an asymmetric grid, so [min, max] maps onto all codes.",
         "非对称量化的偏移量，使 [min, max] 映射到全部编码。", "07"),
    Term("per-token / per-channel quantization", "逐 token / 逐通道量化",
         "One scale per token (row) or per channel (column).",
         "每个 token（行）或每个通道（列）各用一个缩放因子。", "07"),
    Term("perplexity", "困惑度", "exp(mean next-token loss): lower is better.",
         "exp(平均下一个 token 损失)，越低越好。", "07"),
    # --- parallelism
    Term("tensor parallelism", "张量并行", "Splitting every weight matrix across GPUs; 2 all-reduces per layer.",
         "把每个权重矩阵切分到多张 GPU 上；每层两次 all-reduce。", "08"),
    Term("pipeline parallelism", "流水线并行", "Splitting the layers into stages on different GPUs.",
         "把模型的层切成多个阶段放在不同 GPU 上。", "09"),
    Term("all-reduce", "全归约 / 全规约（AllReduce）", "Sum a tensor over all ranks and give every rank the result.",
         "对所有进程上的张量求和，并把结果发给每个进程。", "08"),
    Term("micro-batch", "微批次", "A slice of the batch that flows through the pipeline stages.",
         "在流水线各阶段间流动的一小批数据。", "09"),
    Term("pipeline bubble", "流水线气泡", "Idle stage time at the start and end: (p - 1) / (m + p - 1).",
         "流水线开头和结尾的空闲时间：(p − 1) / (m + p − 1)。", "09"),
    # --- the Q&A document's own terms (lesson 11, Part 0), as it writes them
    Term("column-parallel linear", "列切分（列并行，ColumnParallelLinear）",
         "A weight split by output columns: each rank computes a slice of the outputs, no communication (QKV, up).",
         "按输出列切分权重：每个进程算一部分输出，无需通信（QKV、MLP 上投影）。", "08"),
    Term("row-parallel linear", "行切分（行并行，RowParallelLinear）",
         "A weight split by input rows: partial sums on every rank, then one all-reduce (o_proj, down).",
         "按输入行切分权重：各进程得到部分和，再做一次 all-reduce（o_proj、MLP 下投影）。", "08"),
    Term("waiting queue", "等待队列（Waiting）",
         "Requests not yet given KV blocks: new ones, and recomputed preemptions.",
         "尚未分配 KV 块的请求：新请求和被重计算抢占的请求。", "04"),
    Term("running queue", "运行队列（Running）", "Requests with KV blocks on the device, scheduled every step.",
         "KV 块在显存中、每步参与调度的请求。", "04"),
    Term("swapped queue", "换出队列（Swapped）",
         "Preempted requests whose KV blocks wait in CPU memory to be swapped in (the course's engine, vLLM V0; "
         "vLLM V1 has none: it preempts by recompute only).",
         "被抢占、KV 块暂存在 CPU 内存中等待换入的请求（本课程的引擎、vLLM V0；vLLM V1 没有该队列，只以重计算抢占）。",
         "04"),
    Term("Split-fuse (Dynamic SplitFuse)", "Split-fuse（动态分块融合）",
         "DeepSpeed-FastGen's name for chunking long prompts and fusing the chunks with decodes into steps of a "
         "steady token count; Sarathi-Serve's chunked prefills with stall-free batching are the same idea.",
         "DeepSpeed-FastGen 的做法：把长提示词切块并与解码拼成 token 数稳定的步；Sarathi-Serve 的 chunked prefill + "
         "stall-free batching 思路相同。", "04"),
    Term("beam search", "束搜索（Beam Search）",
         "Keeping the k most likely partial outputs; beams share their prefix's KV blocks (copy-on-write).",
         "保留概率最高的 k 个候选序列；各候选共享前缀的 KV 块（写时复制）。", "02"),
    Term("parallel sampling", "并行采样", "n outputs sampled from one prompt, sharing the prompt's KV blocks.",
         "同一提示词采样 n 个输出，共享提示词的 KV 块。", "02"),
    Term("logical / physical block", "逻辑块 / 物理块",
         "A sequence's i-th block of tokens, and the slot in the KV pool that holds it (the block table maps one to "
         "the other).", "序列中第 i 个 token 块，以及 KV 池中实际存放它的块（由块表映射）。", "02"),
    Term("page table", "页表", "The OS map from virtual to physical memory pages: the model of the block table.",
         "操作系统中虚拟页到物理页的映射：块表的原型。", "02"),
    Term("prefix tree", "前缀树（树状结构，PrefixCachedBlock）",
         "Cached blocks as a tree: a child per next block of tokens, found by that block's token ids (KsanaLLM).",
         "缓存块组成的树：每个子节点是下一块 token，以该块的 token 序列为键查找（KsanaLLM）。", "05"),
    Term("hash chain", "哈希链（块哈希）",
         "Each full block keyed by hash(parent block's key, its tokens), from a seed: the same keys in every "
         "process with the same seed (vLLM: a fixed PYTHONHASHSEED).",
         "每个满块的键 = hash(父块的键, 本块 token)，从一个种子开始：种子相同的进程得到相同的键（vLLM：固定 "
         "PYTHONHASHSEED）。", "05"),
    Term("swap-in deduplication", "换入去重（去重合并）",
         "On swap-in, blocks already in the prefix cache are reused instead of copied back.",
         "换入时，前缀缓存中已有的块直接复用，不再拷回。", "04, 05"),
    Term("predictive swap-in (prefetch)", "预测性预加载（预取换入）",
         "Starting a swapped request's copy back before the step that needs it, to hide the transfer.",
         "在需要之前提前把被换出请求的 KV 拷回，以隐藏传输时间。", "04"),
    Term("GEMM", "通用矩阵乘（GEMM）", "Matrix times matrix: prefill's projections, compute-bound at enough rows.",
         "矩阵乘矩阵：预填充中的投影，行数足够时是计算受限。", "00"),
    Term("GEMV", "矩阵向量乘（GEMV）", "Matrix times vector: a batch-1 decode step, about 1 FLOP per byte of weights.",
         "矩阵乘向量：batch 为 1 的解码步，每字节权重约 1 次浮点运算。", "00"),
    Term("weight reuse", "权重复用", "How many tokens use each weight read from memory: the batch's or prompt's rows.",
         "每读一次权重被多少个 token 使用：即批次或提示词的行数。", "00"),
    Term("GPipe schedule", "GPipe 调度", "All micro-batches forward, then all backward: simple, holds m activations.",
         "先做完所有微批次的前向，再做所有反向：简单，但要保存 m 份激活。", "09"),
    Term("1F1B schedule", "1F1B 调度（一前一后）",
         "Alternating one forward and one backward per stage: the same bubble, at most p activations held.",
         "每个阶段交替做一次前向、一次反向：气泡相同，最多保存 p 份激活。", "09"),
    Term("PP multi-batch", "多批次流水（PP multi-batch）",
         "Several micro-batches in flight across pipeline stages, so no stage idles while serving (KsanaLLM).",
         "多个微批次同时在流水线各阶段中流动，推理时各阶段不空等（KsanaLLM）。", "09"),
    Term("cross-node communication", "跨机通信（跨机通讯）",
         "Bytes between servers (InfiniBand, tens of GB/s): why tensor parallelism stays inside a node.",
         "服务器之间的数据传输（InfiniBand，几十 GB/s）：张量并行留在机内的原因。", "08, 09"),
    Term("NVLink", "NVLink（GPU 高速互联）",
         "NVIDIA's GPU-to-GPU link: 25 GB/s per link each way; an H100 has 18 links.",
         "NVIDIA 的 GPU 间互联：每条链路单向 25 GB/s；H100 有 18 条。", "08"),
    Term("PD disaggregation (prefill/decode disaggregation)", "PD 分离（预填充/解码分离）",
         "Prefill and decode on separate instances, the KV cache sent between them; each phase gets its own layout.",
         "预填充和解码放在不同实例上，KV 缓存在实例间传输；两个阶段各自选择并行方式。", "08, 09"),
    Term("vision encoder", "视觉编码器（图像 encoder）",
         "The model that turns an image into embeddings (hundreds to thousands of tokens) before the prefill.",
         "在 decoder 预填充之前把图像变成嵌入（几百到几千个 token）的模型。", "04"),
    Term("encoder budget", "编码器预算（max_num_encoder_input_tokens）",
         "The encoder tokens one step may compute; a chunk stops before an image that does not fit.",
         "每一步最多计算的编码器 token 数；放不下的图像之前，分块就此截断。", "04"),
    Term("encoder cache", "编码器缓存（encoder cache）",
         "Image embeddings kept until the prefill consumes them, shared by content hash across requests.",
         "保存图像嵌入直到预填充用完，按图像内容哈希在请求间共享。", "04"),
    # --- metrics and workloads
    Term("TTFT (time to first token)", "首 token 时延（首字延迟，TTFT）",
         "From a request's arrival to its first output token.",
         "从请求到达到输出第一个 token 的时间。", "04, 05"),
    Term("TPOT (time per output token)", "每输出 token 时延（TPOT）",
         "Mean time between a request's output tokens after the first.",
         "首个 token 之后，每个输出 token 的平均间隔。", "04"),
    Term("throughput", "吞吐量", "Output tokens per second over all requests.",
         "所有请求每秒生成的输出 token 数。", "04"),
    Term("multimodal prefill", "多模态预填充",
         "Prefill of a prompt holding image tokens: hundreds to thousands per image.",
         "包含图像 token 的提示词的预填充：每张图几百到几千个 token。", "04, 10"),
    Term("chain-of-thought", "思维链（CoT）",
         "Long step-by-step reasoning outputs: decode-heavy, with a growing KV cache.",
         "长的逐步推理输出：以解码为主，KV 缓存不断增长。", "10"),
)


def lookup(query: str) -> list[Term]:
    """Terms whose English or Chinese name contains ``query`` (case-insensitive)."""
    if not isinstance(query, str) or not query.strip():
        raise ValueError("lookup needs a non-empty string")
    q = query.strip().lower()
    return [t for t in GLOSSARY if q in t.english.lower() or q in t.chinese.lower()]


def glossary_html(terms: tuple[Term, ...] | list[Term] = GLOSSARY) -> str:
    """The glossary as an HTML table (lessons as links to their notebooks)."""
    rows = [[t.english, t.chinese, t.definition, t.definition_zh,
             ", ".join(lesson_link(n.strip()) for n in t.lessons.split(","))] for t in terms]
    return html_table(["English", "中文", "meaning", "释义", "lesson"], rows, raw_columns=(4,))
