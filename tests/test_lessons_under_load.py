"""Counts the lessons assert that a replay's clock could in principle move: they must hold on a machine much slower
or much faster than the one a lesson calibrated on (a busy CPU is a slower machine)."""
import pytest
import torch

from course_lib.serving.engine import LLMEngine
from course_lib.analysis.roofline import time_fn
from course_lib.serving.static_batching import StaticBatchEngine
from course_lib.experiments.workloads import sharegpt_trace

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("speed", [0.1, 10])
def test_lesson04_continuous_takes_fewer_steps_than_static_at_any_speed(tiny, speed):
    """Lesson 04 section 4 asserts that continuous batching serves its Poisson trace in fewer forward passes than static
    batching. The arrival rate is 90% of what a full batch decodes at the step time measured in section 1, and the
    replay's clock (measured step times) decides which requests have arrived at each step. Arrivals 10x sparser or
    denser than calibrated stand for a run 10x faster or slower than the measurement: the order of the counts holds."""
    model, tokenizer = tiny
    x = torch.randint(0, model.config.vocab_size, (1, 8))
    with torch.no_grad():
        step_s = time_fn(lambda: model(x), warmup=2, reps=10)      # the lesson's step_ms[8], in seconds
    probe = sharegpt_trace(16, scale=0.2, tokenizer=tokenizer, seed=0)
    capacity = 8 / (probe.output_lens.mean() * step_s)
    trace = sharegpt_trace(16, rate=0.9 * capacity * speed, scale=0.2, tokenizer=tokenizer, seed=0)
    static = StaticBatchEngine(model, max_batch_size=8, tokenizer=tokenizer)
    static.generate(trace.prompts, trace.params, arrival_times=trace.arrival_times, use_tqdm=False)
    engine = LLMEngine(model, max_num_seqs=8, tokenizer=tokenizer)
    engine.generate(trace.prompts, trace.params, arrival_times=trace.arrival_times, use_tqdm=False)
    s, c = static.metrics.summary(), engine.metrics.summary()
    assert c["num_output_tokens"] == s["num_output_tokens"]
    assert c["num_steps"] < s["num_steps"], (speed, c["num_steps"], s["num_steps"])
