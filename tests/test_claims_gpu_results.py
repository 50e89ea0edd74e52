"""The README's GPU rows computed from result files (course_lib.analysis.claims): the training-pass claims of
FlashAttention and the serving line, on small hand-made records whose answers are known."""
from __future__ import annotations

import json

from course_lib.analysis import claims


def _fa_row(D, N, causal, flash, cudnn, err=0.004):
    return dict(D=D, N=N, causal=causal, ours_vs_sdpa_flash=flash, ours_vs_sdpa_cudnn=cudnn,
                ours_vs_sdpa_flash_bwd=flash - 0.1, ours_vs_sdpa_cudnn_bwd=cudnn - 0.1,
                ours_fwd_bwd_tflops=300.0 + N / 100,
                ours_dq_rel_err=err, ours_dk_rel_err=err / 2, ours_dv_rel_err=err / 4)


def test_flash_attention_bwd_claims_ranges_and_missed_targets():
    run = dict(dtype="bfloat16", speed=[_fa_row(64, 1024, False, 1.4, 0.9), _fa_row(128, 4096, True, 1.2, 0.75),
                                        _fa_row(128, 8192, False, 0.95, 0.65, err=0.02)])
    c = claims.flash_attention_bwd_claims(run)
    assert c["flash_all"] == (0.95, 1.4) and c["cudnn_sel"] == (0.65, 0.75) and c["num_sel"] == 2
    assert c["cudnn_misses"] == [(128, 8192, False, 0.65)] and c["flash_misses"] == [(128, 8192, False, 0.95)]
    assert c["max_grad_rel_err"] == 0.02


def test_flash_attention_bwd_claims_read_the_tma_forward_rows_of_a_hopper_forward_run():
    """A --hopper-forward run: ours_tma's ratios at N >= 4k and its misses, apart from ours'; absent: None / []."""
    rows = [_fa_row(128, 4096, False, 1.2, 0.68), _fa_row(128, 8192, True, 1.25, 0.72)]
    for row, tma in zip(rows, (0.72, 0.69)):
        row.update(ours_tma_vs_sdpa_cudnn=tma, ours_tma_vs_sdpa_flash=1.3)
    c = claims.flash_attention_bwd_claims(dict(dtype="bfloat16", speed=rows, forward_variants=dict(ours_tma="tma_w")))
    assert c["tma_variant"] == "tma_w" and c["tma_cudnn_sel"] == (0.69, 0.72) and c["tma_flash_sel"] == (1.3, 1.3)
    assert c["tma_cudnn_misses"] == [(128, 8192, True, 0.69)] and c["cudnn_misses"] == [(128, 4096, False, 0.68)]
    plain = claims.flash_attention_bwd_claims(dict(dtype="bfloat16", speed=[_fa_row(128, 4096, False, 1.2, 0.68)]))
    assert plain["tma_cudnn_sel"] is None and plain["tma_cudnn_misses"] == [] and plain["tma_variant"] is None


def test_flash_attention_bwd_claims_read_the_portable_forward_rows_of_a_default_forward_run():
    """ours = the library's default, --hopper-forward portable: the portable forward's rows at N >= 4k only."""
    rows = [_fa_row(128, 1024, False, 1.3, 0.74), _fa_row(128, 4096, False, 1.2, 0.72),
            _fa_row(128, 8192, True, 1.25, 0.73)]
    for row, portable in zip(rows, (0.5, 0.70, 0.67)):
        row.update(ours_portable_vs_sdpa_cudnn=portable, ours_portable_vs_sdpa_flash=portable + 0.5)
    c = claims.flash_attention_bwd_claims(dict(dtype="bfloat16", speed=rows,
                                               forward_variants=dict(ours="auto", ours_portable="portable")))
    assert c["portable_cudnn_sel"] == (0.67, 0.70) and c["portable_flash_sel"] == (1.17, 1.2)
    assert c["cudnn_sel"] == (0.72, 0.73) and c["tma_cudnn_sel"] is None
    plain = claims.flash_attention_bwd_claims(dict(dtype="bfloat16", speed=[_fa_row(128, 4096, False, 1.2, 0.72)]))
    assert plain["portable_cudnn_sel"] is None


