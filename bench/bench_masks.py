"""Inverse block masks: the torch reference against the C++ extension, on the CPU.

One SSLAM stage-2 step needs 192 masks of 512 patches (24 spectrograms x 8 clones, ViT-B).
Times ``block_masks_ref`` (torch, one intra-op thread and all of them) and the extension through
``sslam.masking.block_masks`` (one thread and all usable cores), prints a table and appends one
CSV row per measurement::

    python bench/bench_masks.py --rows 192 --repeats 50 --csv bench/results/masks.csv
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CsvRows, cpu_timing, environment  # noqa: E402

from sslam import native  # noqa: E402
from sslam.masking import MaskConfig, block_masks, block_masks_ref, default_threads  # noqa: E402

CONFIGS = {
    "vit_b": MaskConfig(),
    "vit_l": MaskConfig(mask_prob=0.75, mask_prob_adjust=0.1),
}
BASELINE = "torch_ref_1thread"


def variants(rows: int, config: MaskConfig, seed: int, cores: int) -> dict:
    """name -> (setup, fn): `setup` fixes torch's intra-op threads before timing `fn`."""
    generator = torch.Generator().manual_seed(seed)
    return {
        BASELINE: (
            lambda: torch.set_num_threads(1),
            lambda: block_masks_ref(rows, config, generator),
        ),
        f"torch_ref_{cores}threads": (
            lambda: torch.set_num_threads(cores),
            lambda: block_masks_ref(rows, config, generator),
        ),
        "native_1thread": (
            lambda: torch.set_num_threads(1),
            lambda: block_masks(rows, config, seed, threads=1),
        ),
        f"native_{cores}threads": (
            lambda: torch.set_num_threads(1),
            lambda: block_masks(rows, config, seed, threads=cores),
        ),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rows",
        type=int,
        nargs="+",
        default=[192],
        help="masks per call (192 = one ViT-B stage-2 step)",
    )
    parser.add_argument("--config", choices=sorted(CONFIGS), default="vit_b")
    parser.add_argument("--repeats", type=int, default=50, help="timed calls per variant")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--csv", type=Path, default=None, help="append one row per measurement here"
    )
    parser.add_argument("--quick", action="store_true", help="3 repeats (CI)")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 3

    if not native.available():
        raise SystemExit(
            "bench_masks: sslam._native is not available (build it with "
            "`pip install -e . --no-build-isolation`, and leave SSLAM_NATIVE unset or 1)"
        )
    config = CONFIGS[args.config]
    cores = default_threads()
    env = environment("cpu")
    saved_threads = torch.get_num_threads()

    rows_out = CsvRows(args.csv)
    print(f"{env['device']}; torch {env['torch']}; config {args.config}; {args.repeats} repeats")
    print(
        f"{'rows':>6}  {'variant':<22} {'median ms':>10} {'p20 ms':>9} {'p80 ms':>9} {'rows/s':>12} {'speed-up':>9}"
    )
    for rows in args.rows:
        results = {}
        for name, (setup, fn) in variants(rows, config, args.seed, cores).items():
            setup()
            results[name] = cpu_timing(fn, repeats=args.repeats, warmup=3)
        torch.set_num_threads(saved_threads)
        baseline = results[BASELINE][0]
        for name, (median, p20, p80) in results.items():
            speedup = baseline / median
            throughput = rows / (median / 1e3)
            print(
                f"{rows:>6}  {name:<22} {median:>10.3f} {p20:>9.3f} {p80:>9.3f} {throughput:>12.0f} {speedup:>8.1f}x"
            )
            rows_out.append(
                {
                    **env,
                    "benchmark": "masks",
                    "case": f"{rows}x{config.num_patches} {args.config}",
                    "variant": name,
                    "pass": "cpu",
                    "median_ms": f"{median:.4f}",
                    "p20_ms": f"{p20:.4f}",
                    "p80_ms": f"{p80:.4f}",
                    "throughput": f"{throughput:.0f}",
                    "unit": "rows/s",
                    "peak_mem_mb": "0",
                    "note": f"speed-up vs {BASELINE}: {speedup:.1f}x",
                }
            )


if __name__ == "__main__":
    main()
