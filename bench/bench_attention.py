"""Benchmark of kernels/attention.py against PyTorch's attention implementations.

Shapes are those of SSLAM ViT-B training (12 heads, head dim 64) per GPU step:

    student  192 sequences x 103 tokens   (102 kept patches + CLS of the masked clones)
    teacher   24 sequences x 513 tokens   (full clips)
    partner   12 sequences x 273 tokens   (stage-2 partner pass)

q, k, v are views of one packed (B, L, 3, H, Dh) projection, as in the encoder, and every variant
returns the (B, L, H * Dh) tensor the output projection needs. Variants: ours (Triton),
``F.scaled_dot_product_attention`` with each backend forced (flash, efficient, cudnn, math; a
backend that refuses the shape is recorded as unsupported), eager matmul-softmax
(``attention_ref(upcast=False)``, the official recipe) and xformers when installed.

Passes: ``fwd`` (with autograd recording, as in training), ``bwd`` (dq, dk, dv from a recorded
forward) and ``full`` (both), each timed twice on a GPU: as eager Python calls
(``common.cuda_timing``, events around each call after an L2 clear: launch and dispatch
overhead shows only where it exceeds the clear's GPU time; ``bench_launch.py`` measures it)
and as CUDA-graph replays (``*_graph`` rows: GPU time alone). TFLOP/s counts 4 B H L^2 Dh for the
forward and 2.5x that for the backward. Results are printed and appended as CSV rows
(``bench/common.py``).

    python bench/bench_attention.py --case all --dtype bf16 --csv bench/results/attention.csv
    python bench/bench_attention.py --quick      # tiny, runs on CPU under the Triton interpreter
"""

import argparse
import math
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # CPU runs (--quick) execute the kernels with the Triton interpreter; it must be chosen
    # before the kernels are decorated, i.e. before sslam.kernels is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("SSLAM_KERNELS", "1")

import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    CsvRows,
    autotune_report,
    cpu_timing,
    cuda_timing,
    environment,
    kernel_device,
    peak_memory_mb,
)
from sslam.kernels.attention import attention, attention_ref  # noqa: E402

attn = sys.modules["sslam.kernels.attention"]  # the module (the package exports a function of that name)

HEADS, HEAD_DIM = 12, 64
CASES = {"student": (192, 103), "teacher": (24, 513), "partner": (12, 273)}
QUICK_CASES = {"student": (3, 21), "teacher": (2, 45), "partner": (2, 33)}
QUICK_HEADS = 2
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
PASSES = ("fwd", "bwd", "full")
BWD_FLOP_FACTOR = 2.5


def attention_flops(batch: int, heads: int, seqlen: int, head_dim: int) -> float:
    """Forward FLOPs: two (L x L x Dh) matrix products per (sequence, head), 2 FLOPs a MAC."""
    return 4.0 * batch * heads * seqlen * seqlen * head_dim


# ----------------------------------------------------------------------------------------------
# Variants: each maps (q, k, v) views of (B, L, H, Dh) to (B, L, H * Dh)
# ----------------------------------------------------------------------------------------------


def ours(q, k, v):
    batch, seqlen = q.shape[:2]
    return attention(q, k, v).reshape(batch, seqlen, -1)


def eager(q, k, v):
    batch, seqlen = q.shape[:2]
    return attention_ref(q, k, v, upcast=False).reshape(batch, seqlen, -1)


def sdpa_with(backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }[backend_name]

    def run(q, k, v):
        batch, seqlen = q.shape[:2]
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
        return out.transpose(1, 2).reshape(batch, seqlen, -1)

    return run


def xformers_variant():
    """xformers' memory-efficient attention, or None when xformers is not installed."""
    try:
        import xformers.ops as xops
    except ImportError:
        return None

    def run(q, k, v):
        batch, seqlen = q.shape[:2]
        return xops.memory_efficient_attention(q, k, v).reshape(batch, seqlen, -1)

    return run


def variants() -> dict:
    table = {"ours": ours}
    for name in ("flash", "efficient", "cudnn", "math"):
        table[f"sdpa_{name}"] = sdpa_with(name)
    table["eager"] = eager
    xf = xformers_variant()
    if xf is not None:
        table["xformers"] = xf
    return table


# ----------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------


def make_inputs(batch, seqlen, heads, head_dim, dtype, device):
    """q, k, v: strided (B, L, H, Dh) views of one packed projection, leaves requiring grad."""
    qkv = torch.randn(batch, seqlen, 3, heads, head_dim, device=device, dtype=dtype)
    # detach() keeps the packed strides, so each view is a leaf whose gradient is its own.
    return [t.detach().requires_grad_() for t in qkv.unbind(2)]