def test_flash_attention_bwd_claims_read_the_gluon_forward_rows():
    """--hopper-forward gluon: ours_gluon's ratios at N >= 4k and its misses, and the README line names them; absent:
    None / [] and no mention."""
    from course_lib.analysis import kernel_lines

    rows = [_fa_row(128, 1024, False, 1.3, 0.74), _fa_row(128, 4096, False, 1.2, 0.72),
            _fa_row(128, 8192, True, 1.25, 0.73)]
    for row, gluon in zip(rows, (0.6, 0.76, 0.69)):
        row.update(ours_gluon_vs_sdpa_cudnn=gluon, ours_gluon_vs_sdpa_flash=gluon + 0.5)
    run = dict(dtype="bfloat16", speed=rows, forward_variants=dict(ours="auto", ours_gluon="gluon"),
               device="NVIDIA H100 80GB HBM3", date="2026-12-08T00:00:00", file="flash_attention_bwd_x.json")
    c = claims.flash_attention_bwd_claims(run)
    assert c["gluon_cudnn_sel"] == (0.69, 0.76) and c["gluon_flash_sel"] == (1.19, 1.26)
    assert c["gluon_cudnn_misses"] == [(128, 8192, True, 0.69)] and c["tma_cudnn_sel"] is None
    line = kernel_lines.bwd_row(run)[2]
    assert '(`hopper="gluon"`), same backward: 0.69-0.76x cuDNN at N ≥ 4k (target: missed)' in line
    plain = claims.flash_attention_bwd_claims(dict(dtype="bfloat16", speed=[_fa_row(128, 4096, False, 1.2, 0.72)]))
    assert plain["gluon_cudnn_sel"] is None and plain["gluon_cudnn_misses"] == []


def _paged_point(B, L, ratio, rounds=None):
    point = dict(B=B, context=L, dtype="float16", ratio_to_sdpa=ratio, paged_seconds=1.0,
                 sdpa_all_seconds=dict(default=2.0, cudnn=2.5))   # first-pass times: their quotient is 2.0
    return point | (dict(round_ratios=rounds) if rounds else {})


def test_paged_decode_claims_take_the_recorded_ratio_and_the_rounds_range():
    """The ratio the file records (the median of rounds timed in turn), never a quotient of first-pass times; the
    lowest and highest single round over all shapes; older files (no rounds): None."""
    split_k = dict(speedup=12.0, B=1, context=32768)
    run = dict(bandwidth=[_paged_point(1, 4096, 0.97, [0.93, 0.97, 0.99]), _paged_point(64, 4096, 0.98, [0.98, 1.0])],
               split_k=split_k)
    c = claims.paged_decode_claims(run)
    assert c["all"] == (0.97, 0.98) and c["worst_shape"] == (1, 4096, "float16") and c["rounds"] == (0.93, 1.0)
    assert c["batch64_ctx4k"] == 0.98 and c["split_k"] == 12.0
    old = claims.paged_decode_claims(dict(bandwidth=[_paged_point(64, 4096, 0.9)], split_k=split_k))
    assert old["rounds"] is None and old["all"] == (0.9, 0.9)


def test_datasheet_knows_the_sxm_cards_only():
    """The roofline fractions need the card's datasheet: H100 SXM (as torch names it) and H200; nothing else."""
    from course_lib.analysis.roofline import H100_SXM, H200_SXM, datasheet
    assert datasheet("NVIDIA H100 80GB HBM3") is H100_SXM and datasheet("NVIDIA H200") is H200_SXM
    assert datasheet("NVIDIA H100 PCIe") is None and datasheet("CPU (x86_64)") is None and datasheet("") is None
    assert datasheet("NVIDIA H200 NVL") is None and datasheet("NVIDIA H100 NVL") is None
    assert claims.peak_tflops(dict(device="NVIDIA H200")) == 989 and claims.hbm_datasheet(dict(device="x")) is None


