"""vLLM's engine API on ``LLMEngine`` (issue 17, part 3): ``add_request`` / ``step`` / ``has_unfinished_requests`` /
``abort_request``; ``generate`` as a loop over them; ``EngineConfig`` (every knob in one validated dataclass);
one caller at a time, across all four calls."""
from __future__ import annotations

import math
import threading
from dataclasses import FrozenInstanceError, replace

import pytest

import course_lib  # noqa: F401  (resolves the device before anything imports triton)
from course_lib.model.generate import greedy_generate
from course_lib.model.sampling import SamplingParams
from course_lib.serving.config import CONFIG_FIELDS, EngineConfig
from course_lib.serving.engine import LLMEngine
from course_lib.serving.model_runner import ModelRunner
from conftest import hold_in_execute
from test_engine import MICRO, assert_all_blocks_free

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py

SMALL = dict(block_size=4, num_blocks=16, max_num_seqs=4)


def greedy(prompt, n):
    return greedy_generate(MICRO, prompt, n, use_cache=False)


def drain(engine: LLMEngine) -> tuple[dict, list[list]]:
    """Step until done: each request's final output, and what every step returned (request id, tokens, finished)."""
    final, log = {}, []
    while engine.has_unfinished_requests():
        outs = engine.step()
        log.append([(o.request_id, list(o.token_ids), o.finished) for o in outs])
        final.update({o.request_id: o for o in outs if o.finished})
    return final, log


# ---------------------------------------------------------------- the step loop
def test_requests_added_by_hand_progress_step_by_step_and_a_third_joins_mid_way():
    engine = LLMEngine(MICRO, **SMALL)
    assert not engine.has_unfinished_requests() and engine.step() == []
    engine.add_request("a", [1, 2, 3], SamplingParams(max_tokens=5))
    engine.add_request("b", [4, 5], dict(max_tokens=3))
    assert engine.has_unfinished_requests()
    first = engine.step()                                   # both prompts prefilled in one step: a token each
    assert [(o.request_id, len(o.token_ids), o.finished) for o in first] == [("a", 1, False), ("b", 1, False)]
    engine.add_request("c", [6, 7, 8, 9], SamplingParams(max_tokens=2))   # joins the running batch
    second = engine.step()
    assert {o.request_id: len(o.token_ids) for o in second} == {"a": 2, "b": 2, "c": 1}
    assert len(engine.scheduler.running) == 3
    final, log = drain(engine)
    want = {"a": greedy([1, 2, 3], 5), "b": greedy([4, 5], 3), "c": greedy([6, 7, 8, 9], 2)}
    assert {rid: o.token_ids for rid, o in final.items()} == want
    assert all(o.outputs[0].finish_reason == "length" and o.metrics.ttft is not None for o in final.values())
    # each step reports the tokens so far; a request is reported finished once, then leaves the engine
    assert [rid for step in log for rid, _, done in step if done] == ["b", "c", "a"]
    assert log[-1] == [("a", want["a"], True)]
    assert not engine.has_unfinished_requests() and engine.step() == [] and engine.abort_request("a") is None
    assert_all_blocks_free(engine)


def test_a_step_reports_only_the_requests_that_gained_tokens():
    """A prompt chunk that produces no token yet is not reported (chunked prefill, budget 4 tokens per step)."""
    engine = LLMEngine(MICRO, block_size=4, num_blocks=16, max_num_seqs=2, max_num_batched_tokens=4)
    engine.add_request(0, list(range(1, 11)), SamplingParams(max_tokens=2))   # 10 prompt tokens: 3 chunks
    assert engine.step() == [] and engine.step() == []
    out = engine.step()
    assert [(o.request_id, o.token_ids) for o in out] == [(0, greedy(list(range(1, 11)), 1))]
    assert engine.last_step.composition == [(0, 2)]