def passes_of(fn, inputs):
    """{pass name: zero-argument callable} for one variant."""
    grad_out = torch.randn_like(fn(*inputs))
    recorded = fn(*inputs)

    def backward():
        return torch.autograd.grad(recorded, inputs, grad_out, retain_graph=True)

    def full():
        return torch.autograd.grad(fn(*inputs), inputs, grad_out)

    return {"fwd": lambda: fn(*inputs), "bwd": backward, "full": full}


def measure(fn, device: str, quick: bool):
    if device == "cuda":
        return cuda_timing(fn)
    return cpu_timing(fn, repeats=2 if quick else 5)


def graph_timings(fn, inputs) -> dict:
    """{pass: (median, p20, p80) ms} of CUDA-graph replays: GPU time without launch overhead.

    Only ``fwd`` and ``full`` can be captured on their own (a backward replays the autograd graph
    of a forward recorded outside the capture); ``bwd`` is reported as full - fwd (medians).
    Fresh leaves are used so that no autograd node from an earlier, uncaptured call is reused.
    """
    from triton.testing import do_bench_cudagraph

    leaves = [t.detach().requires_grad_() for t in inputs]
    grad_out = torch.randn_like(fn(*leaves))

    def forward():
        fn(*leaves)

    def full():
        torch.autograd.grad(fn(*leaves), leaves, grad_out)

    quantiles = [0.5, 0.2, 0.8]
    out = {"fwd": do_bench_cudagraph(forward, quantiles=quantiles),
           "full": do_bench_cudagraph(full, quantiles=quantiles)}
    out["bwd"] = (out["full"][0] - out["fwd"][0], None, None)
    return out


def max_error(fn, inputs) -> float:
    """Max |variant - fp32 reference| on the forward output (a sanity check, not a test)."""
    with torch.no_grad():
        out = fn(*inputs).float()
        ref = attention_ref(*inputs, upcast=True).reshape(out.shape).float()
    return (out - ref).abs().max().item()


def _reason(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0][:160] if str(exc).strip() else repr(exc)


def bench_case(case, shape, heads, dtype, device, quick, rows: list) -> None:
    """Every variant x pass of one case, each row appended to ``rows`` (a :class:`common.CsvRows`)
    as it is measured: a variant the backend does not support, or one that fails (a Triton
    compile error, out of memory), is recorded as such and the others still run."""
    batch, seqlen = shape
    inputs = make_inputs(batch, seqlen, heads, HEAD_DIM, dtype, device)
    fwd_flops = attention_flops(batch, heads, seqlen, HEAD_DIM)
    flops = {"fwd": fwd_flops, "bwd": BWD_FLOP_FACTOR * fwd_flops,
             "full": (1 + BWD_FLOP_FACTOR) * fwd_flops}
    shape_note = f"B={batch} L={seqlen} H={heads} Dh={HEAD_DIM} {str(dtype).split('.')[-1]}"
    for name, fn in variants().items():
        try:
            err = max_error(fn, inputs)
            calls = passes_of(fn, inputs)
        except Exception as exc:
            # "No available kernel" from a forced SDPA backend is the backend's gap; out of
            # memory or a compile error is a failure.
            gap = isinstance(exc, RuntimeError) and not isinstance(exc, torch.OutOfMemoryError)
            for pass_name in PASSES:
                rows.append(dict(case=case, variant=name, **{"pass": pass_name},
                                 note=f"{shape_note}; {'unsupported' if gap else 'failed'}: {_reason(exc)}"))
            continue
        for pass_name in PASSES:
            try:
                median, p20, p80 = measure(calls[pass_name], device, quick)
                peak = peak_memory_mb(calls[pass_name], device)
            except Exception as exc:
                rows.append(dict(case=case, variant=name, **{"pass": pass_name},
                                 note=f"{shape_note}; failed: {type(exc).__name__}: {_reason(exc)}"))
                continue
            rows.append(dict(
                case=case, variant=name, **{"pass": pass_name},
                median_ms=f"{median:.4f}", p20_ms=f"{p20:.4f}", p80_ms=f"{p80:.4f}",
                throughput=f"{flops[pass_name] / (median * 1e-3) / 1e12:.2f}", unit="TFLOP/s",
                peak_mem_mb=f"{peak:.1f}", note=f"{shape_note}; eager calls; max abs err vs fp32 {err:.2e}",
            ))
        del calls
        if device != "cuda":
            continue
        try:
            graphed = graph_timings(fn, inputs)
        except Exception as exc:  # a variant that cannot be captured keeps its eager rows
            print(f"{case} {name}: CUDA graph capture failed: {_reason(exc)}")
            continue
        for pass_name, (median, p20, p80) in graphed.items():
            if median <= 0:  # bwd as full - fwd: within the timing noise, no rate to give
                continue
            how = "cuda graph, full - fwd" if pass_name == "bwd" else "cuda graph"
            rows.append(dict(
                case=case, variant=name, **{"pass": f"{pass_name}_graph"},
                median_ms=f"{median:.4f}", p20_ms="" if p20 is None else f"{p20:.4f}",
                p80_ms="" if p80 is None else f"{p80:.4f}",
                throughput=f"{flops[pass_name] / (median * 1e-3) / 1e12:.2f}", unit="TFLOP/s",
                note=f"{shape_note}; {how}",
            ))