def test_paged_decode_claims_give_bandwidth_at_large_batch_against_the_copy_and_the_datasheet():
    """Batch >= 64 only: the kernel's bytes/s over the same run's copy bandwidth and the datasheet's (H100: 3.35 TB/s),
    with the shape furthest from the copy; SDPA's own fraction beside it."""
    small, big1, big2 = (_paged_point(1, 4096, 0.97), _paged_point(64, 1024, 0.95), _paged_point(128, 4096, 0.99))
    for point, rate in ((small, 0.5e12), (big1, 2.4e12), (big2, 3.0e12)):
        point.update(paged_bytes_per_s=rate, sdpa_bytes_per_s=rate * 1.05)
    run = dict(device="NVIDIA H100 80GB HBM3", bandwidth=[small, big1, big2], copy_bandwidth=3.0e12,
               split_k=dict(speedup=12.0, B=1, context=32768))
    c = claims.paged_decode_claims(run)
    assert c["copy_big"] == (0.8, 1.0) and c["copy_big_worst"] == (64, 1024, "float16")
    assert abs(c["sdpa_copy_big"][0] - 0.84) < 1e-12 and c["roof_big"] == (2.4e12 / 3.35e12, 3.0e12 / 3.35e12)
    unknown = claims.paged_decode_claims(dict(run, device="Some GPU", copy_bandwidth=None))
    assert unknown["copy_big"] is None and unknown["roof_big"] is None


def test_int8_and_flash_attention_claims_give_their_fraction_of_the_roofline():
    """INT8 / FP16 bytes per second at long contexts over the H200's 4.8 TB/s; the forward's TFLOP/s over 989."""
    decode = [dict(context=c, int8_ratio_to_fp16=r, int8_bytes_per_s=i8, fp16_bytes_per_s=f16)
              for c, r, i8, f16 in ((4096, 0.7, 1e12, 4e12), (8192, 0.74, 2.4e12, 4.32e12),
                                    (16384, 0.76, 3.0e12, 4.5e12))]
    run = dict(device="NVIDIA H200", decode=decode, targets=dict(target=0.6, met=False),
               memory=dict(ratio_int8_to_fp16=0.51))
    c = claims.int8_decode_claims(run)
    assert c["long"] == (0.74, 0.76) and c["int8_roof_long"] == (0.5, 0.625) and c["fp16_roof_long"] == (0.9, 0.9375)
    speed = [dict(D=128, N=n, ours_vs_sdpa_cudnn=0.8, ours_vs_sdpa_flash=1.4, ours_tflops=t, sdpa_cudnn_tflops=t / 0.8)
             for n, t in ((1024, 300.0), (4096, 494.5), (8192, 445.05))]
    fa = claims.flash_attention_claims(dict(device="NVIDIA H100 80GB HBM3", speed=speed))
    assert fa["roof_sel"] == (0.45, 0.5) and fa["cudnn_roof_sel"] == (0.45 / 0.8, 0.5 / 0.8)


def test_flash_attention_hopper_claims_per_head_dim_and_the_roof_at_d128():
    rows = [dict(D=d, N=n, portable_vs_cudnn=0.8 + n / 1e5, v_vs_cudnn=0.9, portable_tflops=400.0 + d, v_tflops=500.0,
                 sdpa_cudnn_tflops=600.0) for d in (64, 128) for n in (4096, 8192)]
    c = claims.flash_attention_hopper_claims(dict(device="NVIDIA H100 80GB HBM3", variants={"v": {}}, rows=rows))
    assert c["vs_cudnn"][64]["portable"] == (0.8 + 4096 / 1e5, 0.8 + 8192 / 1e5)
    assert c["vs_cudnn"][128]["v"] == (0.9, 0.9)
    assert c["tflops"]["portable"] == (528.0, 528.0) and c["roof"]["sdpa_cudnn"] == (600 / 989, 600 / 989)
    assert c["Ns"] == [4096, 8192] and c["num_shapes"] == 4


