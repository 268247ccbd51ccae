"""Benchmark of kernels/mixture.py: SSLAM mixture synthesis and the partner-pass token gather.

Cases (per GPU step of SSLAM ViT-B, B = 12 clips):

* ``mix_spec``    spectrograms (B, 1, 1024, 128) fp32 -> mixtures, official windows;
* ``mix_patches`` the same in the patch layout (B, 512, 256) fp32;
* ``gather``      tokens (B, 512, 768) bf16 -> the 272 kept tokens (B, 272, 768);
* ``gather_bwd``  its backward: (B, 272, 768) -> (B, 512, 768), zero on the dropped tokens.

Each case also runs at a large batch (``--large-batch``, default 192) where launch latency no
longer hides the bandwidth. Variants: ``ours`` (Triton), ``eager`` (the PyTorch reference:
where/maximum/roll, indexing, index_add) and ``compile`` (torch.compile of the reference).

Bytes counted: what the op must read and write once (mixing: each clip read once + written
once, the partner's second read is served by L2 and not counted; gather: kept rows read +
written; backward: gradient read + full output written). GB/s is reported and compared with a
device-to-device copy of 1 GiB measured in the same run (``% copy``).

Two timings per call: ``wall`` (``triton.testing.do_bench``: CUDA events around each call,
after an L2 clear on the GPU, so the host's cost of issuing the call shows only where it
exceeds the clear's time; ``bench_launch.py`` measures that cost itself) and ``gpu`` (replays
of a CUDA graph of the call: the kernels' own time, what the bandwidth goal is about; at
B = 12 the data fits in L2, so that row is L2 speed).

    python bench/bench_mixture.py --csv bench/results/mixture.csv
    python bench/bench_mixture.py --quick     # tiny, runs on CPU under the Triton interpreter
"""

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("SSLAM_KERNELS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    CsvRows,
    compile_backend,
    environment,
    graph_timing,
    kernel_device,
    measure,
    measure_or_fail,
)
from sslam.kernels import mixture as mx  # noqa: E402

from sslam.mixing import MixWindows, partner_keep_indices, sample_windows  # noqa: E402


def copy_bandwidth(device: str, nbytes: int) -> float:
    """GB/s of ``dst.copy_(src)`` (bytes read + written), the practical bandwidth ceiling."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    (med, _, _), _ = measure(lambda: dst.copy_(src), device)
    return 2 * nbytes / med / 1e6


def cases(batch: int, frames: int, tokens: int, dim: int, windows: MixWindows, device: str):
    """(name, {variant: fn}, bytes) for each op at one batch size."""
    gen = torch.Generator(device=device).manual_seed(0)
    spec = torch.randn(batch, 1, frames, 128, device=device, generator=gen)
    patches = torch.randn(batch, frames // 16 * 8, 256, device=device, generator=gen)
    keep = partner_keep_indices(windows, time_patches=frames // 16).to(device)
    token_dtype = torch.bfloat16 if device == "cuda" else torch.float32
    toks = torch.randn(batch, tokens, dim, device=device, generator=gen).to(token_dtype)
    grad = torch.randn(batch, keep.numel(), dim, device=device, generator=gen).to(token_dtype)
    item = toks.element_size()
    backend = compile_backend(device)

    def compiled(fn):
        return torch.compile(fn, backend=backend)

    mix_spec_ref = compiled(mx.mix_spectrograms_ref)
    mix_patch_ref = compiled(mx.mix_patches_ref)
    gather_ref = compiled(mx.gather_tokens_ref)

    def scatter_ref(g):
        return torch.zeros(batch, tokens, dim, dtype=g.dtype, device=device).index_add_(1, keep, g)

    scatter_compiled = compiled(scatter_ref)
    return [
        ("mix_spec", {
            "ours": lambda: mx.mix_spectrograms(spec, windows),
            "eager": lambda: mx.mix_spectrograms_ref(spec, windows),
            f"compile[{backend}]": lambda: mix_spec_ref(spec, windows),
        }, 2 * spec.numel() * 4),
        ("mix_patches", {
            "ours": lambda: mx.mix_spectrograms(patches, windows),
            "eager": lambda: mx.mix_patches_ref(patches, windows),
            f"compile[{backend}]": lambda: mix_patch_ref(patches, windows),
        }, 2 * patches.numel() * 4),
        ("gather", {
            "ours": lambda: mx.gather_tokens(toks, keep),
            "eager": lambda: mx.gather_tokens_ref(toks, keep),
            f"compile[{backend}]": lambda: gather_ref(toks, keep),
        }, 2 * batch * keep.numel() * dim * item),
        ("gather_bwd", {
            "ours": lambda: mx._gather_tokens_backward_op(grad, keep, tokens),
            "eager": lambda: scatter_ref(grad),
            f"compile[{backend}]": lambda: scatter_compiled(grad),
        }, (batch * keep.numel() + batch * tokens) * dim * item),
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--large-batch", type=int, default=192)
    parser.add_argument("--csv", type=Path, default=None, help="append result rows to this CSV")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes; on a CPU-only machine runs under the Triton interpreter")
    args = parser.parse_args(argv)

    device = kernel_device(parser, args.quick)
    if args.quick:
        batches, frames, tokens, dim = [3], 64, 32, 48
        windows = MixWindows(starts=(0, 32), width=16)
        copy_bytes = 1 << 20
    else:
        batches, frames, tokens, dim = [args.batch, args.large_batch], 1024, 512, 768
        windows = sample_windows(generator=torch.Generator().manual_seed(0))
        copy_bytes = 1 << 30
    env = environment(device)
    copy_gbs = copy_bandwidth(device, copy_bytes)
    print(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}")
    print(f"device-to-device copy ({copy_bytes >> 20} MiB): {copy_gbs:.1f} GB/s; windows "
          f"{windows.starts} width {windows.width}")
    print(f"{'case':28s} {'variant':20s} {'timing':>6s} {'median ms':>10s} {'GB/s':>8s} "
          f"{'% copy':>7s} {'peak MB':>8s}")
    rows = CsvRows(args.csv, **env, benchmark="mixture")
    for batch in batches:
        for name, variants, nbytes in cases(batch, frames, tokens, dim, windows, device):
            case = f"{name},B={batch}"
            direction = "bwd" if name.endswith("bwd") else "fwd"
            for variant, fn in variants.items():
                (med, p20, p80), peak, failure = measure_or_fail(fn, device)
                timings = [("wall", (med, p20, p80))]
                if device == "cuda" and not failure:
                    timings.append(("gpu", graph_timing(fn)))
                for timing, quantiles in timings:
                    if quantiles is None:
                        continue
                    med, p20, p80 = quantiles
                    gbs = nbytes / med / 1e6
                    rows.append(dict(case=case, variant=variant, median_ms=med, p20_ms=p20,
                                     p80_ms=p80, throughput=gbs, unit="GB/s", peak_mem_mb=peak,
                                     note=failure or f"{100 * gbs / copy_gbs:.1f}% of copy "
                                                     f"({copy_gbs:.0f} GB/s); bytes={nbytes}",
                                     **{"pass": f"{direction} {timing}"}))
                    print(f"{case:28s} {variant:20s} {timing:>6s} {med:10.4f} {gbs:8.1f} "
                          f"{100 * gbs / copy_gbs:7.1f} {peak:8.1f}")


if __name__ == "__main__":
    main()
