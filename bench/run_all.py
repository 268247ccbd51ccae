"""The whole benchmark suite in one command: every kernel (attention, fused features, mixing,
decoder, regression sums), the encoder, the training step (its variants, with profiles), where its activation
memory goes, and the CPU data path.

    python bench/run_all.py --out bench/results/h100     # on a GPU, under 8 minutes
    python bench/run_all.py --quick --out /tmp/bench     # CPU smoke run (kernels interpreted)
    python bench/run_all.py --tests --out DIR            # the CUDA tests first, then the suite

Writes into ``--out``: ``results.csv`` (one row per measurement with device, versions, date and
git commit), one ``<benchmark>.txt`` log per script, ``report.md`` (the tables) and one PNG
plot per benchmark. Each script runs in its own process, so a failure is reported and the suite
goes on; the exit status says whether everything ran. A script that runs past its time limit
(``--timeout``; on a GPU, by default, a limit of its own within the suite's 8 minutes) is
stopped and counted as failed; scripts write each row as they measure it, the report is
rewritten after every script, and on a GPU what matters most runs first, so a run cut short (a
GPU lent for a limited time) still leaves the tables of everything measured.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent


# Stage 2 on a GPU: the four compared implementations (ours and good eager first), ours in
# half weights, and the least-memory one (the per-clip memory goal). ours_compile and
# ours_lowmem (bench_step.py --variants) are left out of the suite's time.
STEP_VARIANTS = ["ours", "eager", "official", "compile", "ours_pure", "ours_minmem"]
# The suite's time on a GPU unless --budget says otherwise: the 8 minutes it is meant to fit,
# less a margin for starting the interpreter (torch, triton, nvidia-smi) and writing the report.
GPU_BUDGET_S = 450
# How long a script stopped at its limit may take to print its summary before it is killed;
# each script's limit leaves this much of the budget for it.
STOP_GRACE_S = 15
# What one script may take on a GPU (under --timeout and the budget): a slow compile or search
# stops there, its rows so far kept, and leaves the rest of the budget to the others. The
# first step variant compiles and tunes every kernel on a fresh machine before its main row
# (its whole run took 73 s on an H200 on 2026-12-04, in a run that may have found them built).
GPU_SCRIPT_CAP_S = 90
GPU_SCRIPT_CAPS = {"step-ours": 150, "step-compile": 120, "step_stage1": 180}
# The CUDA tests' share of a GPU run (--tests), before the benchmarks' budget; the whole of a
# command of 10 minutes when they run alone (--tests --only).
GPU_TESTS_BUDGET_S = 100
GPU_TESTS_ALONE_BUDGET_S = 520


def plan(quick: bool, gpu: bool, out: Path) -> list[tuple[str, list[str]]]:
    """(name, arguments) of every benchmark script to run."""
    if quick:
        return [
            ("launch", ["bench_launch.py", "--quick"]),
            ("attention", ["bench_attention.py", "--quick"]),
            ("fbank_patch", ["bench_fbank_patch.py", "--quick"]),
            ("mixture", ["bench_mixture.py", "--quick"]),
            ("decoder", ["bench_decoder.py", "--quick"]),
            ("regression", ["bench_regression.py", "--quick"]),
            ("masks", ["bench_masks.py", "--rows", "192", "--quick"]),
            ("encoder", ["bench_encoder.py", "--quick"]),
            ("step", ["bench_step.py", "--quick", "--profile", str(out / "profile")]),
            ("memory", ["bench_memory.py", "--quick"]),
            ("cpu", ["bench_cpu.py", "--quick"]),
        ]
    steps = [
        ("masks", ["bench_masks.py", "--rows", "192"]),
        ("cpu", ["bench_cpu.py", "--rate", "44100", "--clips", "16"]),
    ]
    if gpu:
        # Stage 2 in full (largest batch, profiles), each variant in a process of its own: one
        # variant after another in one process ran slower than alone (the host issues the step,
        # and what the earlier ones left behind slowed it).
        stage2 = {variant: (f"step-{variant}", ["bench_step.py", "--preset", "base", "--stage", "2", "--batch", "12",
                                                "--max-batch", "--profile", str(out / "profile"), "--variants",
                                                variant])
                  for variant in STEP_VARIANTS}
        # In order of what matters most, so that a budget spent early (a GPU lent for minutes)
        # loses the least: the step's main comparison, every kernel once (the two largest
        # first), the rest of the step (stage 1 in one process, for the four implementations
        # compared, without profiles; the compiled one is not searched, as in stage 2), then
        # what runs on the host's CPU anyway.
        steps = [
            stage2["ours"], stage2["eager"],
            ("attention", ["bench_attention.py", "--case", "all", "--dtype", "bf16"]),
            ("fbank_patch", ["bench_fbank_patch.py", "--batch", "48"]),
            ("mixture", ["bench_mixture.py"]),
            ("decoder", ["bench_decoder.py"]),
            ("regression", ["bench_regression.py"]),
            stage2["official"], stage2["compile"],
            ("step_stage1", ["bench_step.py", "--preset", "base", "--stage", "1", "--batch", "12", "--max-batch",
                             "--variants", *STEP_VARIANTS[:4]]),
            stage2["ours_pure"], stage2["ours_minmem"],
            ("launch", ["bench_launch.py", "--host-profile", "attention fwd+bwd", "grouped_conv fwd+bwd"]),
            ("encoder", ["bench_encoder.py", "--variant", "base", "--batch", "1", "16"]),
            # Where the activation memory goes, by module (per clip, so a small batch is enough).
            ("memory", ["bench_memory.py", "--preset", "base", "--stage", "2", "--batch", "4"]),
            *steps,  # the CPU's, short
        ]
    else:
        steps = [("encoder", ["bench_encoder.py", "--variant", "base", "--batch", "1", "16", "--repeats", "2"]),
                 ("step", ["bench_step.py", "--preset", "tiny"])] + steps
    return steps


def run_logged(name: str, command: list[str], log_path: Path, env: dict, timeout: float,
               ok_codes=(0,)) -> tuple[str, float]:
    """(status: 'ok', 'TIMED OUT', 'FAILED (exit N)' or 'NOT KILLED'; seconds) of ``command``, its
    output logged to ``log_path``, stopped after ``timeout`` seconds: interrupted first (Ctrl-C:
    pytest then prints its summary, a benchmark its traceback), killed if still running 15 s
    later. However it ends, and however this process is stopped, whatever it started (compile
    workers, spawned measurements) is killed with it: nothing is left holding the GPU."""
    start = time.perf_counter()
    with log_path.open("w") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=HERE.parent,
                                   start_new_session=True)  # a group of its own, to stop with its children
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=STOP_GRACE_S)
            log.write(f"\nstopped after {timeout:.0f} s (its time limit)\n")
            code = None
        finally:
            _signal_group(process, signal.SIGKILL)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:  # stuck in the driver: reported, and the suite goes on
            code = "not killed"
    seconds = time.perf_counter() - start
    if code is None:
        status = "TIMED OUT"
    elif code == "not killed":
        status = "NOT KILLED"
    else:
        status = "ok" if code in ok_codes else f"FAILED (exit {code})"
    print(f"{name:>12}: {status} in {seconds:.0f} s -> {log_path}", flush=True)
    return status, seconds


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # the whole group may be gone already
        os.killpg(process.pid, sig)


def run(name: str, args: list[str], out: Path, csv_path: Path, env: dict, timeout: float) -> tuple[str, float]:
    """One benchmark script, logged to ``<name>.txt`` (see :func:`run_logged`)."""
    command = [sys.executable, str(HERE / args[0]), *args[1:], "--csv", str(csv_path)]
    return run_logged(name, command, out / f"{name}.txt", env, timeout)


def run_tests(out: Path, env: dict, timeout: float, per_test: float) -> tuple[str, float]:
    """The CUDA tests (``-k "cuda or gpu"``; they skip without a GPU), logged to ``tests.txt``.

    Each test may run ``per_test`` seconds (pytest-timeout): a slow one fails with its
    traceback and the run goes on to its summary, which a stop at ``timeout`` would lose."""
    command = [sys.executable, "-m", "pytest", "tests", "-k", "cuda or gpu", "-v", "-rfE", "--tb=short",
               "-p", "no:cacheprovider", f"--timeout={per_test:.0f}"]
    # pytest exits with 5 when every test was deselected: nothing failed
    return run_logged("cuda tests", command, out / "tests.txt", env, timeout, ok_codes=(0, 5))


def _test_summary(out: Path, status: str | None) -> list[str]:
    """The CUDA tests' failures and final count, from ``tests.txt``; ``status``: their run's."""
    log = out / "tests.txt"
    if not log.exists():
        return []
    lines = log.read_text().splitlines()
    failed = [line for line in lines if line.startswith(("FAILED ", "ERROR "))]
    counts = [line.strip("= ") for line in lines if line.startswith("=") and any(
        word in line for word in (" passed", " failed", " skipped", " error", "no tests ran"))]
    cut = ["", "(interrupted at the tests' time limit: the remaining tests did not run)"] if status == "TIMED OUT" else []
    return ["", "## CUDA tests", "", *(f"- {line}" for line in failed), "",
            *(counts[-1:] or ["(no summary: see tests.txt)"]), *cut]


def read_rows(csv_path: Path) -> list[dict]:
    if not csv_path.exists():
        return []
    with csv_path.open() as f:
        return list(csv.DictReader(f))


def report(rows: list[dict], out: Path, timings: dict[str, tuple[str, float]], run: str = "") -> str:
    """Markdown tables (one per benchmark and case) and one bar plot per benchmark; ``run`` says
    where and when the suite ran (also when no script wrote a row)."""
    lines = ["# Benchmark report", ""] + ([f"- Run: {run}"] if run else [])
    # Where and with what the rows were measured: a line for each combination (the GPU's rows
    # and those of the host's CPU benchmarks differ in device, say).
    setups = dict.fromkeys((r["device"], r["torch"], r["triton"], r["cuda"], r["commit"]) for r in rows)
    for device, torch_version, triton_version, cuda, commit in setups:
        first = min(r["date"] for r in rows if (r["device"], r["commit"]) == (device, commit))
        lines.append(f"- Device: {device}; torch {torch_version}; triton {triton_version}; CUDA {cuda}; "
                     f"commit {commit}; from {first}")
    lines += [""] if setups else []
    lines += ["| script | status | seconds |", "|---|---|---|"]
    lines += [f"| {n} | {status} | {s:.0f} |" for n, (status, s) in timings.items()]
    groups: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        groups[row["benchmark"]][row["case"]].append(row)
    for bench, cases in groups.items():
        lines += ["", f"## {bench}", ""]
        for case, case_rows in cases.items():
            lines += [f"**{case}**", "", "| variant | pass | median ms | p20 | p80 | throughput | peak MiB | note |",
                      "|---|---|---|---|---|---|---|---|"]
            for r in case_rows:
                tp = f"{float(r['throughput']):.4g} {r['unit']}" if r.get("throughput") else ""
                lines.append(f"| {r['variant']} | {r['pass']} | {_num(r.get('median_ms'))} | {_num(r.get('p20_ms'))} | "
                             f"{_num(r.get('p80_ms'))} | {tp} | {_num(r.get('peak_mem_mb'))} | {r.get('note', '')} |")
            lines.append("")
        try:
            _plot(bench, cases, out)
            lines.append(f"![{bench}]({bench}.png)")
        except Exception as exc:  # a plot is not worth the rest of the suite
            lines.append(f"(no plot: {type(exc).__name__}: {exc})")
    lines += _test_summary(out, timings.get("cuda tests", (None,))[0])
    lines += _profile_tables(out / "profile")
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    return text


def _profile_tables(folder: Path) -> list[str]:
    """The step benchmark's top-operation tables (by GPU time on a GPU), next to their traces."""
    tables = sorted(folder.glob("top_ops_*.txt"))
    if not tables:
        return []
    lines = ["", "## Profiles: top operations of the training step", ""]
    for table in tables:
        name = table.stem.removeprefix("top_ops_")
        lines += [f"**{name}** (trace: `{folder.name}/trace_{name}.json.gz`)", "", "```",
                  table.read_text().rstrip(), "```", ""]
    return lines


