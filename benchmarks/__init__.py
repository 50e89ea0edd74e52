"""Benchmark scripts, run from the repository root as modules: ``python -m benchmarks.<name>`` (they import one
another as ``benchmarks.roofline``, ``benchmarks.record``, ...); their recorded results are in
``benchmarks/results/``."""
