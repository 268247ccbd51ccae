"""Shared plumbing of the benchmarks: environment description, timing, CSV rows.

Every benchmark appends one CSV row per measurement with the device, the library versions, the
date and the git commit, so numbers from different machines and days can be compared as data.
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import subprocess
import traceback
from pathlib import Path

import torch

CSV_FIELDS = [
    "date", "commit", "device", "torch", "triton", "cuda", "benchmark", "case", "variant",
    "pass", "median_ms", "p20_ms", "p80_ms", "throughput", "unit", "peak_mem_mb", "note",
]


def git_commit() -> str:
    """The checkout's commit (``+dirty`` with local changes); ``SSLAM_COMMIT`` when the tree was
    copied without its git folder (e.g. to a remote GPU machine)."""
    if os.environ.get("SSLAM_COMMIT"):
        return os.environ["SSLAM_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        )
        dirty = subprocess.run(
            ["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
            text=True, cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: str | torch.device = "cuda") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu} ({torch.get_num_threads()} threads)"


def environment(device: str | torch.device = "cuda") -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": git_commit(),
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        # The CUDA that ran the rows: none for a CPU device, whatever torch was built with.
        "cuda": (torch.version.cuda or "none") if torch.device(device).type == "cuda" else "none",
    }


def append_rows(path: str | os.PathLike, rows: list[dict], announce: bool = True) -> None:
    """Append ``rows`` (dicts keyed by :data:`CSV_FIELDS`) to the CSV at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="raise")
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in CSV_FIELDS})
    if announce:
        print(f"\nappended {len(rows)} rows to {path}")


class CsvRows:
    """A benchmark's rows, each appended to the CSV at ``path`` (when given) as it is added, with
    the ``fixed`` fields (the environment, the benchmark's name): a script stopped part-way (its
    time limit reached, a later variant crashing the process) keeps every row it measured.
    Iterating gives the rows added, fixed fields included."""

    def __init__(self, path: str | os.PathLike | None, **fixed):
        self.path, self.fixed, self.rows = path, fixed, []

    def append(self, row: dict) -> None:
        row = {**self.fixed, **row}
        self.rows.append(row)
        if self.path is not None:
            append_rows(self.path, [row], announce=False)

    def __iter__(self):
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)


def cuda_timing(fn, *, warmup_ms: float = 25, rep_ms: float = 100) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of ``fn()`` on the current CUDA device:
    ``triton.testing.do_bench``, CUDA events around each call after it clears the L2 cache on
    the GPU. The host's cost of issuing ``fn`` overlaps that clear, so it counts only where it
    is the longer (``bench_launch.host_us`` measures it alone)."""
    from triton.testing import do_bench

    med, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return med, p20, p80


def graph_timing(fn, *, rep_ms: float = 100) -> tuple[float, float, float] | None:
    """(median, p20, p80) milliseconds of ``fn()`` replayed from a CUDA graph: the GPU's time
    alone, without the host's cost of issuing the call. None, with the reason printed, when ``fn`` cannot be
    captured. Nothing flushes the L2 cache between replays: data that fits in it is timed at
    L2 speed."""
    from triton.testing import do_bench_cudagraph

    try:
        med, p20, p80 = do_bench_cudagraph(fn, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    except Exception as exc:  # a variant that cannot be captured is reported, not fatal
        print(f"  (no CUDA-graph timing: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:100]})")
        return None
    return med, p20, p80


def cpu_timing(fn, *, repeats: int = 5, warmup: int = 1) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds of ``fn()`` by wall clock (for CPU benchmarks)."""
    import time

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    t = torch.tensor(times, dtype=torch.float64)
    # quantile, not median: of an even count, torch.median returns the lower middle value
    return (float(t.quantile(0.5)), float(t.quantile(0.2)), float(t.quantile(0.8)))


def peak_memory_mb(fn, device: str | torch.device = "cuda") -> float:
    """Peak CUDA memory allocated while running ``fn()`` once, in MiB (0 on CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 0.0
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def kernel_device(parser, quick: bool) -> str:
    """'cuda' when there is a GPU, else 'cpu' for a ``--quick`` run (kernels through the Triton
    interpreter); a full kernel benchmark without a GPU is an argument error."""
    if torch.cuda.is_available():
        return "cuda"
    if not quick:
        parser.error("no CUDA device: only --quick runs on CPU (under the Triton interpreter)")
    return "cpu"


def measure(fn, device: str) -> tuple[tuple[float, float, float], float]:
    """((median, p20, p80) ms, peak MiB) of ``fn()``. On a GPU: three untimed calls first
    (compilation, allocation, clocks), then CUDA-event timing and the peak memory of one call.
    On the CPU (``--quick``, interpreted kernels): one warm-up and one timed call, peak 0."""
    if torch.device(device).type == "cuda":
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        return cuda_timing(fn), peak_memory_mb(fn, device)
    return cpu_timing(fn, repeats=1, warmup=1), 0.0


def compile_backend(device: str) -> str:
    """``torch.compile``'s backend for a baseline: inductor on a GPU; on the CPU (``--quick``)
    aot_eager, which traces without generating code and so runs in seconds."""
    return "inductor" if torch.device(device).type == "cuda" else "aot_eager"


def measure_or_fail(fn, device: str, prepare=None) -> tuple[tuple[float, float, float], float, str]:
    """:func:`measure` of ``fn`` (after ``prepare()`` when given) and "", or NaNs and
    "failed: <error>" when either raises (a baseline that does not compile, say): the error is
    printed, and the benchmark goes on to its other variants, whose rows are still written."""
    try:
        if prepare is not None:
            prepare()
        timing, peak = measure(fn, device)
        return timing, peak, ""
    except Exception as exc:
        traceback.print_exc()
        first_line = str(exc).splitlines()[0][:200] if str(exc) else ""
        nan = float("nan")
        return (nan, nan, nan), nan, f"failed: {type(exc).__name__}: {first_line}"


def autotune_report(autotuners: dict, seen: set) -> str:
    """Every configuration each autotuned kernel timed on its latest new key, fastest first.

    Shows how close the runners-up came, i.e. where tuning could go next. ``autotuners`` maps
    a label to a ``triton.autotune`` object; ``seen`` holds the timing tables already reported
    (pass the same set on every call), so each table is printed once."""
    lines = []
    for label, tuner in autotuners.items():
        timings = getattr(tuner, "configs_timings", None)
        if not timings or id(timings) in seen:
            continue
        seen.add(id(timings))
        lines.append(f"autotuning {label}:")
        median = {config: t[0] if isinstance(t, (list, tuple)) else t for config, t in timings.items()}
        for config in sorted(median, key=median.get):
            mark = "  <- chosen" if config is getattr(tuner, "best_config", None) else ""
            lines.append(f"  {median[config] * 1e3:9.1f} us  {config}{mark}")
    return "\n".join(lines)
