"""The benchmark suite still runs: ``bench/run_all.py --quick`` end to end (kernels interpreted on
the CPU), with every script, its CSV rows, the report and the plots."""

import contextlib
import csv
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = {"launch", "attention", "fbank_patch", "mixture", "decoder", "regression", "masks", "encoder", "train_step", "saved_activations",
              "cpu_data_path"}


def test_quick_suite_runs_every_benchmark(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "run_all.py"), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert {r["benchmark"] for r in rows} == BENCHMARKS
    for row in rows:
        assert row["device"] and row["torch"] and row["date"] and row["commit"], row
    measured = [r for r in rows if r["median_ms"]]
    assert measured and all(float(r["median_ms"]) > 0 for r in measured)
    report = (tmp_path / "report.md").read_text()
    for name in BENCHMARKS:
        assert f"## {name}" in report, name
    assert len(list(tmp_path.glob("*.png"))) == len(BENCHMARKS)
    # the profiles of good eager and ours, their top operations in the report
    for variant in ("eager", "ours"):
        assert (tmp_path / "profile" / f"trace_{variant}_stage2.json.gz").stat().st_size > 0
        assert f"**{variant}_stage2** (trace: `profile/trace_{variant}_stage2.json.gz`)" in report
    assert "## Profiles: top operations of the training step" in report


def run_all(*args: str, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / "run_all.py"), "--out", str(out), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_a_script_past_the_timeout_is_stopped_and_reported(tmp_path):
    done = run_all("--quick", "--only", "masks", "--timeout", "0.01", out=tmp_path)
    assert done.returncode == 1
    assert "masks: TIMED OUT" in done.stdout
    assert "| masks | TIMED OUT |" in (tmp_path / "report.md").read_text()
    assert "stopped after" in (tmp_path / "masks.txt").read_text()


def test_only_runs_in_the_order_given_and_budget_stops_new_scripts(tmp_path):
    done = run_all("--quick", "--only", "masks", "cpu", "--budget", "0", out=tmp_path)
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert lines[:2] == ["       masks: not started, the --budget is spent", "         cpu: not started, the --budget is spent"]
    report = (tmp_path / "report.md").read_text()
    assert report.index("| masks | not started (--budget) |") < report.index("| cpu | not started (--budget) |")