def test_generate_is_the_step_loop():
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10], [11]]
    params = [SamplingParams(max_tokens=n) for n in (6, 3, 5, 4)]
    by_hand = LLMEngine(MICRO, **SMALL)
    for i, (p, sp) in enumerate(zip(prompts, params)):
        by_hand.add_request(i, p, sp)
    final, log = drain(by_hand)
    engine = LLMEngine(MICRO, **SMALL)
    outs = engine.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in outs] == [final[i].token_ids for i in range(4)] == [
        greedy(p, sp.max_tokens) for p, sp in zip(prompts, params)]
    assert all(o.finished for o in outs) and len(engine.metrics.steps) == len(log)


def test_a_request_that_arrives_later_waits_and_an_idle_step_jumps_the_clock():
    engine = LLMEngine(MICRO, **SMALL)
    engine.add_request("late", [1, 2], SamplingParams(max_tokens=2), arrival_time=5.0)
    out = engine.step()                                     # nothing else to do: the clock jumps to 5 s
    assert engine.clock > 5.0 and [o.request_id for o in out] == ["late"]
    assert out[0].metrics.first_scheduled_time == 5.0 and out[0].metrics.arrival_time == 5.0


def test_seeded_sampling_through_the_step_api_equals_generate():
    params = SamplingParams(temperature=1.0, max_tokens=6, seed=11, n=2)
    engine = LLMEngine(MICRO, **SMALL)
    engine.add_request("r", [1, 2, 3], params)
    final, _ = drain(engine)
    want = LLMEngine(MICRO, **SMALL).generate([[1, 2, 3]], params, use_tqdm=False)[0]
    assert [c.token_ids for c in final["r"].outputs] == [c.token_ids for c in want.outputs]


# ---------------------------------------------------------------- abort
@pytest.mark.parametrize("where", ["running", "waiting", "not arrived", "swapped"])
def test_abort_frees_the_blocks_and_the_others_are_served(where):
    kw = dict(block_size=4, max_num_seqs=4)
    if where == "waiting":
        kw.update(max_num_seqs=1, num_blocks=16)
    elif where == "swapped":
        kw.update(num_blocks=8, max_num_batched_tokens=8, preemption_mode="swap")
    else:
        kw.update(num_blocks=16)
    engine = LLMEngine(MICRO, **kw)
    others = {"x": [1, 2, 3], "y": [4, 5, 6, 7, 8]}
    for rid, p in others.items():
        engine.add_request(rid, p, SamplingParams(max_tokens=12))
    engine.add_request("victim", [9, 10, 11], SamplingParams(max_tokens=12),
                       arrival_time=100.0 if where == "not arrived" else None)
    for _ in range(8 if where == "swapped" else 2):
        engine.step()
        if where == "swapped" and engine.scheduler.swapped:
            break
    victim = next(s for s in [*engine.scheduler.running, *engine.scheduler.waiting, *engine.scheduler.swapped]
                  if s.request_id == "victim") if where != "not arrived" else None
    if victim is not None:
        assert victim.status == where, (victim.status, where)
    out = engine.abort_request("victim")
    assert out.finished and out.request_id == "victim"
    assert [c.finish_reason for c in out.outputs] == ["abort"]
    assert engine.abort_request("victim") is None                         # gone: a second abort is a no-op
    final, _ = drain(engine)
    assert {rid: o.token_ids for rid, o in final.items()} == {rid: greedy(p, 12) for rid, p in others.items()}
    assert_all_blocks_free(engine)


# ---------------------------------------------------------------- bad requests
@pytest.mark.parametrize("prompt, params, words", [
    ([1.7, 2], None, ["prompt[0]", "integer"]),
    ([3, 64], None, ["prompt[1]", "vocabulary"]),
    ([], None, ["prompt", "empty"]),
    ([1, 2], dict(max_tokens=3, temprature=1.0), ["temprature", "temperature"]),
    ([1, 2], dict(max_tokens=3, temperature=math.nan), ["temperature"]),
    ([1, 2], SamplingParams(max_tokens=60), ["max_tokens", "KV blocks"]),   # more than the cache holds
])
def test_add_request_raises_a_value_error_naming_the_field(prompt, params, words):
    engine = LLMEngine(MICRO, block_size=4, num_blocks=8, max_num_seqs=2)
    with pytest.raises(ValueError) as err:
        engine.add_request("r7", prompt, params)
    assert str(err.value).startswith("request r7: ") and all(w in str(err.value) for w in words), str(err.value)
    assert not engine.has_unfinished_requests()


