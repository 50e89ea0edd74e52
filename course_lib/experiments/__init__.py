"""Traces and what runs on them: ``workloads`` (ShareGPT-like traces), ``prefix_workloads`` (lesson 05),
``capstone_workloads`` and ``ablation`` (lesson 10), ``timeline`` (pictures of a serving run)."""