def _serving_run(engine_tok_s, hf_cb=None, sweep=None, complete=True, **extra):
    rows = [dict(model="m", workload="w", system="llmengine", status="ok", throughput_tok_s=engine_tok_s, num_runs=1)]
    if hf_cb:
        rows.append(dict(model="m", workload="w", system="hf-cb", status="ok", throughput_tok_s=hf_cb, num_runs=1))
    if sweep:
        rows.append(dict(model="m", workload="w", system="hf-static-sweep", status="ok",
                         runs=[dict(batch_size=sweep[0], throughput_tok_s=sweep[1])]))
    summary = [dict(model="m", workload="w", engine_fraction_of_floor=engine_tok_s / 20000, floor_tok_s=20000.0)]
    return dict(benchmark="serving", gpu="X", rows=rows, summary=summary, complete=complete, **extra)


def test_serving_line_compares_only_whole_trace_rows():
    line = claims.serving_line(_serving_run(10000.0, hf_cb=500.0))
    assert "LLMEngine 10,000 tok/s" in line and "50% of the HBM floor" in line and "20.0x" in line
    line = claims.serving_line(_serving_run(10000.0, sweep=(128, 400.0), complete=False))
    assert "a sweep point" in line and "B = 128 400" in line and "cut short" in line
    assert "LLMEngine /" not in line            # a sweep point on part of the trace is never compared


def test_serving_line_says_a_sweep_point_ran_out_of_memory():
    run = _serving_run(10000.0, complete=False)
    run["rows"].append(dict(model="m", workload="w", system="hf-static-sweep", batch_size=256,
                            status="error: OutOfMemoryError: CUDA out of memory. Tried to allocate 1.73 GiB",
                            runs=[dict(status="error: OutOfMemoryError: CUDA out of memory.")]))
    line = claims.serving_line(run)
    assert "B = 256 out of memory" in line and "a row failed" in line and "cut short" not in line


def test_serving_line_summarizes_each_sweep_from_its_first_to_its_last_point():
    def point(system, x, tok_s, tpot, status="ok"):
        return dict(model="m", system=system, x=x, throughput_tok_s=tok_s, tpot_p50=tpot, status=status)

    run = _serving_run(10000.0, sweeps=dict(
        concurrency=[point("llmengine", 32, 900.0, 0.002), point("llmengine", 8, 100.0, 0.001),
                     point("llmengine", 256, 2500.0, 0.009), point("hf-cb", 8, 10.0, 0.1),
                     point("hf-cb", 256, 70.0, 0.3)],
        context=[], kv_budget=[point("llmengine", 8, 60.0, 0.002), point("hf-cb", 8, 0.0, 0.0, status="not run")]))
    line = claims.serving_line(run)
    assert ("sweep of concurrent requests 8 -> 256, m: LLMEngine 100 -> 2,500 tok/s (TPOT p50 1.0 -> 9.0 ms, "
            "3 points); HF continuous batching 10 -> 70 tok/s (TPOT p50 100.0 -> 300.0 ms)") in line
    assert "sweep of KV budget (full contexts) 8 -> 8, m: LLMEngine 60 -> 60 tok/s" in line
    assert "prompt length" not in line and "HF continuous batching 0" not in line   # empty sweep, a point not run


def test_a_superseded_engine_judges_no_claim(tmp_path):
    old = _serving_run(1000.0, hf_cb=500.0, date="2026-01-01", engine_superseded_by="serving_b.json")
    new = _serving_run(9000.0, sweep=(8, 100.0), date="2026-01-02")
    for name, run in (("serving_a.json", old), ("serving_b.json", new)):
        (tmp_path / name).write_text(json.dumps(run))
    runs = claims.real_size_serving_runs(tmp_path)
    assert [r["rows"][0]["throughput_tok_s"] for r in runs] == [9000.0]
    assert claims.serving_vs_strongest_hf(runs[0]) == []       # no whole-trace HF row: nothing to compare


def _step_row(name, tokens, wall, profiled_wall, mode="FULL_DECODE_ONLY"):
    phase = dict(steps=1, wall_s=1.0, kernel_time_s=0.5, busy_fraction=0.5)
    return dict(row=name, output_tokens=tokens, wall_s=wall, busy=dict(wall_s=profiled_wall, busy_fraction=0.5),
                cudagraph_mode=mode, phases=dict(prefill=phase, decode=phase))


