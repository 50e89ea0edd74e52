"""Checks of lesson 01 (the KV cache): its size, writing into it, decoding with it, and the FLOPs it saves.

Each check runs the learner's code on the smallest cases first and stops at the first failure with the case,
expected vs got, and a hint aimed at the usual mistake (recognised from the wrong value where possible).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch

from course_lib.model.config import PRESETS, ModelConfig
from course_lib.analysis.flops import attention_pairs, decode_step_flops, linear_params_per_layer
from course_lib.grading.core import Checker, CheckResult
from course_lib.grading.remote import run_beside
from course_lib.model.kv_cache import KVCache, kv_cache_bytes

_TINY = ModelConfig()  # the shape of the shipped tiny models: L=6, E=256, Hq=8, Hkv=4, D=32, V=2048
_MQA = dataclasses.replace(PRESETS["llama-2-7b"], num_key_value_heads=1)  # a hypothetical multi-query 7B
_CONFIGS = [("tiny (L=6, Hq=8, Hkv=4, D=32)", _TINY), ("llama-2-7b (MHA)", PRESETS["llama-2-7b"]),
            ("llama-2-13b (MHA)", PRESETS["llama-2-13b"]), ("llama-3-8b (GQA, Hkv=8)", PRESETS["llama-3-8b"]),
            ("llama-2-70b (GQA, Hkv=8)", PRESETS["llama-2-70b"]), ("qwen2-7b (GQA, Hkv=4)", PRESETS["qwen2-7b"]),
            ("llama-2-7b as MQA (Hkv=1)", _MQA), ("qwen3-0.6b (D=128, not E/Hq=64)", PRESETS["qwen3-0.6b"])]


def _diagnose(got, candidates: dict[str, float], default: str) -> str:
    """The hint of the first known mistake whose value matches `got`, else `default`."""
    if isinstance(got, (int, float)) and not isinstance(got, bool):
        for hint, value in candidates.items():
            if math.isclose(got, value, rel_tol=1e-9):
                return hint
    return default


# ---------------------------------------------------------------- exercise 1: KV cache size
def check_kv_cache_bytes(student_fn) -> CheckResult:
    """kv_cache_bytes(config, num_tokens, batch_size, bytes_per_element) == 2·L·Hkv·D·tokens·batch·bytes."""
    cases = [(_TINY, "tiny", 1, 1, 4), (_TINY, "tiny", 512, 1, 4), (_TINY, "tiny", 100, 3, 2)]
    cases += [(cfg, name, n, b, e) for name, cfg in _CONFIGS[1:]
              for n, b, e in [(1, 1, 2), (2048, 1, 2), (4096, 16, 2), (4096, 8, 1)]]
    with Checker("kv_cache_bytes", points=1) as c:
        for cfg, name, n, b, e in cases:
            got = student_fn(cfg, n, b, e)
            L, Hq, Hkv, D = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
            want = kv_cache_bytes(cfg, n, b, e)
            hint = _diagnose(got, {   # (first: on Qwen3-0.6B, D = E/Hq would also look like a missing factor 2)
                "use config.head_dim: Qwen3 sets it apart, so hidden_size // num_attention_heads is not D there":
                    2 * L * Hkv * (cfg.hidden_size // Hq) * n * b * e,
                "you forgot the factor 2: the cache holds a key AND a value vector per token, layer and KV head":
                    want / 2,
                "the cache stores num_key_value_heads heads, not num_attention_heads: with GQA several query heads "
                "share one K/V head (that is the whole point of GQA)": 2 * L * Hq * D * n * b * e,
                "every layer has its own keys and values: multiply by num_hidden_layers": 2 * Hkv * D * n * b * e,
                "multiply by bytes_per_element: the answer is in bytes, not elements": 2 * L * Hkv * D * n * b,
                "each sequence of the batch has its own cache: multiply by batch_size": 2 * L * Hkv * D * n * e,
            }, "bytes = 2 (K and V) · num_hidden_layers · num_key_value_heads · head_dim · num_tokens · batch_size "
               "· bytes_per_element")
            c.check_close(got, want, rtol=1e-12, atol=0, hint=hint,
                          case=f"{name}: num_tokens={n}, batch_size={b}, bytes_per_element={e}")
    return c.result


# ---------------------------------------------------------------- exercise 2: writing into the cache
def check_kv_cache_update(student_fn) -> CheckResult:
    """update(cache_k, cache_v, k, v, start) writes k, v [B, Hkv, S, D] into the preallocated buffers
    [B, Hkv, S_max, D] at positions start ... start+S-1, in place, and returns views of the filled part
    (positions 0 ... start+S-1). Each case is a prefill followed by decode steps, as in generation."""
    gen = torch.Generator().manual_seed(1)
    # (B, Hkv, D, S_max, tokens written by each call, dtype): small first; the last one fills the buffer exactly
    cases = [(1, 1, 4, 8, [3, 1, 1], torch.float32), (2, 2, 8, 16, [1, 1, 1, 1], torch.float32),
             (2, 4, 32, 64, [10, 1, 1, 5, 1], torch.float32), (1, 4, 32, 20, [12, 1, 1, 6], torch.float16)]
    with Checker("kv_cache_update", points=2) as c:
        for B, Hkv, D, S_max, steps, dtype in cases:
            cache_k = torch.zeros(B, Hkv, S_max, D, dtype=dtype)
            cache_v = torch.zeros(B, Hkv, S_max, D, dtype=dtype)
            ks, vs, start = [], [], 0
            for call, S in enumerate(steps):
                # As the model makes them: [B, S, Hkv, D] transposed to [B, Hkv, S, D], a non-contiguous view.
                k = torch.randn(B, S, Hkv, D, generator=gen).to(dtype).transpose(1, 2)
                v = torch.randn(B, S, Hkv, D, generator=gen).to(dtype).transpose(1, 2)
                ks, vs = ks + [k], vs + [v]
                end = start + S
                case = (f"B={B}, Hkv={Hkv}, D={D}, S_max={S_max}, {dtype}: call {call + 1} of {steps} tokens, "
                        f"start={start}, k of shape {list(k.shape)}")
                out = student_fn(cache_k, cache_v, k, v, start)
                c.check(isinstance(out, (tuple, list)) and len(out) == 2, case=case, expected="a pair (k_all, v_all)",
                        got=type(out).__name__, hint="return the keys and the values so far: return k_all, v_all")
                want_k, want_v = torch.cat(ks, dim=2), torch.cat(vs, dim=2)
                for got, want, buf, new, name in ((out[0], want_k, cache_k, k, "k"), (out[1], want_v, cache_v, v, "v")):
                    if isinstance(got, torch.Tensor) and got.dim() == 4 and got.shape[2] == S_max != end:
                        hint = (f"return only the filled positions, {name}_all = cache_{name}[:, :, :start + S] (here "
                                f":{end}); the rest of the buffer holds zeros of tokens that do not exist yet, and "
                                "attention would attend to them")
                    elif start > 0 and torch.equal(buf[:, :, :S], new):
                        hint = ("the new tokens landed at position 0: write them after the cached ones, at "
                                "positions start ... start + S - 1")
                    elif (isinstance(got, torch.Tensor) and got.shape == want.shape
                          and torch.equal(got[:, :, start:], want[:, :, start:])):
                        hint = ("the new tokens are right but earlier ones are not: did a call overwrite the cached "
                                "tokens?")
                    else:
                        hint = (f"cache_{name}[:, :, start:start + S] = {name}, then return "
                                f"cache_{name}[:, :, :start + S]")
                    c.check_equal(got, want, case=f"{case}: the returned {name}_all", hint=hint)
                    in_place = torch.equal(buf[:, :, :end], want) and not buf[:, :, end:].any()
                    c.check(in_place, case=f"{case}: the buffer cache_{name} after the call",
                            expected=f"positions 0...{end - 1} hold every {name} written so far, the rest still zeros",
                            got="the buffer differs",
                            hint=f"write into the preallocated buffer itself (cache_{name}[:, :, start:start + S] = "
                            "...): the next call reads it from there, not from a new tensor")
                    shares = got.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
                    c.check(shares, case=f"{case}: the returned {name}_all", expected=f"a view of cache_{name}",
                            got="a new tensor (a copy)", hint=f"slice the buffer, cache_{name}[:, :, :start + S]: a "
                            "copy (torch.cat, .clone()) moves every cached byte again at each decode step")
                start = end
    return c.result


# ---------------------------------------------------------------- exercise 3: the cached decode loop
def _decode_call_problem(step: int, shape: tuple, cache: str, length, prompt_len: int) -> dict | None:
    """What is wrong with forward call ``step`` of a cached decode loop (None: nothing). ``cache`` is "none", "first"
    (the cache of the first call), "other" (another one); ``length``: the cache's length before the call."""
    P = prompt_len
    if step == 0:
        if length == 0 and shape == (1, P):
            return None
        return dict(case="the first call (prefill)", expected=f"input_ids of shape (1, {P}) (the whole prompt) with an "
                    "empty cache", got=f"input_ids of shape {shape} with " + ("no cache" if cache == "none" else
                    f"a cache of {length} tokens"), hint="create cache = KVCache(model.config, 1, len(prompt_ids) + "
                    "max_new_tokens, dtype=model.dtype, device=model.device), then prefill once: "
                    "model(torch.tensor([prompt_ids]), cache=cache)")
    where = f"decode call {step} (after the prefill)"
    if cache != "first":
        return dict(case=where, expected="the same cache as the prefill", got="no cache" if cache == "none" else
                    "another cache", hint="keep one KVCache for the whole generation and pass it to every call: "
                    "model(ids, cache=cache)")
    if shape != (1, 1):
        return dict(case=where, expected="input_ids of shape (1, 1): only the newest token",
                    got=f"input_ids of shape {shape}",
                    hint="the cache already holds the K/V of every earlier token; feeding them again appends them a "
                    "second time (at the wrong positions). Feed [[next_id]]")
    if length != P + step - 1:
        return dict(case=where, expected=f"the cache holds {P + step - 1} tokens before the call",
                    got=f"it holds {length}",
                    hint="the model advances the cache itself (by the number of tokens fed): don't call "
                    "cache.advance() yourself, and don't feed a token twice")
    return None


