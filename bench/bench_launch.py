"""Host cost of one call of each public kernel: where launch overhead comes from.

At the training step's sizes several of our kernels finish on the GPU faster than the host
issues them (eager attention: 840 µs per call for 221 µs of GPU work on an H200), so the
host side of a call is a cost of its own. Each row is the wall time per call of ``--calls``
back-to-back calls on tiny inputs (so the GPU keeps up and only the host is timed), layer by
layer for the mixing kernel, so the report shows what each layer adds:

* ``torch.add``: one eager PyTorch op (the floor of a PyTorch call);
* ``triton launch``: a bare launch of a one-line Triton kernel;
* ``mix: launcher``: our host wrapper and its launch, no custom op;
* ``mix: custom op``: the same through ``torch.library`` (what ``torch.compile`` traces);
* ``mix: public``: :func:`sslam.kernels.mix_spectrograms` with its argument checks;
* then the other public kernels, forward only and forward + backward where they have one.

    python bench/bench_launch.py --csv bench/results/launch.csv --host-profile "attention fwd+bwd"
    python bench/bench_launch.py --quick     # CPU, Triton interpreter: proves the script runs
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("SSLAM_KERNELS", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CsvRows, environment, kernel_device  # noqa: E402
from sslam.kernels import (  # noqa: E402
    attention,
    fbank_patch,
    gather_tokens,
    grouped_conv_tokens,
    mix_spectrograms,
)
from sslam.kernels import mixture as mx  # noqa: E402

from sslam.mixing import MixWindows  # noqa: E402


@triton.jit
def _copy_kernel(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < n), mask=offs < n)


def host_us(fn, calls: int, device: torch.device, warmup: int = 3) -> float:
    """Wall-clock µs per call of ``calls`` back-to-back calls (after ``warmup`` untimed ones)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / calls * 1e6


def cases(device: torch.device) -> list[tuple[str, callable]]:
    """(name, call) pairs on tiny inputs."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(4096, device=device)
    y = torch.empty_like(x)
    patches = torch.randn(2, 64, 256, device=device)  # 8 patch rows = 128 frames
    windows = MixWindows(starts=(0, 32), width=16)
    geometry = (256, 8, 16)
    tokens = torch.randn(2, 16, 64, device=device, dtype=dtype)
    keep = torch.arange(0, 16, 2, device=device)
    q, k, v = (torch.randn(2, 16, 2, 64, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    waves = torch.randn(2, 400 + 160 * 31, device=device)
    lengths = torch.full((2,), waves.shape[1])
    conv_x = torch.randn(2, 4 * 8, 32, device=device, dtype=dtype, requires_grad=True)
    conv_w = torch.randn(32, 8, 3, 3, device=device, dtype=dtype, requires_grad=True)

    def attention_both():
        attention(q, k, v).sum().backward()

    def conv_both():
        grouped_conv_tokens(conv_x, (4, 8), conv_w, groups=4).sum().backward()

    def no_grad(fn):
        def call():
            with torch.no_grad():
                return fn()
        return call

    return [
        ("torch.add", lambda: torch.add(x, 1.0, out=y)),
        ("triton launch", lambda: _copy_kernel[(1,)](x, y, x.numel(), BLOCK=4096)),
        ("mix: launcher", lambda: mx._launch_mix(patches, *windows.starts, windows.width, *geometry)),
        ("mix: custom op", lambda: mx._mix_rows_op(patches, *windows.starts, windows.width, *geometry)),
        ("mix: public", lambda: mix_spectrograms(patches, windows)),
        ("gather_tokens", lambda: gather_tokens(tokens, keep)),
        ("fbank_patch", lambda: fbank_patch(waves, lengths, target_length=32)),
        ("attention fwd", no_grad(lambda: attention(q, k, v))),
        ("attention fwd+bwd", attention_both),
        ("grouped_conv fwd", no_grad(lambda: grouped_conv_tokens(conv_x, (4, 8), conv_w, groups=4))),
        ("grouped_conv fwd+bwd", conv_both),
    ]


def host_profile(fn, calls: int) -> str:
    """Where the host's time per call goes: the Python functions of ``calls`` calls of ``fn``
    (after warm-up) by their own time, a table of the top 15 (cProfile)."""
    import cProfile
    import io
    import pstats

    for _ in range(3):
        fn()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(15)
    return text.getvalue()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--csv", type=Path, default=None, help="append result rows to this CSV")
    parser.add_argument("--quick", action="store_true", help="a few calls; on a CPU-only machine, interpreted")
    parser.add_argument("--host-profile", nargs="*", default=[], metavar="CALL",
                        help="also print a cProfile table of these calls (e.g. 'attention fwd+bwd')")
    args = parser.parse_args(argv)
    device = torch.device(kernel_device(parser, args.quick))
    calls = 1 if args.quick else args.calls
    env = environment(device)
    print(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}  ({calls} calls each)")
    print(f"{'call':24s} {'host µs/call':>13s}")
    rows = CsvRows(args.csv, **env, benchmark="launch")
    named = dict(cases(device))
    for name, fn in named.items():
        us = host_us(fn, calls, device, warmup=1 if args.quick else 3)
        print(f"{name:24s} {us:13.1f}")
        rows.append(dict(case="tiny", variant=name, median_ms=us / 1e3, throughput=1e6 / us, unit="calls/s",
                         note=f"wall time of {calls} back-to-back calls", **{"pass": "host"}))
    for name in args.host_profile:
        if name not in named:
            parser.error(f"--host-profile: no call named {name!r}; the calls are {sorted(named)}")
        profiled = min(calls, 200)  # cProfile slows the host: enough calls for the shares
        print(f"\n-- host profile of {name!r}, {profiled} calls\n{host_profile(named[name], profiled)}")


if __name__ == "__main__":
    main()