def test_a_request_id_in_use_and_a_bad_arrival_time_are_refused():
    engine = LLMEngine(MICRO, **SMALL)
    engine.add_request(1, [1, 2], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="request_id"):
        engine.add_request(1, [3, 4], SamplingParams(max_tokens=2))
    for bad in (-1.0, math.nan, "soon", True):
        with pytest.raises(ValueError, match="arrival_time"):
            engine.add_request(2, [3, 4], arrival_time=bad)
    final, _ = drain(engine)
    assert list(final) == [1]
    engine.add_request(1, [3, 4], SamplingParams(max_tokens=2))          # finished: its id is free again
    assert drain(engine)[0][1].token_ids == greedy([3, 4], 2)


def test_generate_keeps_one_bad_request_from_sinking_the_batch():
    outs = LLMEngine(MICRO, **SMALL).generate([[1, 2], [1.7], [3, 4]], SamplingParams(max_tokens=3), use_tqdm=False)
    assert outs[0].ok and outs[2].ok and outs[1].finished and "request 1: prompt[0]" in str(outs[1].error)
    assert outs[1].outputs == [] and outs[1].prompt_token_ids == []


def test_generate_needs_an_idle_engine():
    engine = LLMEngine(MICRO, **SMALL)
    engine.add_request("open", [1, 2], SamplingParams(max_tokens=3))
    with pytest.raises(RuntimeError, match="idle"):
        engine.generate([[3, 4]], SamplingParams(max_tokens=2), use_tqdm=False)
    assert engine.has_unfinished_requests()                             # the refused call touched nothing
    drain(engine)
    assert engine.generate([[3, 4]], SamplingParams(max_tokens=2), use_tqdm=False)[0].token_ids == greedy([3, 4], 2)


# ---------------------------------------------------------------- one caller at a time
@pytest.mark.parametrize("busy", ["step", "generate"])
def test_a_second_thread_is_refused_while_one_drives_the_engine(monkeypatch, busy):
    started, release = hold_in_execute(monkeypatch)
    engine = LLMEngine(MICRO, **SMALL)
    result = {}
    if busy == "step":
        engine.add_request(0, [1, 2, 3], SamplingParams(max_tokens=3))
        worker = threading.Thread(target=lambda: result.setdefault("out", engine.step()))
    else:
        worker = threading.Thread(target=lambda: result.setdefault(
            "out", engine.generate([[1, 2, 3]], SamplingParams(max_tokens=3), use_tqdm=False)))
    worker.start()
    assert started.wait(30)
    for call in (engine.step, lambda: engine.add_request(9, [4, 5]), lambda: engine.abort_request(0),
                 lambda: engine.generate([[4, 5]], use_tqdm=False)):
        with pytest.raises(RuntimeError, match=f"LLMEngine.{busy} is already running"):
            call()
    release.set()
    worker.join(30)
    assert result["out"][0].token_ids[:1] == greedy([1, 2, 3], 1)
    final, _ = drain(engine)                                           # the engine goes on, untouched
    assert all(o.token_ids == greedy([1, 2, 3], 3) for o in final.values())
    assert_all_blocks_free(engine)


def test_a_failed_step_drops_the_requests_and_gives_every_block_back(monkeypatch):
    engine = LLMEngine(MICRO, **SMALL)
    for i in range(3):
        engine.add_request(i, [1, 2, 3 + i], SamplingParams(max_tokens=8))
    engine.step()

    def failing_execute(self, chunks):
        raise RuntimeError("CUDA error (simulated)")

    execute = ModelRunner.execute
    monkeypatch.setattr(ModelRunner, "execute", failing_execute)
    with pytest.raises(RuntimeError, match="simulated"):
        engine.step()
    assert not engine.has_unfinished_requests()
    assert_all_blocks_free(engine)
    monkeypatch.setattr(ModelRunner, "execute", execute)
    engine.add_request(0, [1, 2, 3], SamplingParams(max_tokens=4))
    assert drain(engine)[0][0].token_ids == greedy([1, 2, 3], 4)