class _StopDecode(BaseException):
    """Ends the learner's loop at its first wrong call (a BaseException: `except Exception` cannot swallow it)."""


class _UpdateProblem(BaseException):
    """The learner's update returned something attention cannot use: the message says what (ends the loop)."""


class _LearnerUpdate:
    """The learner's ``KVCache`` as the model sees it, its writes done by the learner's
    ``update(cache_k, cache_v, k, v, start)`` on the cache's own buffers instead of ``KVCache.update``."""

    def __init__(self, cache: KVCache, update_fn):
        self.cache, self.update_fn = cache, update_fn

    @property
    def length(self) -> int:
        return self.cache.length

    def attend(self, layer: int, q, k, v):
        from course_lib.model.attention import attention

        start, end = self.cache.length, self.cache.length + k.shape[2]
        got = self.update_fn(self.cache.k[layer], self.cache.v[layer], k, v, start)
        want = (*k.shape[:2], end, k.shape[3])
        if not (isinstance(got, tuple) and len(got) == 2 and all(isinstance(t, torch.Tensor) and tuple(t.shape) == want
                                                                 for t in got)):
            shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in got] \
                if isinstance(got, tuple) else type(got).__name__
            raise _UpdateProblem(f"update(..., start={start}) with k, v {tuple(k.shape)} returned {shapes}: expected "
                                 f"two tensors {want}, the keys and values of positions 0 ... {end - 1}")
        return attention(q, got[0], got[1], causal=True)

    def advance(self, num_tokens: int) -> None:
        self.cache.advance(num_tokens)


