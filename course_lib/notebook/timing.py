"""Wall-clock timings that say how far to trust them.

A lesson never asserts a wall-clock time. On a shared machine (a laptop running a browser, a CI runner, a test run
under load) whatever else runs slows some measurements more than others, and a ratio of two timings can move by
more than any margin an assert would allow. Lessons therefore assert the counts that explain a timing (FLOPs, bytes,
steps, tokens: no other program can change them) and print the timing next to them as an *observation*:

    t = time_repeats(lambda: model(x), reps=10)      # Timing: every repeat, their median and their spread
    observe("a batch of 16 costs under 10x one sequence", t16.median_s < 10 * t1.median_s, t1, t16,
            measured=f"{t16.median_s / t1.median_s:.1f}x")

``observe`` prints one line, "observed" or "NOT observed this run", and a warning when the measurement is not
worth much: repeats that disagree (their interquartile range above ``NOISY_SPREAD`` of their median) or a CPU
busier than it has cores (``machine_busy``).
"""
from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from course_lib.device import DEVICE

NOISY_SPREAD = 0.25   # (p75 - p25) / median of the repeats above which a timing is flagged as too noisy to trust


@dataclass(frozen=True)
class Timing:
    """Repeated wall-clock measurements of one thing, in seconds."""

    times_s: tuple[float, ...]

    def __post_init__(self):
        if not self.times_s or any(not t >= 0 for t in self.times_s):
            raise ValueError(f"times_s must hold at least one time >= 0 (s), got {self.times_s!r}")

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def min_s(self) -> float:
        return min(self.times_s)

    @property
    def spread(self) -> float:
        """Interquartile range / median: how much the repeats disagree (0 for a single repeat)."""
        p25, p75 = np.percentile(self.times_s, [25, 75])
        return float(p75 - p25) / self.median_s if self.median_s > 0 else 0.0

    @property
    def noisy(self) -> bool:
        return self.spread > NOISY_SPREAD


def time_repeats(fn: Callable[[], object], *, reps: int = 5, warmup: int = 1,
                 device: torch.device | str | None = None) -> Timing:
    """Time ``fn()`` `reps` times after `warmup` untimed calls (on a GPU with CUDA events: the kernels' time)."""
    if reps < 1 or warmup < 0:
        raise ValueError(f"reps must be >= 1 and warmup >= 0, got reps={reps}, warmup={warmup}")
    device = torch.device(device or DEVICE)
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(device)
        return Timing(tuple(s.elapsed_time(e) / 1e3 for s, e in events))   # elapsed_time is in ms
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return Timing(tuple(times))


def machine_busy() -> str | None:
    """A sentence when the 1-minute load average exceeds the CPU count (other programs compete), else None."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):    # Windows has no load average
        return None
    cpus = os.cpu_count() or 1
    if load > cpus:
        return f"this CPU is busy: load average {load:.1f} on {cpus} cores (other programs share it)"
    return None


def observe(claim: str, holds: bool, *timings: Timing, measured: str = "") -> bool:
    """Print a claim about wall-clock time as an observation, never an assert, and return `holds`.

    One line: "observed: <claim> (<measured>)" or "NOT observed this run: ...", then a warning for each reason not
    to trust the measurement (repeats of `timings` that disagree; a busy CPU).
    """
    lines = [f"{'observed' if holds else 'NOT observed this run'}: {claim}" + (f" ({measured})" if measured else "")]
    noisy = [t for t in timings if t.noisy]
    if noisy:
        lines.append(f"  warning: too noisy to trust: the repeats of {len(noisy)} of these timings spread by up to "
                     f"{max(t.spread for t in noisy):.0%} of their median (interquartile range)")
    busy = machine_busy()
    if busy:
        lines.append(f"  warning: {busy}")
    if not holds:
        lines.append("  wall-clock time moves with whatever else runs on the machine; the counts asserted above do "
                     "not. Run the cell again when the machine is idle.")
    print("\n".join(lines))
    return holds