def _float(value) -> float:
    """A CSV cell as a number; NaN where it holds none."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _num(value) -> str:
    return "" if math.isnan(_float(value)) else f"{_float(value):.4g}"


def _plot(bench: str, cases: dict, out: Path) -> None:
    """Median time per variant (log scale), one group of bars per case and pass; peak memory
    for a benchmark that measures no time (the saved activations)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for case_rows in cases.values() for r in case_rows]
    metric, unit = ("median_ms", "median ms") if any(r.get("median_ms") for r in rows) else ("peak_mem_mb", "MiB")
    labels, series = [], defaultdict(dict)
    for case, case_rows in cases.items():
        for r in case_rows:
            if not math.isfinite(_float(r.get(metric))) or _float(r.get(metric)) <= 0:  # failed, or no time
                continue
            key = f"{case}\n{r['pass']}"
            if key not in labels:
                labels.append(key)
            series[r["variant"]][key] = float(r[metric])
    if not labels:
        return
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(labels)), 4))
    width = 0.8 / max(1, len(series))
    for j, (variant, values) in enumerate(series.items()):
        xs = [i + j * width for i, key in enumerate(labels) if key in values]
        ax.bar(xs, [values[k] for k in labels if k in values], width, label=variant)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel(f"{unit} (lower is better)")
    ax.set_title(bench)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{bench}.png", dpi=110)
    plt.close(fig)


