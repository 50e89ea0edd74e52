"""benchmarks.serving_step's phase split, on CPU (the benchmark itself needs a GPU: it profiles CUDA kernels)."""
from __future__ import annotations

import pytest
import torch

from benchmarks.serving_step import run_phases
from course_lib.model.config import ModelConfig
from course_lib.model.llama import Llama
from course_lib.model.sampling import SamplingParams
from course_lib.serving.engine import LLMEngine


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_run_phases_splits_at_the_first_step_without_prompt_tokens(async_scheduling):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    engine = LLMEngine(Llama(config).eval(), max_num_seqs=8, max_num_batched_tokens=64, num_blocks=64,
                       block_size=8, async_scheduling=async_scheduling)
    prompts = [[(7 * i + j) % 64 for j in range(20 + 9 * i)] for i in range(6)]   # 20-65 tokens: several chunks
    seen, kinds = [], {}
    step = engine._step   # run_phases steps as generate() does

    def recording_step(**kwargs):   # the prompt tokens of every step, as the phases run them
        out = step(**kwargs)
        seen.append(engine.last_step.num_prefill_tokens if engine.last_step is not None else None)
        return out

    engine._step = recording_step

    def phase_fn(name, run):
        before = len(seen)
        steps = run()
        kinds[name] = seen[before:]
        return steps

    steps = run_phases(engine, prompts, SamplingParams(max_tokens=12), phase_fn)
    assert steps == {name: len(kinds[name]) for name in kinds} and min(steps.values()) > 0
    assert all(n > 0 for n in kinds["prefill"][:-1]) and kinds["prefill"][-1] == 0   # ends at the first pure decode
    # (None: with async scheduling the last step() launches nothing, it only reads back the step before)
    assert all(n == 0 for n in kinds["decode"][:-1]) and kinds["decode"][-1] in (0, None)
    assert not engine.has_unfinished_requests()