def test_serving_step_runs_keep_the_latest_complete_run_and_the_latest_with_mixed_graphs(tmp_path):
    def run(date, command, rows, slug="gpu-a"):
        return dict(benchmark="serving_step", device="GPU A", device_slug=slug, date=date, command=command,
                    serving=rows)
    old = _step_row("old", 1000, 10.0, 8.0)                        # its timed run compiled: the profiled one counts
    assert claims.serving_step_tok_s(old) == 125.0
    assert claims.serving_step_tok_s(_step_row("x", 1000, 2.0, 2.5)) == 500.0   # the profiler only slows a run
    repeated = _step_row("r", 1000, 2.0, 0.5) | dict(wall_s_runs=[4.0, 2.0, 2.5])   # repeats: their median
    assert claims.serving_step_tok_s(repeated) == 400.0
    full = _step_row("+ full", 1000, 1.0, 1.0, mode="FULL")
    files = {"serving_step_a.json": run("2026-01-01", "python -m benchmarks.serving_step", [old, full]),
             "serving_step_b.json": run("2026-01-04", "python -m benchmarks.serving_step --rows 6", [old, full]),
             "serving_step_c.json": run("2026-01-03", "python -m benchmarks.serving_step", [old]),
             "serving_step_d.json": run("2026-01-01", "python -m benchmarks.serving_step", [old], slug="gpu-b"),
             # the latest of gpu-b, cut short by a time limit (saved after its first row): not complete
             "serving_step_e.json": run("2026-01-05", "python -m benchmarks.serving_step", [old], slug="gpu-b")
             | dict(complete=False)}
    for name, data in files.items():
        (tmp_path / name).write_text(json.dumps(data))
    complete, mixed = claims.serving_step_runs(tmp_path)
    assert {s: r["date"] for s, r in complete.items()} == {"gpu-a": "2026-01-03", "gpu-b": "2026-01-01"}
    assert {s: r["date"] for s, r in mixed.items()} == {"gpu-a": "2026-01-04"}     # the subset run: the row
    assert claims.mixed_graph_rows(mixed["gpu-a"]) == [full]


def test_each_kernel_benchmark_prints_its_readme_row(tmp_path, capsys):
    """benchmarks.record.print_readme_row, which the five kernel benchmarks call after writing their file: for every
    recorded GPU file the row is the README's own (strongest baseline first, full range, roofline share: issue 21);
    a quick or interpreter run prints nothing."""
    from benchmarks.record import print_readme_row
    from course_lib.analysis.roofline import RESULTS_DIR

    readme = (RESULTS_DIR.parents[1] / "README.md").read_text(encoding="utf-8")
    names = ("paged_attention", "flash_attention", "flash_attention_hopper", "flash_attention_bwd", "kv_quant")
    seen = set()
    for run in claims.recorded("*.json"):
        if run.get("benchmark") not in names:
            continue
        line = print_readme_row(RESULTS_DIR / run["file"])
        assert line and line in readme and line in capsys.readouterr().out, run["file"]
        assert "datasheet" in line   # every recorded file is from an H100 SXM or an H200: its roofline is known
        seen.add(run["benchmark"])
    assert seen == set(names)
    quick = tmp_path / "paged_attention_cpu.json"
    quick.write_text(json.dumps(dict(benchmark="paged_attention", quick=True, kernel_mode="interpreter")))
    assert print_readme_row(quick) is None and capsys.readouterr().out == ""


