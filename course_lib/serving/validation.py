"""What a request must be before an engine takes it (lessons 04, 10): shared by ``LLMEngine`` (``add_request``
raises the ``ValueError``; ``generate`` puts it on the bad request's output and serves the others), the static
baseline (``course_lib.serving.static_batching``) and the ``transformers`` one (``course_lib.serving.hf_baseline``).

* ``check_call``: misuse of a whole ``generate`` call (prompts not a list, a params list of the wrong length, bad
  arrival times) raises ``TypeError`` / ``ValueError`` before anything runs;
* ``check_request``: one request (its ``check_prompt`` and ``check_params``): an empty prompt, one that fills the
  model's context, a token id that is not an integer (``1.7`` is not token 1) or lies outside the vocabulary (the
  error names its position, ``prompt[3]``), invalid sampling parameters (a NaN temperature, a seed outside
  [0, 2**63 - 1], an unknown key in a params dict) give a ``ValueError`` naming the request and the field;
* ``check_fits_cache``: a request that could not fit the KV cache even alone (it would never finish).
"""
from __future__ import annotations

import difflib
import numbers
from dataclasses import fields

import torch

from course_lib.model.sampling import SamplingParams


def check_call(prompts, params, arrival_times) -> tuple[list, list, list[float]]:
    """Whole-call misuse raises before anything runs: (prompts, one params entry per prompt, arrival times)."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a list of prompts (token-id lists or strings), got {type(prompts).__name__}")
    if params is None or isinstance(params, (SamplingParams, dict)):
        params = [params] * len(prompts)
    elif not isinstance(params, (list, tuple)) or len(params) != len(prompts):
        length = f" of length {len(params)}" if hasattr(params, "__len__") else ""
        raise ValueError(f"params must be one SamplingParams or a list of one per prompt ({len(prompts)}), got "
                         f"{type(params).__name__}{length}")
    if arrival_times is None:
        arrival_times = [0.0] * len(prompts)
    arrival_times = [float(a) for a in arrival_times]
    if len(arrival_times) != len(prompts) or any(not a >= 0 for a in arrival_times):
        raise ValueError(f"arrival_times must hold one time >= 0 (s) per prompt ({len(prompts)} prompts)")
    return list(prompts), list(params), arrival_times


def check_step_time(step_time) -> float | None:
    """None (the replay clock advances by each step's measured time) or a positive number of seconds per step (a
    modeled clock: the same arrivals meet the same steps on any machine, busy or not). ValueError otherwise."""
    if step_time is None:
        return None
    if isinstance(step_time, bool) or not isinstance(step_time, (int, float)) or not 0 < step_time < float("inf"):
        raise ValueError(f"step_time must be None or a positive number of seconds per step, got {step_time!r}")
    return float(step_time)


PARAM_NAMES = tuple(f.name for f in fields(SamplingParams))


def check_params(params) -> SamplingParams:
    """SamplingParams from None (the defaults), a SamplingParams or a dict of its fields; a ValueError names an
    unknown key (``SamplingParams(**params)`` would raise a TypeError, which sank the whole call)."""
    if params is None:
        return SamplingParams()
    if isinstance(params, SamplingParams):
        return params
    if not isinstance(params, dict):
        raise ValueError(f"params: expected SamplingParams or a dict, got {type(params).__name__}")
    for key in params:
        if key not in PARAM_NAMES:
            near = difflib.get_close_matches(str(key), PARAM_NAMES, n=1)
            raise ValueError(f"params: unknown key {key!r}" + (f" (did you mean {near[0]!r}?)" if near else "")
                             + f"; SamplingParams has {', '.join(PARAM_NAMES)}")
    return SamplingParams(**params)                  # raises ValueError naming the bad field


def check_prompt(prompt, vocab_size: int, tokenizer=None) -> list[int]:
    """The token ids of a prompt: a string (encoded by the tokenizer), a list / tuple / array of ints, or a 1-D
    integer tensor. Each id must be an integer in [0, vocab_size): ``1.7`` is refused, never truncated to 1."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("prompt: a string prompt needs a tokenizer (LLMEngine(..., tokenizer=...))")
        prompt = tokenizer.encode(prompt)
    if isinstance(prompt, torch.Tensor):
        if prompt.dim() != 1 or prompt.is_floating_point() or prompt.is_complex() or prompt.dtype == torch.bool:
            raise ValueError(f"prompt: a tensor of token ids must be 1-D with an integer dtype, got shape "
                             f"{tuple(prompt.shape)} and dtype {prompt.dtype}")
        prompt = prompt.tolist()
    try:
        ids = list(prompt)
    except TypeError:
        raise ValueError(f"prompt: expected a string or a list of token ids, got {type(prompt).__name__}") from None
    if not ids:
        raise ValueError("prompt: it is empty; generation needs at least one token to condition on")
    for pos, t in enumerate(ids):
        if not isinstance(t, numbers.Integral) or isinstance(t, bool):
            raise ValueError(f"prompt[{pos}] = {t!r} is not an integer token id ({type(t).__name__})")
        if not 0 <= t < vocab_size:
            raise ValueError(f"prompt[{pos}] = {t} is outside the vocabulary [0, {vocab_size})")
    return [int(t) for t in ids]


def check_request(request_id, prompt, params, *, vocab_size: int, max_model_len: int, tokenizer=None):
    """(prompt token ids, SamplingParams, None) for a valid request, else (..., a ValueError naming the request
    and the field: the request's output carries it, the other requests are served)."""
    prompt_ids = []
    try:
        params = check_params(params)
        prompt_ids = check_prompt(prompt, vocab_size, tokenizer)
        if len(prompt_ids) >= max_model_len:
            raise ValueError(f"prompt: {len(prompt_ids)} tokens, but the model's context is {max_model_len} tokens: "
                             "no room to generate")
    except ValueError as err:
        err.args = (f"request {request_id}: {err.args[0]}",)
        return prompt_ids, params, err
    return prompt_ids, params, None


def check_fits_cache(request_id, prompt_len: int, params: SamplingParams, *, block_size: int, max_model_len: int,
                     max_blocks: int, num_blocks: int) -> ValueError | None:
    """A ValueError if the sequence could not fit the KV cache even alone (``max_blocks``: what one sequence may
    use when it has the cache to itself), else None."""
    total = min(prompt_len + params.max_tokens, max_model_len)
    need = -(-total // block_size)
    if need > max_blocks:
        return ValueError(f"request {request_id}: max_tokens: prompt ({prompt_len}) + max_tokens ({params.max_tokens}) "
                          f"need {need} KV blocks, more than the {max_blocks} one sequence may use "
                          f"(num_blocks={num_blocks}): lower max_tokens or add blocks")
    return None
