"""The four workloads of the capstone (lesson 10), with lengths that scale with the model's context.

Every length below is stated for a **2,048-token context** (LLaMA-1/2's, and the vLLM paper's ShareGPT numbers)
and multiplied by ``max_model_len / 2048``. The shipped model's context is 512 tokens, so it sees each workload
at a quarter of the size: its "long" chain of thought is a few hundred tokens, where a model with a 32k context
writes thousands. What matters for the engine is the *shape* (short vs long, shared vs not), which scaling keeps.

* ``chat``: ShareGPT-like lengths (the vLLM paper's means, 161 prompt / 338 output tokens, log-normal;
  ``course_lib.experiments.workloads.sharegpt_trace``).
* ``multi-turn``: conversations of ``turns`` turns; each turn sends the whole history again (a 256-token system
  prompt, 64-token user messages, 128-token replies, so turn 4 sends 960 tokens at 2,048) and asks for a
  128-token reply. The replies in the history are scripted (the same trace for every engine), so a turn can
  reuse from the cache what its previous turn *sent*, not what it generated.
* ``long-cot``: long chain-of-thought: a short question (64-192 tokens) and an output that fills 50-90% of the
  rest of the context (reasoning models: thousands of tokens). Decode-heavy, memory grows for a long time.
* ``multimodal``: half the requests are visual questions: ``image_tokens`` stand-in image tokens (random ids,
  LLaVA-NeXT's 2,880 for one high-resolution image in a 4,096-token context, i.e. 70% of the context, scaled)
  + a 32-token question, a 64-token answer; the other half are ShareGPT-like chats. Long prefills among decodes.

All requests arrive at t = 0 (an offline batch: throughput at saturation), greedy, exactly ``max_tokens`` new
tokens each (no stop token: vLLM's benchmarks set ``ignore_eos`` for the same reason).
"""
from __future__ import annotations

import numpy as np

from course_lib.experiments.prefix_workloads import chat_conversations
from course_lib.model.sampling import SamplingParams
from course_lib.experiments.workloads import IMAGE_TOKENS, Trace, _prompt_tokens, multimodal_prompt, sharegpt_trace

REFERENCE_CONTEXT = 2048          # the context the lengths above are stated for
WORKLOADS = ("chat", "multi-turn", "long-cot", "multimodal")


def _scaled(n: int, max_model_len: int) -> int:
    return max(1, round(n * max_model_len / REFERENCE_CONTEXT))


def chat_trace(num_requests: int, max_model_len: int, *, tokenizer=None, vocab_size=None, seed: int = 0) -> Trace:
    trace = sharegpt_trace(num_requests, scale=max_model_len / REFERENCE_CONTEXT, max_len=max_model_len,
                           tokenizer=tokenizer, vocab_size=vocab_size, seed=seed)
    trace.description = "chat: " + trace.description
    return trace


def multi_turn_trace(num_requests: int, max_model_len: int, *, turns: int = 4, tokenizer=None, vocab_size=None,
                     seed: int = 0) -> Trace:
    """``num_requests // turns`` conversations (at least 1), their turns round by round."""
    system, user, reply = (_scaled(n, max_model_len) for n in (256, 64, 128))
    if system + turns * user + turns * reply > max_model_len:
        raise ValueError(f"{turns} turns do not fit the context of {max_model_len} tokens")
    convs = chat_conversations(max(1, num_requests // turns), turns, system_len=system, user_len=user,
                               reply_len=reply, tokenizer=tokenizer, vocab_size=vocab_size, seed=seed)
    prompts = [c.prompt(t) for t in range(turns) for c in convs]
    return Trace(prompts, [SamplingParams(max_tokens=reply)] * len(prompts), [0.0] * len(prompts),
                 f"multi-turn: {len(convs)} conversations x {turns} turns (system {system}, user {user}, reply "
                 f"{reply} tokens; prompts {min(map(len, prompts))}-{max(map(len, prompts))} tokens)")


def long_cot_trace(num_requests: int, max_model_len: int, *, tokenizer=None, vocab_size=None, seed: int = 0) -> Trace:
    rng = np.random.default_rng(seed)
    prompt_lens = rng.integers(_scaled(64, max_model_len), _scaled(192, max_model_len) + 1, num_requests)
    room = max_model_len - prompt_lens - 1
    output_lens = np.maximum(1, (room * rng.uniform(0.5, 0.9, num_requests)).astype(int))
    prompts = _prompt_tokens(prompt_lens.tolist(), tokenizer, vocab_size, seed)
    return Trace(prompts, [SamplingParams(max_tokens=int(o)) for o in output_lens], [0.0] * num_requests,
                 f"long-cot: {num_requests} short questions (mean {prompt_lens.mean():.0f} tokens), long answers "
                 f"(mean {output_lens.mean():.0f}, max {output_lens.max()} tokens)")


def multimodal_trace(num_requests: int, max_model_len: int, *, tokenizer=None, vocab_size=None,
                     seed: int = 0) -> Trace:
    """Every other request is an image + question (the even ones), the rest ShareGPT-like chats."""
    image = round(IMAGE_TOKENS["llava-next (672 px, anyres)"] / 4096 * max_model_len)
    question, answer = _scaled(32, max_model_len), _scaled(64, max_model_len)
    vocab = vocab_size if vocab_size is not None else tokenizer.vocab_size
    chats = chat_trace(num_requests, max_model_len, tokenizer=tokenizer, vocab_size=vocab_size, seed=seed)
    questions = _prompt_tokens([question] * num_requests, tokenizer, vocab_size, seed + 7)
    prompts, params = [], []
    for i in range(num_requests):
        if i % 2 == 0:
            prompts.append(multimodal_prompt(image, questions[i], vocab_size=vocab, seed=seed + i))
            params.append(SamplingParams(max_tokens=answer))
        else:
            prompts.append(chats.prompts[i])
            params.append(chats.params[i])
    return Trace(prompts, params, [0.0] * num_requests,
                 f"multimodal: {(num_requests + 1) // 2} visual questions ({image} image + {question} question "
                 f"tokens, {answer}-token answers) among {num_requests // 2} chats")


def capstone_workloads(num_requests: int, max_model_len: int, *, names=WORKLOADS, tokenizer=None,
                       vocab_size: int | None = None, seed: int = 0) -> dict[str, Trace]:
    """The workloads ``names`` (default all four), ``num_requests`` requests each (multi-turn: rounded down to
    whole conversations), lengths scaled to ``max_model_len``. Prompts are corpus text with a tokenizer, else
    random ids below ``vocab_size``."""
    makers = dict(chat=chat_trace, **{"multi-turn": multi_turn_trace, "long-cot": long_cot_trace},
                  multimodal=multimodal_trace)
    unknown = [n for n in names if n not in makers]
    if unknown:
        raise ValueError(f"unknown workload(s) {unknown}; choose from {WORKLOADS}")
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    return {n: makers[n](num_requests, max_model_len, tokenizer=tokenizer, vocab_size=vocab_size, seed=seed)
            for n in names}
