"""The strongest baseline ``transformers`` ships (lesson 10): its own continuous batching, ``generate_batch``.

Since 4.54 ``transformers`` has a continuous-batching generator of its own: a paged KV cache, a FIFO scheduler that
admits a request as soon as blocks are free, and (in 5.x) CUDA graphs and a flash-attention switch. Its entry
points are ``model.generate_batch(inputs, generation_config)``, which gives every request the same
``max_new_tokens``, and the manager behind it, ``model.continuous_batching_context_manager(...)`` with
``manager.add_request(input_ids, request_id, max_new_tokens)`` and ``manager.get_result()``. A trace whose requests
want different output lengths (nano-vllm's) needs the manager, so ``HFContinuousBatching`` drives the manager the
way ``generate_batch`` does (the same context manager, warm-up included), one ``add_request`` per request with its
own ``max_new_tokens``.

* **Greedy, EOS ignored** (``eos_token_id = -1``): every request gets exactly its requested number of tokens.
* **KV memory**: ``kv_tokens`` token slots (``ContinuousBatchingConfig.num_blocks`` pages of ``page_size`` tokens),
  so that it can get the same KV budget as ``LLMEngine``; ``None`` lets ``transformers`` size its cache from the
  free memory (on a CPU that is most of the host's RAM: always pass ``kv_tokens`` there).
* **Time**: the wall time from the first ``add_request`` to the last result (setup excluded: the manager is built,
  its cache allocated and its CUDA graphs captured before the clock starts, as an engine is built before it serves).
  Per-token times come from ``record_timestamps``, on the same clock.

The API moved between 4.54 and 5.x (arguments added, ``block_size`` renamed ``page_size``): keywords are passed
only where the installed version takes them (``inspect.signature``), and ``available()`` says whether there is a
continuous-batching API at all.
"""
from __future__ import annotations

import dataclasses
import inspect
import time

import torch

from course_lib.serving.engine import _synchronize
from course_lib.serving.metrics import CompletionOutput, RequestMetrics, RequestOutput, RunMetrics, summarize


def flash_attention_packages() -> dict:
    """Whether the FlashAttention packages ``transformers`` would switch its continuous batching to are installed
    (``flash_attn`` 2 and 3, as ``transformers.utils`` checks them, without its kernels-hub fallback, which downloads).
    ``transformers`` (5.17's ``switch_to_cb_friendly_attn``) picks FlashAttention 3, then 2, for a model loaded with
    SDPA or eager, and runs ``paged|sdpa`` only when neither is there: a row's attention says which it ran."""
    from transformers.utils import import_utils

    return {f"flash_attn_{v}_installed": bool(getattr(import_utils, f"is_flash_attn_{v}_available", lambda: False)())
            for v in (2, 3)}


def available(hf_model) -> str | None:
    """None when this ``transformers`` model has continuous batching, else why not (a sentence for the result file)."""
    import transformers

    if not hasattr(hf_model, "continuous_batching_context_manager"):
        return f"not available: transformers {transformers.__version__} has no continuous batching (generate_batch)"
    return None


def _finished(result) -> bool:
    if hasattr(result, "is_finished"):
        return result.is_finished()
    return str(getattr(result, "status", "")).endswith("FINISHED")     # versions before is_finished()


def _accepts(fn, *names: str) -> dict[str, bool]:
    params = inspect.signature(fn).parameters     # named only: a **kwargs of old versions passes them on blindly
    return {n: n in params for n in names}


