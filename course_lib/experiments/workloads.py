"""Request traces for serving experiments (lesson 04): who arrives when, with how long a prompt and output.

* **Arrivals**: a Poisson process (independent users: exponential gaps with mean 1/rate), the standard
  assumption of serving benchmarks (vLLM's ``benchmark_serving.py --request-rate``); ``rate=inf`` makes every
  request arrive at time 0 (an offline batch: throughput at saturation).
* **Lengths**: ShareGPT-like, from lesson 02 (``course_lib.paging.waste.SHAREGPT``: the vLLM paper's published means,
  161.31 prompt and 337.99 output tokens, log-normal with sigma = 1 assumed), multiplied by ``scale`` so that
  they fit the course model's 512-token context and a CPU's time (``scale=0.25``: means 40 and 84 tokens).
  Outputs have exactly the sampled length: no stop token (vLLM's benchmarks set ``ignore_eos`` for the same
  reason), so both engines compute the same tokens.
* **Prompts** are windows of the validation text of the course's corpus (never trained on), or random token ids.
* **A multimodal-style long prompt**: a vision-language model turns an image into a block of tokens before the
  text: LLaVA-1.5 uses (336 / 14)² = 576 tokens per image, LLaVA-NeXT up to 5 x 576 = 2,880 for one
  high-resolution image. Our model has no vision encoder, so random token ids stand in for the image tokens:
  the cost of prefilling them depends only on how many there are.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import numpy as np

from course_lib.paging.waste import SHAREGPT, sample_request_lengths
from course_lib.model.sampling import SamplingParams

#: Image tokens of common vision-language models (per image).
IMAGE_TOKENS = {"llava-1.5 (336 px)": 576, "llava-next (672 px, anyres)": 2880}


@dataclass
class Trace:
    """Requests with arrival times (s). ``prompts``, ``params`` and ``arrival_times`` are what
    ``LLMEngine.generate`` / ``StaticBatchEngine.generate`` take."""

    prompts: list[list[int]]
    params: list[SamplingParams]
    arrival_times: list[float]
    description: str = ""

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def prompt_lens(self) -> np.ndarray:
        return np.array([len(p) for p in self.prompts])

    @property
    def output_lens(self) -> np.ndarray:
        return np.array([p.max_tokens for p in self.params])


def poisson_arrivals(num_requests: int, rate: float, seed: int = 0) -> np.ndarray:
    """Arrival times (s) of a Poisson process with ``rate`` requests/s, the first at 0; all 0 for rate=inf."""
    if not rate > 0:
        raise ValueError(f"rate must be > 0 requests/s (or inf), got {rate!r}")
    if np.isinf(rate):
        return np.zeros(num_requests)
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, num_requests)
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])])


def _prompt_tokens(lengths, tokenizer, vocab_size: int | None, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed + 1)
    if tokenizer is not None:
        from course_lib.model.corpus import load_text

        text_ids = tokenizer.encode(load_text("validation"))
        starts = rng.integers(0, len(text_ids) - max(lengths) - 1, len(lengths))
        return [text_ids[s:s + n] for s, n in zip(starts, lengths)]
    if vocab_size is None:
        raise ValueError("pass a tokenizer (prompts from the corpus) or vocab_size (random token ids)")
    return [rng.integers(1, vocab_size, n).tolist() for n in lengths]


def sharegpt_trace(num_requests: int, *, rate: float = float("inf"), scale: float = 0.25, max_len: int = 512,
                   tokenizer=None, vocab_size: int | None = None, seed: int = 0) -> Trace:
    """ShareGPT-like lengths (lesson 02's distribution, means multiplied by ``scale``, prompt + output <=
    max_len), Poisson arrivals at ``rate`` requests/s, greedy decoding of exactly the sampled output length."""
    prompt, output = sample_request_lengths(num_requests, prompt_mean=SHAREGPT["prompt_mean"] * scale,
                                            output_mean=SHAREGPT["output_mean"] * scale, max_len=max_len, seed=seed)
    prompts = _prompt_tokens(prompt.tolist(), tokenizer, vocab_size, seed)
    return Trace(prompts, [SamplingParams(max_tokens=int(o)) for o in output],
                 poisson_arrivals(num_requests, rate, seed).tolist(),
                 f"{num_requests} ShareGPT-like requests (means x {scale}: prompt {prompt.mean():.0f}, output "
                 f"{output.mean():.0f} tokens), "
                 + ("all arriving at t = 0" if rate == float("inf") else f"Poisson arrivals at {rate:g} req/s"))


def nanovllm_trace(num_requests: int = 256, max_model_len: int = 2048, *, vocab_size: int = 10001, seed: int = 0,
                   max_output: int | None = None) -> Trace:
    """nano-vllm's benchmark (its ``bench.py``): ``num_requests`` prompts of random ids (0-10000), prompts and outputs
    uniform in 100-1024 tokens, drawn by Python's ``random`` seeded with ``seed`` in nano-vllm's order (every prompt,
    then every output length), so that seed 0 gives its very lengths. nano-vllm samples at temperature 0.6 with
    ``ignore_eos``; here decoding is greedy (the baselines' mode) and every request gets exactly its output length.
    A context under 2,048 tokens scales both ranges by ``max_model_len / 2048`` (the tiny model: 25-256);
    ``max_output`` caps the outputs (a quick CPU run)."""
    import random

    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    scale = min(1.0, max_model_len / 2048)
    lo, hi = max(1, round(100 * scale)), max(1, round(1024 * scale))
    rng, top = random.Random(seed), min(10000, vocab_size - 1)
    prompts = [[rng.randint(0, top) for _ in range(rng.randint(lo, hi))] for _ in range(num_requests)]
    outputs = [rng.randint(lo, hi) for _ in range(num_requests)]
    if max_output is not None:
        outputs = [min(o, max_output) for o in outputs]
    outputs = [min(o, max_model_len - len(p)) for p, o in zip(prompts, outputs)]   # scaled: prompt + output fit
    return Trace(prompts, [SamplingParams(max_tokens=o) for o in outputs], [0.0] * num_requests,
                 f"nano-vllm: {num_requests} requests, prompts and outputs uniform in {lo}-{hi} tokens"
                 + (f" (outputs capped at {max_output})" if max_output is not None else "")
                 + f", random ids, greedy, EOS ignored, all at t = 0 (seed {seed})")


def uniform_trace(num_requests: int, prompt_len: int, output_len: int, *, rate: float = float("inf"),
                  tokenizer=None, vocab_size: int | None = None, seed: int = 0) -> Trace:
    """Every request with the same prompt and output length (where static batching wastes nothing)."""
    prompts = _prompt_tokens([prompt_len] * num_requests, tokenizer, vocab_size, seed)
    return Trace(prompts, [SamplingParams(max_tokens=output_len)] * num_requests,
                 poisson_arrivals(num_requests, rate, seed).tolist(),
                 f"{num_requests} requests of exactly {prompt_len} prompt + {output_len} output tokens")


def multimodal_prompt(num_image_tokens: int = 2880, question: list[int] | None = None, *, vocab_size: int,
                      seed: int = 0) -> list[int]:
    """A long prompt shaped like an image + a question: ``num_image_tokens`` stand-in image tokens (random ids),
    then the question's tokens."""
    rng = np.random.default_rng(seed)
    return rng.integers(1, vocab_size, num_image_tokens).tolist() + list(question or [])


def long_prompt_trace(num_decoders: int, decode_len: int, long_prompt: list[int], *, short_prompt_len: int = 16,
                      long_max_tokens: int = 8, long_arrival: float = 1e-6, tokenizer=None,
                      vocab_size: int | None = None, seed: int = 0) -> Trace:
    """``num_decoders`` short requests that decode ``decode_len`` tokens each (all arrive at 0) and one long
    prompt that arrives just after they started (at ``long_arrival`` s): the long prefill lands in the middle
    of their decoding. The long request is the last one."""
    prompts = _prompt_tokens([short_prompt_len] * num_decoders, tokenizer, vocab_size, seed) + [list(long_prompt)]
    params = [SamplingParams(max_tokens=decode_len)] * num_decoders + [SamplingParams(max_tokens=long_max_tokens)]
    return Trace(prompts, params, [0.0] * num_decoders + [long_arrival],
                 f"{num_decoders} requests decoding {decode_len} tokens + one {len(long_prompt)}-token prompt")


def with_context_length(model, max_position_embeddings: int):
    """The same model (shared weights) with a longer context limit, for timing long prompts. RoPE computes any
    position, but a model trained on 512 tokens writes nonsense past them: use it to measure cost, not text."""
    longer = copy.copy(model)                 # a shallow copy: same parameters, same modules
    longer.config = dataclasses.replace(model.config, max_position_embeddings=max_position_embeddings)
    return longer