def gpu_name() -> str:
    """The GPU's name from nvidia-smi, which leaves this process without a CUDA context."""
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True, timeout=30, check=True).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return "a CUDA GPU"
    return names[0].strip() or "a CUDA GPU"


def preflight() -> tuple[str | None, list[str]]:
    """(why the suite cannot run here, or None; warnings), before any time is spent."""
    try:
        import sslam.kernels  # noqa: F401
    except Exception as exc:
        return (f"sslam.kernels does not import ({type(exc).__name__}: {exc}); install the package first: "
                "pip install --no-deps --no-build-isolation -e ."), []
    from common import git_commit

    from sslam import native

    warnings = []
    if not native.built():
        warnings.append("the C++ extension (sslam._native) is not built here: the masks and CPU data-path "
                        "benchmarks measure without it (pip install -e . builds it)")
    if git_commit() == "unknown":
        warnings.append("no git checkout: every row will say commit 'unknown' (set SSLAM_COMMIT)")
    return None, warnings


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true", help="small CPU version (kernels under the Triton interpreter)")
    p.add_argument("--only", nargs="*", default=None,
                   help="run only these benchmarks, in this order (none at all: with --tests, the tests alone)")
    p.add_argument("--timeout", type=float, default=None,
                   help=f"seconds one script may run before it is stopped (default: {GPU_SCRIPT_CAP_S} on a GPU, "
                        f"{', '.join(f'{k} {v}' for k, v in GPU_SCRIPT_CAPS.items())}; 900 on the CPU)")
    p.add_argument("--budget", type=float, default=None,
                   help=f"seconds for the whole suite: each script may run only for what is left less {STOP_GRACE_S} s "
                        "(for a stopped one's summary), and none starts with under 10 s of that (default on a GPU: "
                        f"{GPU_BUDGET_S} for the benchmarks, i.e. within 8 minutes, after any --tests; none on the CPU)")
    p.add_argument("--tests", action="store_true",
                   help="run the CUDA tests first (tests.txt and a section of the report)")
    p.add_argument("--tests-budget", type=float, default=None,
                   help=f"seconds for all the CUDA tests, stopped there with their summary (default on a GPU: "
                        f"{GPU_TESTS_BUDGET_S}, or {GPU_TESTS_ALONE_BUDGET_S} for the tests alone, --only without "
                        "names; within --budget when one is given)")
    p.add_argument("--test-timeout", type=float, default=120, help="seconds one test may run (with --tests)")
    args = p.parse_args(argv)
    if args.only == [] and not args.tests:
        p.error("--only without names runs nothing (with --tests: the tests alone)")
    # A stop from outside (timeout, a scheduler) unwinds like Ctrl-C: the running script's group
    # is killed on the way out (run_logged), not left running with the GPU.
    signal.signal(signal.SIGTERM, lambda sig, frame: sys.exit(128 + sig))
    import torch

    gpu = torch.cuda.is_available()
    timed_gpu = gpu and not args.quick  # where the default time limits apply
    problem, warnings = preflight()
    if problem:
        p.error(problem)
    for warning in warnings:
        print(f"warning: {warning}", flush=True)
    out = Path(args.out).resolve()  # the scripts run from the repository root
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "results.csv"
    env = dict(os.environ, PYTHONUNBUFFERED="1")  # a script stopped at its time limit keeps its log
    # Autotuning results go to Triton's disk cache: the kernel benchmarks tune (and report) each
    # kernel once, and the encoder and step benchmarks, in later processes, reuse the choice
    # instead of spending their time budget tuning again.
    env.setdefault("TRITON_CACHE_AUTOTUNING", "1")
    if args.quick and not gpu:
        env["TRITON_INTERPRET"] = "1"
    chosen = dict(plan(args.quick, gpu, out))
    # "step" names the stage-2 step's variants where each runs on its own ("step-ours", ...).
    variants = [name for name in chosen if name.startswith("step-")]
    only = list(dict.fromkeys(  # in the order given, each once
        n for name in args.only or () for n in (variants if name == "step" and variants else [name])))
    unknown = set(only) - set(chosen)
    if unknown:
        p.error(f"--only: no benchmark named {sorted(unknown)} in this plan; choose from {list(chosen)}")
    if csv_path.exists() and csv_path.stat().st_size:  # rows of two runs would mix in one report
        p.error(f"--out {out}: holds the results.csv of an earlier run; choose a new folder")
    from common import environment

    # The host's description, not the GPU's: asking torch for the GPU's name here would make this
    # process hold a CUDA context (GPU memory) for the whole run, beside every benchmark's.
    where = environment("cpu")
    run_line = f"{gpu_name() if gpu else where['device']}; from {where['date']}; commit {where['commit']}"
    timings = {}
    deadline = time.monotonic() + args.budget if args.budget is not None else float("inf")
    if args.tests:
        alone = GPU_TESTS_ALONE_BUDGET_S if args.only == [] else GPU_TESTS_BUDGET_S
        tests_budget = args.tests_budget if args.tests_budget is not None else (alone if timed_gpu else float("inf"))
        left = min(deadline - time.monotonic() - STOP_GRACE_S, tests_budget)
        limit = 900 if args.timeout is None else args.timeout
        timings["cuda tests"] = (run_tests(out, env, min(limit, left), args.test_timeout) if left >= 10
                                 else ("not started (time budget)", 0.0))
        report(read_rows(csv_path), out, timings, run_line)
    if args.budget is None and timed_gpu:  # the benchmarks' 8 minutes, after any tests
        deadline = time.monotonic() + GPU_BUDGET_S
    for name in chosen if args.only is None else only:  # --only runs in the order given
        left = deadline - time.monotonic() - STOP_GRACE_S  # a script stopped at its limit ends within it
        limit = args.timeout if args.timeout is not None else (
            GPU_SCRIPT_CAPS.get(name, GPU_SCRIPT_CAP_S) if timed_gpu else 900)
        if left < 10:
            print(f"{name:>12}: not started, the --budget is spent", flush=True)
            timings[name] = ("not started (--budget)", 0.0)
        else:
            timings[name] = run(name, chosen[name], out, csv_path, env, min(limit, left))
        report(read_rows(csv_path), out, timings, run_line)
    report(read_rows(csv_path), out, timings, run_line)
    print(f"wrote {out / 'report.md'}")
    return 0 if all(status == "ok" for status, _ in timings.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
