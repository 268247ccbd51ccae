"""Benchmark of kernels/decoder.py: the 6-layer CNN decoder of SSLAM ViT-B, forward, backward and
both, on 192 x 512 x 768 tokens (12 clips x 16 clones, the (64, 8) patch grid), bf16 autocast.

Variants: ``ours`` (token-major layers: the implicit-GEMM grouped conv kernels + the fused
LayerNorm/GELU/residual kernel), ``eager`` (the reference decoder on (B, C, T, F) images) and ``compile``
(torch.compile of the reference). TFLOP/s counts the convs and the final projection (2 FLOPs
per multiply-add; backward twice the forward).

    python bench/bench_decoder.py --csv bench/results/decoder.csv
    python bench/bench_decoder.py --quick     # tiny, runs on CPU under the Triton interpreter
"""

import argparse
import contextlib
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    CsvRows,
    autotune_report,
    compile_backend,
    environment,
    kernel_device,
    measure_or_fail,
)
from sslam.kernels import grouped_conv  # noqa: E402

from sslam.pretrain import CNNDecoder, DecoderConfig  # noqa: E402


def forward_flops(rows: int, embed_dim: int, cfg: DecoderConfig) -> float:
    """Multiply-adds x 2 of the convs and the projection for ``rows`` tokens."""
    convs = sum(cfg.dim * ((embed_dim if i == 0 else cfg.dim) // cfg.groups) * cfg.kernel**2
                for i in range(cfg.layers))
    return 2.0 * rows * (convs + cfg.dim * embed_dim)


def passes(decoder, tokens, grid, device):
    """{pass: fn} for forward, backward (of a saved graph) and both. The backward returns the
    gradients of the tokens and the weights (``autograd.grad``) rather than adding them into
    ``.grad`` at every call, which would time an accumulation the step does not do."""
    autocast = torch.autocast(device, dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()
    grad = torch.randn_like(tokens)
    inputs = [tokens, *(p for p in decoder.parameters() if p.requires_grad)]

    def fwd():
        with torch.no_grad(), autocast:
            return decoder(tokens, grid)

    def full():
        with autocast:
            out = decoder(tokens, grid)
        torch.autograd.grad(out, inputs, grad)

    state = {}

    def prepare():
        with autocast:
            state["out"] = decoder(tokens, grid)

    def bwd():
        torch.autograd.grad(state["out"], inputs, grad, retain_graph=True)

    return {"fwd": fwd, "bwd": bwd, "full": full}, prepare


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=192, help="decoder inputs (clips x clones)")
    parser.add_argument("--csv", type=Path, default=None, help="append result rows to this CSV")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes; on a CPU-only machine runs under the Triton interpreter")
    args = parser.parse_args(argv)
    device = kernel_device(parser, args.quick)
    if args.quick:
        rows, grid, embed_dim, cfg = 2, (8, 4), 32, DecoderConfig(dim=32, groups=4, layers=2)
    else:
        rows, grid, embed_dim, cfg = args.rows, (64, 8), 768, DecoderConfig()
    torch.manual_seed(0)
    decoder = CNNDecoder(embed_dim, cfg).to(device)
    tokens = torch.randn(rows, grid[0] * grid[1], embed_dim, device=device, requires_grad=True)
    compiled = torch.compile(decoder, backend=compile_backend(device))
    flops = forward_flops(rows * grid[0] * grid[1], embed_dim, cfg)
    env = environment(device)
    print(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}")
    print(f"decoder {cfg.layers} x (conv {cfg.kernel}x{cfg.kernel}/{cfg.groups} groups, {cfg.dim} ch) on "
          f"{rows} x {grid[0] * grid[1]} x {embed_dim}; {flops / 1e9:.1f} GFLOP forward")
    print(f"{'variant':10s} {'pass':5s} {'median ms':>10s} {'p20':>8s} {'p80':>8s} {'TFLOP/s':>8s} {'peak MB':>8s}")
    rows_out, medians = CsvRows(args.csv, **env, benchmark="decoder"), {}
    for variant, model in (("eager", decoder), ("compile", compiled), ("ours", decoder)):
        os.environ["SSLAM_KERNELS"] = "1" if variant == "ours" else "0"  # the kernels only for ours
        fns, prepare = passes(model, tokens, grid, device)
        for name, fn in fns.items():
            (med, p20, p80), peak, failure = measure_or_fail(fn, device, prepare if name == "bwd" else None)
            work = flops * {"fwd": 1, "bwd": 2, "full": 3}[name]
            medians[(variant, name)] = med
            rows_out.append(dict(case=f"decoder,{rows}x{grid[0] * grid[1]}x{embed_dim}", variant=variant,
                                 median_ms=med, p20_ms=p20, p80_ms=p80, throughput=work / med / 1e9,
                                 unit="TFLOP/s", peak_mem_mb=peak, note=failure or f"layers={cfg.layers}",
                                 **{"pass": name}))
            print(f"{variant:10s} {name:5s} {med:10.3f} {p20:8.3f} {p80:8.3f} {work / med / 1e9:8.1f} {peak:8.1f}")
    report = autotune_report({name: getattr(grouped_conv, name) for name in ("_conv_fwd", "_conv_wgrad")}, set())
    if report:
        print(report)
    for base in ("eager", "compile"):
        print(f"ours vs {base} (fwd+bwd): {medians[(base, 'full')] / medians[('ours', 'full')]:.2f}x")


if __name__ == "__main__":
    main()