# ---------------------------------------------------------------- EngineConfig
def test_a_config_and_keywords_build_the_same_engine():
    config = EngineConfig(block_size=4, num_blocks=16, max_num_seqs=4)
    a, b = LLMEngine(MICRO, config=config), LLMEngine(MICRO, **SMALL)
    assert a.config == b.config and a.num_blocks == 16 and a.block_size == 4
    c = LLMEngine(MICRO, config=config, max_num_seqs=2)                 # a keyword overrides the config's field
    assert c.max_num_seqs == 2 and c.config == replace(a.config, max_num_seqs=2)
    prompts, params = [[1, 2, 3], [4, 5]], SamplingParams(max_tokens=4)
    assert [o.token_ids for o in a.generate(prompts, params)] == [o.token_ids for o in c.generate(prompts, params)]


def test_resolve_fills_the_defaults_that_depend_on_the_model():
    config = EngineConfig(block_size=16, max_num_seqs=4)
    assert config.num_blocks is None and config.max_num_batched_tokens is None
    resolved = config.resolve(MICRO)                                     # context 64: 4 blocks of 16 per sequence
    assert (resolved.num_blocks, resolved.max_num_batched_tokens, resolved.num_cpu_blocks) == (16, 512, 0)
    assert EngineConfig(enable_chunked_prefill=False, max_num_seqs=4).resolve(MICRO).max_num_batched_tokens == 64
    assert EngineConfig(preemption_mode="swap", num_blocks=10).resolve(MICRO).num_cpu_blocks == 10
    with pytest.raises(FrozenInstanceError):
        config.block_size = 8
    assert set(CONFIG_FIELDS) >= {"enforce_eager", "gpu_memory_utilization", "num_speculative_tokens"}


@pytest.mark.parametrize("field, value", [
    ("enforce_eager", 1), ("enforce_eager", None), ("gpu_memory_utilization", 0), ("gpu_memory_utilization", 1.5),
    ("gpu_memory_utilization", math.nan), ("gpu_memory_utilization", True), ("gpu_memory_utilization", "0.9"),
    ("block_size", 0), ("num_blocks", 2.0), ("max_num_seqs", True), ("enable_prefix_caching", "yes"),
    ("use_kernels", 0), ("kv_cache_dtype", "int4"), ("seed", 1.5), ("num_speculative_tokens", -1),
    ("speculative_disable_by_batch_size", 4), ("num_cpu_blocks", -1), ("preemption_mode", "drop"),
])
def test_every_field_is_validated_when_the_config_is_built(field, value):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**{field: value})
    with pytest.raises(ValueError, match=field):
        LLMEngine(MICRO, **{field: value})


def test_the_new_fields_take_their_valid_values():
    for u in (0.05, 0.9, 1, 1.0):
        assert EngineConfig(gpu_memory_utilization=u).gpu_memory_utilization == u
    assert LLMEngine(MICRO, enforce_eager=True, gpu_memory_utilization=0.5, **SMALL).config.enforce_eager


def test_model_dependent_checks_stay_in_resolve():
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        EngineConfig(enable_chunked_prefill=False, max_num_batched_tokens=32).resolve(MICRO)
    with pytest.raises(ValueError, match="speculative_model"):
        EngineConfig(num_speculative_tokens=2).resolve(MICRO)


def test_an_unknown_keyword_is_a_type_error_that_suggests_the_field():
    with pytest.raises(TypeError, match="max_num_seq'.*did you mean 'max_num_seqs'"):
        LLMEngine(MICRO, max_num_seq=4)
    with pytest.raises(TypeError, match="EngineConfig"):
        LLMEngine(MICRO, config=dict(max_num_seqs=4))