def test_serving_targets_take_the_latest_file_per_baseline_and_judge_ratio_and_repeats():
    def run(date, engine, runs, hf_cb=None, hf_static=None, device="GPU A"):
        r = _serving_run(engine, hf_cb=hf_cb, date=date, device=device, file=f"serving_{date}.json")
        r["rows"][0]["num_runs"] = runs
        s = r["summary"][0]
        s.update(model="qwen3-0.6b", workload="nano-vllm")
        for row in r["rows"]:
            row.update(model="qwen3-0.6b", workload="nano-vllm", num_runs=runs)
        if hf_cb:
            s["engine_x_hf_cb"] = dict(median=engine / hf_cb, low=engine / hf_cb, high=engine / hf_cb)
        if hf_static:
            r["rows"].append(dict(model="qwen3-0.6b", workload="nano-vllm", system="hf-static", status="ok",
                                  throughput_tok_s=hf_static, num_runs=runs, batch_size=128))
            s["engine_x_hf_static"] = dict(median=engine / hf_static, low=0.0, high=0.0)
        return r

    runs = [run("2026-01-01", 9000.0, 1, hf_cb=1000.0, hf_static=3000.0),     # 9x and 3x: both missed
            run("2026-01-02", 12000.0, 3, hf_cb=1000.0),                       # a later CB row: 12x, 3 runs
            run("2026-01-03", 5000.0, 3, device="GPU B")]                      # no baseline on the other card
    by = {(t["device"], t["baseline"]): t for t in claims.serving_targets(runs)}
    cb, static = by["GPU A", "hf_cb"], by["GPU A", "hf_static"]
    assert cb["file"] == "serving_2026-01-02.json" and cb["met"] and cb["repeats_met"]
    assert static["file"] == "serving_2026-01-01.json" and not static["met"] and not static["repeats_met"]
    assert static["ratio"]["median"] == 3.0 and static["batch_size"] == 128
    assert by["GPU B", "hf_cb"]["file"] is None and by["GPU B", "hf_static"]["file"] is None
    recorded = claims.serving_targets(claims.real_size_serving_runs())
    assert {t["baseline"] for t in recorded if t["file"]} == {"hf_cb", "hf_static"}   # the H100's files judge both


def test_strongest_hf_per_trace_keeps_the_file_with_the_strongest_baseline():
    def run(name, engine, hf_cb=None, hf_static=None, workload="w"):
        s = dict(model="m", workload=workload, engine_tok_s=engine, hf_cb_tok_s=hf_cb,
                 hf_cb_status="ok" if hf_cb else "not run", hf_static_best_tok_s=hf_static)
        for key, hf in (("engine_x_hf_cb", hf_cb), ("engine_x_hf_static", hf_static)):
            s[key] = dict(median=engine / hf, low=engine / hf, high=engine / hf) if hf else None
        return dict(device="GPU A", file=name, summary=[s])

    runs = [run("a.json", 10000.0, hf_cb=400.0),             # 25x against the weaker baseline
            run("b.json", 9000.0, hf_static=600.0),          # 15x against the stronger one: this one judges
            run("c.json", 9000.0, hf_cb=300.0, workload="v")]
    got = {x["workload"]: (r["file"], x["strongest_hf"], x["ratio"]) for r, x in claims.strongest_hf_per_trace(runs)}
    assert got == {"w": ("b.json", "hf_static", 15.0), "v": ("c.json", "hf_cb", 30.0)}


def test_hf_cb_setup_says_how_transformers_ran():
    """The targets name the configuration of transformers' continuous batching: the recorded rows ran its defaults
    (no CUDA graphs, no async batching with paged SDPA); a row run with --hf-cb-graphs on says so."""
    from course_lib.analysis.claims import hf_cb_setup

    run = claims.recorded("serving_nvidia-h100-80gb-hbm3_2026-12-07a.json")[0]
    row = next(r for r in run["rows"] if r["system"] == "hf-cb")
    assert hf_cb_setup(row) == "attention paged sdpa, CUDA graphs off, async batching off"
    on = dict(row, runs=[dict(row["runs"][0], hf_use_cuda_graph="(True, True)", hf_use_async_batching="True")])
    assert hf_cb_setup(on) == "attention paged sdpa, CUDA graphs on, async batching on"
    assert hf_cb_setup(next(r for r in run["rows"] if r["system"] == "llmengine")) is None
    for installed, said in (((False, False), ", no flash-attn installed"), ((True, False), ", flash-attn 2 installed"),
                            ((True, True), ", flash-attn 3 installed")):
        fa = dict(row, runs=[dict(row["runs"][0], hf_flash_attn_2_installed=installed[0],
                                  hf_flash_attn_3_installed=installed[1])])
        assert hf_cb_setup(fa) == "attention paged sdpa, CUDA graphs off, async batching off" + said