class _RecordingModel:
    """Wraps the model and records every forward call: (input shape, which cache, its length before the call).
    It stops the loop at the first call that ``_decode_call_problem`` finds wrong. With ``update_fn``, the model
    writes into the learner's ``KVCache`` through the learner's update."""

    def __init__(self, model, prompt_len: int, update_fn=None):
        self._model, self._P, self._update_fn = model, prompt_len, update_fn
        self.records: list[tuple] = []
        self._first_cache = None

    def __call__(self, input_ids, *args, **kwargs):
        cache = kwargs.get("cache")
        if not self.records:
            self._first_cache = cache
        which = "none" if cache is None else "first" if cache is self._first_cache else "other"
        shape = tuple(int(n) for n in getattr(input_ids, "shape", ()))
        record = (shape, which, getattr(cache, "length", None))
        self.records.append(record)
        if _decode_call_problem(len(self.records) - 1, *record, self._P):
            raise _StopDecode
        if self._update_fn is not None and isinstance(cache, KVCache):
            kwargs = {**kwargs, "cache": _LearnerUpdate(cache, self._update_fn)}
        return self._model(input_ids, *args, **kwargs)

    forward = __call__

    def __getattr__(self, name):  # config, device, dtype, parameters(), ...
        return getattr(self._model, name)


