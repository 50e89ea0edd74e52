"""Lesson 09's KsanaLLM cells: cross-node bytes per token of TP across nodes vs PP across nodes, and the ideal
timeline of decode with several batches in flight (PP multi-batch)."""
from __future__ import annotations

import pytest

from course_lib import PRESETS
from course_lib.parallel.comm import cross_node_bytes_per_token, ring_bytes_per_rank
from course_lib.parallel.schedule import measured_bubble, simulate_decode


def test_cross_node_bytes_by_hand():
    c = PRESETS["llama-2-70b"]
    L, H = c.num_hidden_layers, c.hidden_size
    assert cross_node_bytes_per_token(L, H, layout="tp") == 2 * L * H * 2
    assert cross_node_bytes_per_token(L, H, layout="tp", count="ring") == 2 * L * 2 * ring_bytes_per_rank(H * 2, 16)
    assert cross_node_bytes_per_token(L, H, layout="pp") == H * 2
    assert cross_node_bytes_per_token(L, H, layout="pp", num_nodes=4, tensors_per_boundary=2) == 3 * 2 * H * 2
    # the simplest count: 1 - k / (2L); 61 layers (DeepSeek-V3) with hidden + residual -> 1 - 1/61
    r = 1 - cross_node_bytes_per_token(61, 7168, layout="pp", tensors_per_boundary=2) / \
        cross_node_bytes_per_token(61, 7168, layout="tp")
    assert r == pytest.approx(1 - 1 / 61)
    for bad in (dict(layout="dp"), dict(layout="tp", count="tree")):
        with pytest.raises(ValueError, match="layout|count"):
            cross_node_bytes_per_token(L, H, **bad)


@pytest.mark.parametrize("p, m, steps", [(2, 1, 5), (2, 2, 5), (3, 2, 4), (4, 4, 3), (3, 5, 2)])
def test_decode_with_batches_in_flight(p, m, steps):
    ev = simulate_decode(p, m, steps)
    assert len(ev) == p * m * steps
    by = {(e["stage"], e["mb"], e["step"]): e for e in ev}
    for (s, j, k), e in by.items():                       # dependencies hold
        if s > 0:
            assert e["start"] >= by[s - 1, j, k]["end"]
        elif k > 0:
            assert e["start"] >= by[p - 1, j, k - 1]["end"]
    for s in range(p):                                    # a stage runs one thing at a time
        spans = sorted((e["start"], e["end"]) for e in ev if e["stage"] == s)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    busy = 1 - measured_bubble(ev)
    if m == 1:
        assert busy == pytest.approx(1 / p)               # one batch: each stage idles (p-1)/p
    if m >= p:
        assert busy == pytest.approx(m * steps / (m * steps + p - 1))   # only the start-up is idle