def print_table(rows) -> None:
    """Per case: eager-call timings, then CUDA-graph timings when present ("x ours" = full-pass
    time of the variant / ours, so > 1 means ours is faster)."""
    by_key = {(r["case"], r["variant"], r["pass"]): r for r in rows}
    for case in dict.fromkeys(r["case"] for r in rows):
        names = list(dict.fromkeys(r["variant"] for r in rows if r["case"] == case))
        print(f"\n== {case}: {next(r['note'] for r in rows if r['case'] == case).split(';')[0]}")
        for suffix, title in (("", "eager calls"), ("_graph", "CUDA graph replay")):
            if (case, "ours", "full" + suffix) not in by_key:
                continue
            print(f"-- {title}")
            header = "".join(f"{p + ' ms':>11}{p + ' TF/s':>11}" for p in PASSES)
            print(f"{'variant':<15}{header}{'peak MB' if not suffix else '':>10}{'x ours':>9}")
            ours_full = by_key[(case, "ours", "full" + suffix)].get("median_ms")
            for name in names:
                measured = {p: by_key.get((case, name, p + suffix)) for p in PASSES}
                if not any(row and row.get("median_ms") for row in measured.values()):
                    why = by_key[(case, name, "full")]["note"].split("; ", 1)[-1] if suffix == "" else "no CUDA-graph timing"
                    print(f"{name:<15}{why[:100]}")
                    continue
                cells = "".join(f"{_cell(row, 'median_ms', '.4f')}{_cell(row, 'throughput', '.1f')}"
                                for row in measured.values())
                full = measured["full"] or {}
                memory = "" if suffix else _cell(full, "peak_mem_mb", ".1f", 0)
                # Within one section only: a graph time over an eager one would mean nothing.
                ratio = float(full["median_ms"]) / float(ours_full) if full.get("median_ms") and ours_full else math.nan
                print(f"{name:<15}{cells}{memory:>10}{ratio:>9.2f}")


def _cell(row: dict | None, key: str, spec: str, width: int = 11) -> str:
    """``row[key]`` formatted, or '-' where the pass failed or was not measured."""
    value = (row or {}).get(key)
    return f"{float(value):>{width}{spec}}" if value else f"{'-':>{width}}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=[*CASES, "all"], default="all")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--csv", type=Path, default=None, help="append result rows to this CSV")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes; on a CPU-only machine runs under the Triton interpreter")
    args = parser.parse_args(argv)

    device = kernel_device(parser, args.quick)
    dtype = DTYPES[args.dtype]
    if device == "cpu":
        # The interpreter computes bf16 dot products wrongly; fp32 checks the script end to end.
        dtype = torch.float32
    cases = QUICK_CASES if args.quick else CASES
    heads = QUICK_HEADS if args.quick else HEADS
    selected = list(cases) if args.case == "all" else [args.case]

    env = environment(device)
    rows, seen = CsvRows(args.csv, **env, benchmark="attention"), set()
    tuners = {name: getattr(attn, name) for name in (
        "_fwd_single_block", "_fwd_general", "_bwd_single_block", "_bwd_dq_general", "_bwd_dkdv_general")}
    for case in selected:
        bench_case(case, cases[case], heads, dtype, device, args.quick, rows)
        report = autotune_report(tuners, seen)
        if report:
            print(f"-- {case}\n{report}")
    print(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}")
    print_table(rows)


if __name__ == "__main__":
    main()