@functools.lru_cache(maxsize=1)
def _float32_target():
    from course_lib.model.checkpoint import load_tiny

    # float32: with bf16 (the GPU default) the cached and uncached paths round differently and may flip a near-tie.
    return load_tiny("target", dtype=torch.float32)


def record_decode(student_fn, prompt: list[int], max_new_tokens: int, update_fn=None):
    """Run the learner's loop on a recording model: ``(returned tokens or None if stopped, call records)``, and with
    ``update_fn`` (the learner's update, writing into the loop's KVCache) a third item: what was wrong with what
    update returned, or None. Runs where the learner's functions live (the grader runs it in the notebook's kernel)."""
    recorder = _RecordingModel(_float32_target()[0], len(prompt), update_fn)
    problem = None
    try:
        got = student_fn(recorder, list(prompt), max_new_tokens)
    except _StopDecode:
        got = None
    except _UpdateProblem as err:
        got, problem = None, str(err)
    return (got, recorder.records) if update_fn is None else (got, recorder.records, problem)


def check_cached_greedy_decode(student_fn, update_fn=None) -> CheckResult:
    """cached_greedy_decode(model, prompt_ids, max_new_tokens) returns the same tokens as greedy decoding without
    a cache, on the shipped tiny model (in float32), and does it the cached way: one prefill call with the whole
    prompt and an empty cache, then exactly one call per further token, feeding only that token. Then, with
    ``update_fn`` (exercise 2's update; the notebook passes it), the same loop runs again with the model writing
    every layer's K/V into the loop's KVCache through that update, and must give the same tokens: the two pieces
    together decode the shipped model."""
    from course_lib.model.generate import greedy_generate

    model, tok = _float32_target()
    prompts = [("And", 1), ("And", 6), ("In the beginning God created", 20),
               ("1 In the beginning God created the heaven and the earth.\n2 And the earth was", 60)]
    with Checker("cached_greedy_decode", points=3, timeout_s=90) as c:
        for text, n in prompts:
            prompt = tok.encode(text)
            P = len(prompt)
            case = f"prompt {text!r} ({P} token{'s' * (P > 1)}), max_new_tokens={n}"
            got, records = run_beside(student_fn, "course_lib.grading.lesson01:record_decode", student_fn, prompt, n)
            for step, record in enumerate(records):
                problem = _decode_call_problem(step, *record, P)
                if problem:
                    c.check(False, **{**problem, "case": f"{case}: {problem['case']}"})
            c.check(len(records) == n, case=case, expected=f"{n} model call(s): 1 prefill + {n - 1} decode step(s)",
                    got=f"{len(records)} call(s)", hint="call the model object passed in, model(ids, cache=cache). "
                    "The prefill already yields the first new token and each later call one more; the last token is "
                    "never fed back (there is nothing left to predict)")
            c.check(isinstance(got, list) and len(got) == n and all(isinstance(t, int) for t in got), case=case,
                    expected=f"a list of {n} ints (the new tokens, prompt excluded)",
                    got=f"{type(got).__name__} {str(got)[:80]}",
                    hint="return the generated ids as a list of Python ints: int(logits[0, -1].argmax())")
            want = greedy_generate(model, prompt, n, use_cache=False)
            first_bad = next((i for i, (g, w) in enumerate(zip(got, want)) if g != w), None)
            hint = ("greedy = the argmax of the LAST position's logits, logits[0, -1]" if first_bad == 0 else
                    f"token {first_bad} is the first to differ: feed the token you just chose, and append it to the "
                    "output")
            c.check_equal(got, want, case=f"{case}: tokens vs greedy_generate(model, prompt, {n}, use_cache=False)",
                          hint=hint)
        if update_fn is not None:   # the last, longest case again (text, n, want from the loop): n - 1 decode steps
            prompt = tok.encode(text)
            c.case = (f"prompt {text!r} ({len(prompt)} tokens), max_new_tokens={n}, your cached_greedy_decode with "
                      "the model writing K/V through your update")
            try:
                got, _, problem = run_beside(student_fn, "course_lib.grading.lesson01:record_decode", student_fn,
                                             prompt, n, update_fn)
            except NotImplementedError as err:
                raise NotImplementedError(f"Exercise: your cached_greedy_decode passes with the library's cache; this "
                                          f"check then runs it with your update (exercise 2) writing the K/V: finish "
                                          f"exercise 2 first ({err})") from None
            if problem:
                c.check(False, expected="keys and values attention can use", got=problem,
                        hint="return views of the filled part, cache_k[:, :, :start + S] and cache_v[:, :, :start + S]")
            c.check_equal(got, want, case=f"{c.case}: tokens vs greedy_generate(model, prompt, {n}, use_cache=False)",
                          hint="your loop decodes right with the library's KVCache.update, with your update the "
                          "tokens change: it must write k and v INTO cache_k and cache_v (in place) at positions "
                          "start ... start + S - 1, keys into cache_k, and return everything up to there")
    return c.result