def test_tests_option_runs_the_device_tests_first_and_reports_them(tmp_path):
    # (no "cuda" or "gpu" in this name: the run selects tests by those words)
    done = run_all("--quick", "--tests", "--only", "masks", out=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.index("cuda tests: ok") < done.stdout.index("masks: ok")
    log = (tmp_path / "tests.txt").read_text()
    assert '-k cuda or gpu' in log and "--timeout=120" in log
    report = (tmp_path / "report.md").read_text()
    section = report[report.index("## CUDA tests"):]
    # without a GPU every CUDA test is collected and skipped; the count is in the report
    assert re.search(r"\d+ skipped, \d+ deselected", section)


def test_tests_alone_with_an_empty_only(tmp_path):
    done = run_all("--quick", "--tests", "--only", out=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "cuda tests: ok" in done.stdout and "masks" not in done.stdout
    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# Benchmark report\n\n- Run: CPU ") and "## CUDA tests" in report


def test_a_benchmark_whose_every_time_failed_does_not_stop_the_report(tmp_path):
    """Regression: an all-NaN benchmark (every variant failed) made the log-scale plot raise,
    and the error ended the suite."""
    run_all = _run_all_module()
    row = {"benchmark": "mixture", "case": "c", "pass": "fwd", "torch": "2", "triton": "3", "cuda": "13.0",
           "device": "GPU", "commit": "abc", "date": "2026-12-07T00:00:00Z", "median_ms": "nan"}
    rows = [{**row, "variant": "ours", "note": "failed: CUDA error"}, {**row, "variant": "eager"},
            {**row, "benchmark": "decoder", "variant": "ours", "median_ms": "2.5"}]
    text = run_all.report(rows, tmp_path, {}, "GPU; from today")
    assert "## mixture" in text and "## decoder" in text and "![decoder](decoder.png)" in text
    assert (tmp_path / "decoder.png").exists() and not (tmp_path / "mixture.png").exists()


def test_unknown_benchmark_names_are_refused(tmp_path):
    done = run_all("--quick", "--only", "attention", "atention", out=tmp_path)
    assert done.returncode == 2
    assert "--only: no benchmark named ['atention']" in done.stderr
    assert not (tmp_path / "results.csv").exists()


def _run_all_module():
    sys.path.insert(0, str(ROOT / "bench"))
    import run_all

    return run_all


def test_the_gpu_plan_runs_each_step_variant_in_a_process_of_its_own(tmp_path):
    """One variant after another in one process ran slower than alone: each now has its own."""
    run_all = _run_all_module()
    scripts = dict(run_all.plan(quick=False, gpu=True, out=tmp_path))
    steps = {name: args for name, args in scripts.items() if name.startswith("step-")}
    assert sorted(name.removeprefix("step-") for name in steps) == sorted(run_all.STEP_VARIANTS)
    for name, args in steps.items():
        assert args[args.index("--variants") + 1:] == [name.removeprefix("step-")]


def test_the_gpu_plan_runs_what_matters_most_first(tmp_path):
    """A GPU lent for minutes: the step's main comparison and the largest kernels come first (the
    training step came last, after every kernel, and a spent budget left it unmeasured), then
    every other kernel once (the regression kernel was never reached), and what runs on the
    host's CPU anyway comes last."""
    names = [name for name, _ in _run_all_module().plan(quick=False, gpu=True, out=tmp_path)]
    assert names[:4] == ["step-ours", "step-eager", "attention", "fbank_patch"]
    assert {"mixture", "decoder", "regression"} == set(names[4:7])
    assert names[-3:] == ["memory", "masks", "cpu"]


def test_every_script_time_limit_names_a_script_of_the_gpu_plan(tmp_path):
    run_all = _run_all_module()
    assert set(run_all.GPU_SCRIPT_CAPS) <= {name for name, _ in run_all.plan(quick=False, gpu=True, out=tmp_path)}


def test_a_stopped_script_is_killed_with_what_it_started(tmp_path):
    """Interrupted at its limit, then killed with its process group: a child that ignores the
    interrupt (a compile worker, a spawned measurement) does not outlive it."""
    run_all = _run_all_module()
    marker = tmp_path / "child.pid"
    script = f"(trap '' INT; echo $BASHPID > {marker}; exec sleep 300) & wait"
    status, seconds = run_all.run_logged("child", ["bash", "-c", script], tmp_path / "log.txt", {}, timeout=2)
    assert status == "TIMED OUT" and seconds < 60
    status_file = Path(f"/proc/{int(marker.read_text())}/status")
    for _ in range(50):  # killed: it dies (a zombie until init reaps it) within moments
        with contextlib.suppress(FileNotFoundError):
            if "zombie" not in status_file.read_text():
                time.sleep(0.1)
                continue
        break
    else:
        raise AssertionError(f"the child still runs: {status_file.read_text()}")
    assert "stopped after 2 s" in (tmp_path / "log.txt").read_text()


def test_rows_reach_the_csv_as_they_are_added(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    from common import CsvRows

    rows = CsvRows(tmp_path / "r.csv", device="GPU", benchmark="b")
    rows.append({"variant": "ours", "median_ms": 1.5})
    on_disk = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert [(r["device"], r["benchmark"], r["variant"], r["median_ms"]) for r in on_disk] == [("GPU", "b", "ours", "1.5")]
    assert list(rows) == [{"device": "GPU", "benchmark": "b", "variant": "ours", "median_ms": 1.5}]


def test_a_folder_with_earlier_results_is_refused(tmp_path):
    (tmp_path / "results.csv").write_text("date,commit\n2026-01-01,abc\n")
    done = run_all("--quick", "--only", "masks", out=tmp_path)
    assert done.returncode == 2 and "holds the results.csv of an earlier run" in done.stderr


def test_the_report_names_every_device_and_commit_its_rows_come_from(tmp_path):
    run_all = _run_all_module()
    row = {"benchmark": "masks", "case": "c", "variant": "v", "pass": "full", "median_ms": "1", "torch": "2",
           "triton": "3", "date": "2026-12-06T00:00:00Z"}
    rows = [{**row, "device": "NVIDIA H100", "cuda": "13.0", "commit": "abc"},
            {**row, "device": "CPU X (1 threads)", "cuda": "none", "commit": "abc"}]
    text = run_all.report(rows, tmp_path, {})
    assert "- Device: NVIDIA H100; torch 2; triton 3; CUDA 13.0; commit abc" in text
    assert "- Device: CPU X (1 threads); torch 2; triton 3; CUDA none; commit abc" in text


def test_autotune_report_lists_each_new_table_once_fastest_first():
    from types import SimpleNamespace

    import triton

    sys.path.insert(0, str(ROOT / "bench"))
    from common import autotune_report

    slow, fast = triton.Config({"BLOCK": 64}, num_warps=4), triton.Config({"BLOCK": 32}, num_warps=2)
    tuner = SimpleNamespace(configs_timings={slow: [0.02, 0.019, 0.021], fast: [0.01, 0.009, 0.011]},
                            best_config=fast)
    seen = set()
    lines = autotune_report({"kernel": tuner, "untuned": SimpleNamespace()}, seen).splitlines()
    assert lines[0] == "autotuning kernel:" and len(lines) == 3
    assert "10.0 us" in lines[1] and "BLOCK: 32" in lines[1] and lines[1].endswith("<- chosen")
    assert "20.0 us" in lines[2] and "BLOCK: 64" in lines[2] and "chosen" not in lines[2]
    assert autotune_report({"kernel": tuner}, seen) == ""  # already reported


def test_largest_batch_search_predicts_then_confirms():
    """A linear peak-memory curve takes 4 steps; any other curve is still answered exactly by
    doubling and bisection from where the prediction failed."""
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_step import largest_fitting

    tried = []

    def linear(static, per_clip, capacity, most=None):
        """Peak of a step; out of memory past ``capacity`` (or past ``most`` clips if given)."""
        def peak_of(batch):
            tried.append(batch)
            peak = static + per_clip * batch
            return peak if peak <= capacity and (most is None or batch <= most) else None
        return peak_of

    gib = 2**30
    assert largest_fitting(linear(2 * gib, 0.5 * gib, 80 * gib), start=12, capacity=80 * gib) == 156
    assert tried == [12, 24, 156, 160]
    # the prediction overshoots (fragmentation, a workspace): the probe below it confirms
    tried.clear()
    assert largest_fitting(linear(2 * gib, 0.5 * gib, 80 * gib, most=153), 12, 80 * gib, resolution=4) == 152
    assert tried == [12, 24, 156, 152]
    # the prediction undershoots (more memory than assumed): the search goes on from above it
    assert 172 < largest_fitting(linear(2 * gib, 0.5 * gib, 90 * gib), 12, 80 * gib) <= 176
    # far off: doubling and bisection from the bounds, to the resolution
    tried.clear()
    assert 96 < largest_fitting(linear(2 * gib, 0.5 * gib, 80 * gib, most=100), 12, 80 * gib) <= 100
    assert largest_fitting(linear(0, gib, 9000 * gib, most=40), 12, 9000 * gib, resolution=1) == 40
    assert largest_fitting(linear(0, gib, 9000 * gib), 12, 9000 * gib, limit=500) == 500
    assert largest_fitting(linear(0, 0, 1), 12, capacity=1, limit=500) == 384  # flat curve: doubling
    assert largest_fitting(linear(0, gib, 8 * gib), 12, 8 * gib) == 0


def test_census_counts_the_step_forward_on_fake_cuda_tensors():
    """The census of a stage-2 forward without a GPU: the custom ops of the kernel path, and half
    weights casting the weights but fewer activations than autocast."""
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_census import census

    from sslam.train_config import preset

    cfg = preset("tiny", 2)
    (amp, amp_nodes), (pure, pure_nodes) = (census(v, cfg, batch=2) for v in ("ours", "ours_pure"))
    for census_ in (amp, pure):  # the decoder: one conv and one norm/GELU kernel per layer
        assert census_.ops["grouped_conv_tokens"] == census_.ops["decoder_norm_act"] == cfg.model.decoder_layers
    # one fused feature pass; attention in the student and the teacher (its two passes packed
    # into one) in every block
    assert amp.ops["fbank_patch"] == pure.ops["fbank_patch"] == 1
    assert amp.ops["attention_forward"] == pure.ops["attention_forward"] == 2 * cfg.model.depth

    def activations(c):
        return sum(n for (shape, _, _), n in c.casts.items() if len(shape) >= 3)

    assert activations(pure) < activations(amp) and pure.cast_bytes < amp.cast_bytes
    assert {(a, b) for (_, a, b) in pure.casts} <= {("float32", "bfloat16"), ("bfloat16", "float32")}
    # both cast the weights (autocast: the matmuls') in one multi-tensor copy per group
    # (trainable, teacher), and their gradients back in one backward node, not each weight at
    # each use; autocast still casts activations (and their gradients)
    assert pure.ops["_foreach_copy_"] == amp.ops["_foreach_copy_"] == 2
    assert pure_nodes["_CastBackward"] == amp_nodes["_CastBackward"] == 1
    weights = pure_nodes["torch::autograd::AccumulateGrad"]
    assert amp_nodes["torch::autograd::AccumulateGrad"] == weights > 20
    assert pure_nodes["ToCopyBackward0"] < amp_nodes["ToCopyBackward0"] < weights // 2


def test_census_peak_counts_live_storages_once():
    """The census's peak: bytes of the storages alive at once, views not counted twice."""
    sys.path.insert(0, str(ROOT / "bench"))
    import torch
    from bench_census import Census

    census = Census()
    with census:
        a = torch.ones(1000)  # 4000 bytes
        b = (a * 2).view(10, 100)  # 4000 more; the view shares b's storage
        del a
        c = b + 1  # 8000 alive again
        del b, c
    assert census.peak_bytes == 8000 and census.live_bytes == 0


def test_a_failing_baseline_costs_only_its_own_rows(tmp_path):
    """torch.compile failing (as inductor has on a GPU) leaves a 'failed' row for the compiled
    baseline, and the other variants' rows are still measured and written."""
    results = tmp_path / "rows.csv"
    script = (f"import sys, torch\nsys.path.insert(0, {str(ROOT / 'bench')!r})\n"
              "def compile_that_fails(fn, **kwargs):\n"
              "    def call(*args, **kw):\n        raise RuntimeError('inductor failed here')\n    return call\n"
              "torch.compile = compile_that_fails\n"
              f"import bench_regression\nbench_regression.main(['--quick', '--csv', {str(results)!r}])\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.DictReader(results.open()))
    by_variant = {v: [r for r in rows if r["variant"] == v] for v in ("eager", "compile", "ours")}
    assert all(len(found) == 3 for found in by_variant.values())  # fwd, bwd, full
    assert all(r["note"].startswith("failed: RuntimeError: inductor failed here") for r in by_variant["compile"])
    assert all(float(r["median_ms"]) > 0 for r in by_variant["eager"] + by_variant["ours"])


def test_gpu_compile_check_lowers_every_graph_of_the_compiled_step():
    """bench/check_gpu_compile.py drives inductor's CUDA backend on a machine without a GPU: each
    graph of a small compiled stage-2 step (the teacher's two shapes, the student and the decoder
    with their backward) lowers with fixed shapes, and its Triton kernels compile for sm_90."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("on a GPU the step itself is compiled and run (bench_step.py)")
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "check_gpu_compile.py"), "--preset", "tiny",
                           "--batch", "2", "--steps", "1"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    graphs = [line for line in done.stdout.splitlines() if line.startswith("graph ")]
    assert len(graphs) == 4 and sum("forward + backward lowered" in line for line in graphs) == 2, graphs
    assert not any("symbolic" in line for line in graphs)
    assert all(int(re.search(r"(\d+) Triton kernels", line).group(1)) > 0 for line in graphs)


def test_fbank_accuracy_reports_both_paths_against_float64():
    """The script behind the fused kernel's documented accuracy on noise still runs."""
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "fbank_accuracy.py"), "--draws", "1"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    errors = re.findall(r"draw 0: (kernel|float32 reference) +max ([0-9.e+-]+), over 1e-4: (\d+) of 262144", done.stdout)
    assert [name for name, _, _ in errors] == ["kernel", "float32 reference"]
    assert all(0 < float(error) < 1e-3 for _, error, _ in errors)  # float32 rounding, not a broken path


def test_on_a_gpu_the_tests_alone_get_a_command_of_their_own_and_the_scripts_leave_time_to_stop(
        tmp_path, monkeypatch):
    """On a GPU (faked here, nothing runs): --tests --only gives the CUDA tests 520 s, not the
    100 s of a run with the benchmarks, which cut most of them; each script's limit leaves the
    15 s a stopped one has to finish inside the budget, as do the tests; a relative --out names the folder it
    names from here, not from the repository root where the scripts run."""
    import torch

    run_all = _run_all_module()
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(run_all, "preflight", lambda: (None, []))
    monkeypatch.setattr(run_all, "gpu_name", lambda: "a GPU")
    monkeypatch.setattr(run_all, "run_tests", lambda out, env, timeout, per_test: calls.append(("tests", out, timeout))
                        or ("ok", 0.0))
    monkeypatch.setattr(run_all, "run", lambda name, args, out, csv_path, env, timeout: calls.append((name, out, timeout))
                        or ("ok", 0.0))
    monkeypatch.chdir(tmp_path)
    assert run_all.main(["--tests", "--only", "--out", "alone"]) == 0
    assert calls == [("tests", tmp_path / "alone", pytest.approx(run_all.GPU_TESTS_ALONE_BUDGET_S, abs=1))]
    calls.clear()
    assert run_all.main(["--tests", "--only", "masks", "--out", "with", "--budget", "50"]) == 0
    (_, _, tests), (name, out, masks) = calls  # the faked tests took no time
    assert tests == pytest.approx(50 - run_all.STOP_GRACE_S, abs=1) and name == "masks" and out == tmp_path / "with"
    assert masks == pytest.approx(50 - run_all.STOP_GRACE_S, abs=1)
    calls.clear()
    assert run_all.main(["--tests", "--only", "masks", "--out", "default"]) == 0
    assert calls[0][2] == pytest.approx(run_all.GPU_TESTS_BUDGET_S, abs=1)
