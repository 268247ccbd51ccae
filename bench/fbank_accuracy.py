"""How far the fused feature kernel and its float32 reference are from a float64 fbank on white
noise: max abs error in normalised units over two 10-s clips (1024 frames), per noise draw, and
how many elements pass 1e-4. On a CPU the kernel runs in the Triton interpreter, whose matmuls
round by thread count (``--threads``).

    python bench/fbank_accuracy.py --draws 3 --threads 1
"""

import argparse
import importlib
import os

if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel is decorated
    os.environ.setdefault("SSLAM_KERNELS", "1")

import torch  # noqa: E402

from sslam.features import norm_stats, patchify  # noqa: E402

fp = importlib.import_module("sslam.kernels.fbank_patch")  # the module (its function shares its name)


def float64_patches(waves: torch.Tensor, target: int = 1024) -> torch.Tensor:
    """(B, N) clips -> their float64 model input, AudioSet-normalised and patchified."""
    mean, std = norm_stats("audioset")
    rows = []
    for clip in waves:
        x = fp.logmel_float64(clip)[:target]
        x = torch.cat([x, torch.zeros(target - x.shape[0], x.shape[1], dtype=x.dtype)])
        rows.append((x - mean) / (2 * std))
    return patchify(torch.stack(rows)[:, None])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--scale", type=float, default=0.3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device cpu, {torch.get_num_threads()} thread(s); 2 x 10-s clips of white noise at {args.scale}")
    for seed in range(args.draws):
        torch.manual_seed(seed)
        waves = args.scale * torch.randn(2, 160000)
        truth = float64_patches(waves)
        for name, out in (("kernel", fp.fbank_patch(waves)), ("float32 reference", fp.fbank_patch_ref(waves))):
            error = (out.double() - truth).abs()
            print(f"draw {seed}: {name:17s} max {error.max():.2e}, over 1e-4: {int((error > 1e-4).sum())} "
                  f"of {error.numel()}")


if __name__ == "__main__":
    main()