# ---------------------------------------------------------------- exercise 4: FLOPs per decode step
def check_decode_step_flops(student_fn) -> CheckResult:
    """decode_step_flops(config, position, use_cache) == the matmul FLOPs of
    course_lib.analysis.flops.decode_step_flops."""
    cases = [(name, cfg, p, use) for name, cfg in _CONFIGS for p in (0, 1, 10, 2047) for use in (True, False)
             if p < cfg.max_position_embeddings]
    with Checker("decode_step_flops", points=2) as c:
        for name, cfg, p, use_cache in cases:
            got = student_fn(cfg, p, use_cache)
            want = decode_step_flops(cfg, p, use_cache)
            L, Hq, Hkv, D = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
            E, V, T = cfg.hidden_size, cfg.vocab_size, 1 if use_cache else p + 1  # T: tokens through the layers
            linear, head = 2 * T * L * linear_params_per_layer(cfg), 2 * E * V
            pairs = attention_pairs(1, p) if use_cache else attention_pairs(p + 1)
            attn = 4 * L * Hq * D * pairs
            mha_linear = 2 * T * L * linear_params_per_layer(dataclasses.replace(cfg, num_key_value_heads=Hq))
            hint = _diagnose(got, {
                "attention runs for every QUERY head (Hq), each over its group's shared keys: count Hq, not Hkv":
                    linear + head + attn * Hkv // Hq,
                "k_proj and v_proj have Hkv·D outputs, not E (GQA shrinks them too)": mha_linear + head + attn,
                "you left out attention: Q·Kᵀ and P·V are 2·2·D FLOPs per (query, key) pair, layer and query head":
                    linear + head,
                "generation computes logits of the last position only (last_token_only=True): lm_head on 1 token":
                    linear + 2 * T * E * V + attn,
                "the attention is causal: token i sees i + 1 keys, (p+1)(p+2)/2 pairs in all, not (p+1)²":
                    linear + head + 4 * L * Hq * D * (p + 1) ** 2,
                "a token attends to itself too: the new token sees position + 1 keys, not position":
                    linear + head + 4 * L * Hq * D * (pairs - T),
                "a matmul [M, K] @ [K, N] is 2·M·N·K FLOPs (multiply AND add)": want / 2,
                "use config.head_dim: Qwen3 sets it apart, so hidden_size // num_attention_heads is not D there":
                    decode_step_flops(dataclasses.replace(cfg, head_dim=E // Hq), p, use_cache),
                "q_proj is E -> Hq·D and o_proj Hq·D -> E, not E -> E (Qwen3-0.6B: Hq·D = 2E)":
                    want - 2 * T * L * 2 * E * (Hq * D - E),
            }, "with the cache: 1 token through the layers, attending to position + 1 keys; without: position + 1 "
               "tokens, causal pairs (p+1)(p+2)/2; both: lm_head on the last token only")
            c.check_close(got, want, rtol=1e-12, atol=0, hint=hint,
                          case=f"{name}: position={p}, use_cache={use_cache}")
    return c.result
