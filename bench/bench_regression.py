"""Benchmark of kernels/regression.py: the frame and SRL regression sums of a stage-2 step and
pred's gradient, forward, backward and both, at ViT-B shapes: pred (192, 512, 768) (24 clips,
clean and mixed, x 8 clones), fp32 targets (24, 512, 768) and SRL targets (12, 512, 768).

Variants: ``ours`` (the fused kernels), ``eager`` (the reference: two masked regression sums,
the SRL one on pred's mixture rows) and ``compile`` (torch.compile of the reference). GB/s
counts the bytes the fused passes must move (forward: pred, both targets and the mask read;
backward: the same read and pred's gradient written), so the variants compare on one scale.

    python bench/bench_regression.py --csv bench/results/regression.csv
    python bench/bench_regression.py --quick     # tiny, runs on CPU under the Triton interpreter
"""

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CsvRows, compile_backend, environment, kernel_device, measure_or_fail  # noqa: E402
from sslam.kernels import regression_sums, regression_sums_ref  # noqa: E402


def passes(fn, pred, target, masked, clones, srl):
    """{pass: callable} for forward, backward (of a saved graph) and both; and the preparation
    of the backward's graph."""
    pred = pred.detach().requires_grad_()

    def loss():
        frame, srl_sum = fn(pred, target, masked, clones, srl)
        return frame + 2.0 * srl_sum

    def fwd():
        with torch.no_grad():
            return fn(pred, target, masked, clones, srl)

    def full():
        torch.autograd.grad(loss(), pred)  # not into pred.grad: no accumulation timed

    state = {}

    def prepare():
        state["loss"] = loss()

    def bwd():
        torch.autograd.grad(state["loss"], pred, retain_graph=True)

    return {"fwd": fwd, "bwd": bwd, "full": full}, prepare


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=24, help="clips (clean and mixed) of a step")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="pred's dtype")
    parser.add_argument("--csv", type=Path, default=None, help="append result rows to this CSV")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes; on a CPU-only machine runs under the Triton interpreter")
    args = parser.parse_args(argv)
    device = kernel_device(parser, args.quick)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if device == "cpu" and dtype == torch.bfloat16:
        dtype = torch.float16  # the interpreter's bf16 arithmetic is not supported
    clips, clones, n, d = (4, 2, 16, 64) if args.quick else (args.clips, 8, 512, 768)
    g = torch.Generator(device).manual_seed(0)
    pred = torch.randn(clips * clones, n, d, device=device, generator=g).to(dtype)
    target = torch.randn(clips, n, d, device=device, generator=g)
    srl = torch.randn(clips // 2, n, d, device=device, generator=g)
    masked = torch.rand(clips * clones, n, device=device, generator=g) < 0.8
    reads = pred.nbytes + target.nbytes + srl.nbytes + masked.nbytes
    moved = {"fwd": reads, "bwd": reads + pred.nbytes, "full": 2 * reads + pred.nbytes}
    compiled = torch.compile(regression_sums_ref, backend=compile_backend(device))
    env = environment(device)
    case = f"{clips * clones}x{n}x{d},{str(dtype)[6:]}"
    print(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}")
    print(f"regression sums (frame + SRL): pred {case}, clones {clones}")
    print(f"{'variant':10s} {'pass':5s} {'median ms':>10s} {'p20':>8s} {'p80':>8s} {'GB/s':>8s} {'peak MB':>8s}")
    rows, medians = CsvRows(args.csv, **env, benchmark="regression"), {}
    for variant, fn in (("eager", regression_sums_ref), ("compile", compiled), ("ours", regression_sums)):
        os.environ["SSLAM_KERNELS"] = "1" if variant == "ours" else "0"
        fns, prepare = passes(fn, pred, target, masked, clones, srl)
        for name, call in fns.items():
            (med, p20, p80), peak, failure = measure_or_fail(call, device, prepare if name == "bwd" else None)
            medians[(variant, name)] = med
            rate = moved[name] / med / 1e6
            rows.append(dict(case=f"regression,{case}", variant=variant, median_ms=med, p20_ms=p20,
                             p80_ms=p80, throughput=rate, unit="GB/s", peak_mem_mb=peak,
                             note=failure or f"clones={clones}; GB counted: every input read once in full (the kernels skip unmasked tokens), the gradient written",
                             **{"pass": name}))
            print(f"{variant:10s} {name:5s} {med:10.3f} {p20:8.3f} {p80:8.3f} {rate:8.1f} {peak:8.1f}")
    for base in ("eager", "compile"):
        print(f"ours vs {base} (fwd+bwd): {medians[(base, 'full')] / medians[('ours', 'full')]:.2f}x")


if __name__ == "__main__":
    main()