class HFContinuousBatching:
    """``transformers``' continuous batching with ``LLMEngine``'s interface: ``generate(prompts, params)`` ->
    RequestOutputs, ``.metrics`` (a RunMetrics), ``.info`` (attention implementation, cache size, API used)."""

    def __init__(self, hf_model, *, kv_tokens: int | None = None, max_batch_tokens: int | None = None,
                 warmup: bool = True, graphs: bool | None = None):
        reason = available(hf_model)
        if reason:
            raise RuntimeError(reason)
        self.model, self.kv_tokens, self.max_batch_tokens, self.warmup = hf_model, kv_tokens, max_batch_tokens, warmup
        # None: transformers' own choice (its CUDA graphs and async batching only where the attention needs no mask,
        # so off for "paged|sdpa"); True: both on, whatever the attention (transformers pads the graphs' inputs)
        self.graphs = graphs
        self.vocab_size = hf_model.config.vocab_size
        self.metrics: RunMetrics | None = None
        self.info: dict = {}
        # 5.x's context manager warms up itself (CUDA graphs at the largest sizes): no separate warm-up run needed
        self.warms_itself = warmup and _accepts(hf_model.continuous_batching_context_manager, "warmup")["warmup"]

    def _configs(self, max_new_tokens: int):
        import transformers

        gen = transformers.GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=-1,
                                            pad_token_id=0)
        try:
            from transformers.generation.configuration_utils import ContinuousBatchingConfig
        except ImportError:                                  # before 5.x: the sizes were GenerationConfig fields
            ContinuousBatchingConfig = None
        sizes = {}
        page = 256
        if ContinuousBatchingConfig is not None:
            names = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
            page_field = "page_size" if "page_size" in names else "block_size"
            page = getattr(ContinuousBatchingConfig(), page_field, None) or 256
            if self.kv_tokens is not None:
                sizes["num_blocks"] = -(-self.kv_tokens // page)
            if self.max_batch_tokens is not None:
                sizes["max_batch_tokens"] = self.max_batch_tokens
            if self.graphs is not None:
                if "use_cuda_graph" not in names:
                    raise RuntimeError("this transformers version's continuous batching has no use_cuda_graph option")
                sizes.update(use_cuda_graph=self.graphs, use_async_batching=self.graphs)
            return gen, ContinuousBatchingConfig(**{k: v for k, v in sizes.items() if k in names}), page
        if self.graphs is not None:
            raise RuntimeError("this transformers version's continuous batching has no use_cuda_graph option")
        page = 32                                             # 4.5x's default block size
        if self.kv_tokens is not None:
            gen.num_blocks = -(-self.kv_tokens // page)
        if self.max_batch_tokens is not None:
            gen.max_batch_tokens = self.max_batch_tokens
        return gen, None, page

    @torch.no_grad()
    def generate(self, prompts, params, *, arrival_times=None, use_tqdm: bool | None = None) -> list[RequestOutput]:
        """Serve every request (all arrive at t = 0: ``arrival_times`` must be None or zeros), greedy, exactly
        ``params[i].max_tokens`` new tokens each. Raises RuntimeError if ``transformers`` fails a request."""
        if arrival_times is not None and any(arrival_times):
            raise ValueError("HFContinuousBatching serves an offline batch: every arrival time must be 0")
        params = params if isinstance(params, list) else [params] * len(prompts)
        prompts = [list(map(int, p)) for p in prompts]
        gen, cb, page = self._configs(max(p.max_tokens for p in params))
        cm = self.model.continuous_batching_context_manager
        ok = _accepts(cm, "continuous_batching_config", "warmup", "workload_hints", "block", "timeout")
        kwargs = dict(generation_config=gen)
        kwargs.update({k: v for k, v in dict(block=True, timeout=30).items() if ok[k]})
        if cb is not None and ok["continuous_batching_config"]:
            kwargs["continuous_batching_config"] = cb
        if ok["warmup"]:
            kwargs["warmup"] = self.warmup
        if ok["workload_hints"]:
            try:                                              # what generate_batch tells the manager (5.x)
                from transformers.generation.continuous_batching.utils import WorkloadHints

                kwargs["workload_hints"] = WorkloadHints(max_prompt_length=max(map(len, prompts)),
                                                         max_generated_length=max(p.max_tokens for p in params),
                                                         num_requests=len(prompts))
            except ImportError:
                pass
        device = self.model.device
        with cm(**kwargs) as manager:
            self.info = self._describe(manager, page)
            _synchronize(device)
            t0 = time.perf_counter()
            stamps = dict(record_timestamps=True) if _accepts(manager.add_request, "record_timestamps")[
                "record_timestamps"] else {}                  # per-token times (TPOT) where the version records them
            self.info["per_token_times"] = bool(stamps)
            for i, (prompt, p) in enumerate(zip(prompts, params)):
                manager.add_request(prompt, request_id=f"req_{i}", max_new_tokens=p.max_tokens, **stamps)
            results, done_at, last = {}, {}, time.perf_counter()
            while len(results) < len(prompts):
                r = manager.get_result(timeout=1)
                if r is None:
                    running = getattr(manager, "is_running", lambda: True)()
                    if not running or time.perf_counter() - last > 900:
                        raise RuntimeError(f"transformers' continuous batching stopped (or gave nothing for 900 s) "
                                           f"with {len(results)} of {len(prompts)} requests done")
                    continue
                last = time.perf_counter()
                if _finished(r):
                    results[r.request_id], done_at[r.request_id] = r, last
            elapsed = max(done_at.values()) - t0
        outputs = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            r = results[f"req_{i}"]
            if r.error is not None:
                raise RuntimeError(f"transformers' continuous batching failed request {i}: {r.error}")
            tokens = list(r.generated_tokens)[:p.max_tokens]             # requested tokens only, as for every system
            times = [t - t0 for t in (getattr(r, "timestamps", None) or [])][:len(tokens)]
            finished = done_at[f"req_{i}"] - t0
            out = RequestOutput(i, prompt, finished=True)
            out.outputs = [CompletionOutput(0, tokens, None, "length", times)]
            out.metrics = RequestMetrics(arrival_time=0.0, first_scheduled_time=0.0,
                                         first_token_time=times[0] if times else finished, finished_time=finished,
                                         num_output_tokens=len(tokens))
            outputs.append(out)
        self.metrics = summarize("hf-continuous-batching", outputs, [], elapsed)
        return outputs

    def _describe(self, manager, page: int) -> dict:
        cache = getattr(getattr(manager, "batch_processor", None), "cache", None)
        info = dict(attn_implementation=getattr(self.model.config, "_attn_implementation", None),
                    page_size=page, requested_kv_tokens=self.kv_tokens,
                    api="continuous_batching_context_manager + add_request(max_new_tokens per request), as "
                        "generate_batch drives it")
        for name in ("num_blocks", "max_batch_tokens", "max_tokens_read", "num_pages"):
            value = getattr(cache, name, None)
            if isinstance(value, int):
                info[f"cache_{name}"] = value
        info.update(flash_attention_packages())
        cfg = getattr(manager, "continuous_batching_config", None)
        for name in ("use_cuda_graph", "use_async_batching", "max_requests_per_batch", "allow_block_sharing"):
            if cfg is not None and hasattr(cfg, name):
                info[name] = repr(getattr(cfg, name))
        return info
