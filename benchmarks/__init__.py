"""Benchmark scripts (run from the repository root: ``python benchmarks/<name>.py`` or ``python -m benchmarks.<name>``);
their recorded results are in ``benchmarks/results/``."""
