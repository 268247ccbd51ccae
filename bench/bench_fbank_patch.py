"""Benchmark of kernels/fbank_patch.py: 16 kHz waveforms -> normalised log-mel 16x16 patches.

Case: a batch of 10-s clips (160000 samples, 998 real frames, padded to 1024), the SSLAM
per-update batch of 48 by default. Variants, all producing the (B, 512, 256) model input:

* ``ours`` -- the fused Triton kernel (exact fp32 dots, the default; ``ours_tf32x3`` with
  three tensor-core products per dot); ``ours+mix`` also writes the B SSLAM mixtures from the
  same pass;
* ``eager`` -- the batched PyTorch reference on the same device (remove DC, frame with unfold,
  window, rfft, power, mel matmul, log, pad, normalise, patchify); ``eager+mix`` adds
  :func:`sslam.mixing.mix_patches`;
* ``compile`` -- ``torch.compile`` of that reference;
* ``cpu_torchaudio`` -- the official path, one clip at a time on the CPU
  (``torchaudio.compliance.kaldi.fbank`` + pad + normalise + patchify), timed on a few clips and
  scaled to the batch.

Reported: median / p20 / p80 ms per batch, us per clip, GB/s (waveform bytes read + patch bytes
written), achieved TFLOP/s of the DFT + mel matmuls, peak memory.

Floor (per 10-s clip): frames x (400 x 512 x 2 DFT + 256 x 128 x 2 mel) FLOPs = 998 x 475 kFLOP
= 0.47 GFLOP, against 640 kB read + 512 kB written (1 MB more with mixing). On an H100 SXM
(~495 TFLOP/s dense tf32, tf32x3 = 3 tensor-core products; ~67 TFLOP/s fp32 FMA; ~3 TB/s):
tf32x3 ~2.9 us, ieee ~7 us, memory ~0.4 us (~0.7 us with mixing) per clip. The kernel is
compute bound; mixing only adds memory traffic.

    python bench/bench_fbank_patch.py --batch 48 --csv bench/results/fbank_patch.csv
    python bench/bench_fbank_patch.py --quick     # tiny, runs on CPU under the Triton interpreter
"""

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # CPU runs (--quick) execute the kernel with the Triton interpreter; it must be chosen
    # before the kernel is decorated, i.e. before sslam.kernels is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("SSLAM_KERNELS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    CsvRows,
    autotune_report,
    compile_backend,
    cpu_timing,
    environment,
    kernel_device,
    measure_or_fail,
)
from sslam.kernels.fbank_patch import fbank_patch  # noqa: E402

from sslam.features import (  # noqa: E402
    FRAME_LENGTH,
    FRAME_SHIFT,
    NUM_MEL_BINS,
    fbank,
    norm_stats,
    normalize,
    pad_or_crop,
    patchify,
    remove_dc,
)
from sslam.mixing import mix_patches, sample_windows  # noqa: E402

NORM = "audioset"
FLOP_PER_FRAME = 400 * 512 * 2 + 256 * 128 * 2


def reference_core(waves: torch.Tensor, lens: torch.Tensor, target_length: int) -> torch.Tensor:
    """The batched reference chain on device tensors, without host-side validation, so that
    torch.compile sees one graph: exactly what ``patchify(preprocess(...))`` computes."""
    feats, _ = fbank(remove_dc(waves, lens), lens, max_frames=target_length)
    return patchify(normalize(pad_or_crop(feats, target_length), NORM).unsqueeze(1))


def torchaudio_clip(clip: torch.Tensor, target_length: int) -> torch.Tensor:
    """The official per-clip CPU path (SPEC 1.1) for one 16 kHz clip -> (T/16 * 8, 256)."""
    import torchaudio

    x = clip - clip.mean()
    feats = torchaudio.compliance.kaldi.fbank(
        x[None], htk_compat=True, sample_frequency=16000, use_energy=False,
        window_type="hanning", num_mel_bins=NUM_MEL_BINS, dither=0.0, frame_shift=10,
    )
    feats = pad_or_crop(feats[None], target_length)
    mean, std = norm_stats(NORM)
    return patchify(((feats - mean) / (2 * std)).unsqueeze(1))[0]


def bench(batch: int, samples: int, target_length: int, device: str, quick: bool, rows: list) -> None:
    """Every variant's row appended to ``rows`` (a :class:`common.CsvRows`) as it is measured."""
    gen = torch.Generator().manual_seed(0)
    waves_cpu = 0.2 * torch.randn(batch, samples, generator=gen)
    lens_cpu = torch.full((batch,), samples, dtype=torch.int64)
    waves, lens = waves_cpu.to(device), lens_cpu.to(device)
    # The official 240-frame windows; tiny --quick spectrograms get one-patch-row windows.
    width = 240 if target_length >= 1024 else 16
    windows = sample_windows(target_length, width=width, generator=gen)
    frames = min(1 + (samples - FRAME_LENGTH) // FRAME_SHIFT, target_length)
    flop = batch * frames * FLOP_PER_FRAME
    clean_bytes = waves.numel() * 4 + batch * target_length * NUM_MEL_BINS * 4
    mixed_bytes = clean_bytes + batch * target_length * NUM_MEL_BINS * 4

    backend = compile_backend(device)
    compiled = torch.compile(reference_core, backend=backend)

    variants = {  # ours first: every row states its time relative to it
        "ours": (lambda: fbank_patch(waves, lens_cpu, target_length=target_length), clean_bytes),
        "ours_tf32x3": (lambda: fbank_patch(waves, lens_cpu, target_length=target_length,
                                            dot_precision="tf32x3"), clean_bytes),
        "ours+mix": (lambda: fbank_patch(waves, lens_cpu, target_length=target_length,
                                         mix=windows), mixed_bytes),
        "eager": (lambda: reference_core(waves, lens, target_length), clean_bytes),
        "eager+mix": (lambda: mix_patches(reference_core(waves, lens, target_length), windows),
                      mixed_bytes),
        f"compile[{backend}]": (lambda: compiled(waves, lens, target_length), clean_bytes),
    }
    seen, ours = set(), None

    def row(variant, timing, nbytes, peak, us_per_clip, note):
        med, p20, p80 = timing
        extra = f"us_per_clip={us_per_clip:.3f}; TFLOP/s={flop / med / 1e9:.2f}; time/ours={med / ours:.3f}"
        # A failed row's note says why, as every benchmark's does.
        note = note if note.startswith("failed") else f"{extra}; {note}" if note else extra
        rows.append(dict(variant=variant, median_ms=med, p20_ms=p20, p80_ms=p80, throughput=nbytes / med / 1e6,
                         unit="GB/s", peak_mem_mb=peak, us_per_clip=us_per_clip, tflops=flop / med / 1e9,
                         note=note))

    for name, (fn, nbytes) in variants.items():
        (med, p20, p80), peak, failure = measure_or_fail(fn, device)
        ours = med if ours is None else ours
        row(name, (med, p20, p80), nbytes, peak, med * 1e3 / batch, failure)
        if device == "cuda" and name.startswith("ours"):  # each variant tunes its own key
            print(autotune_report({name: sys.modules["sslam.kernels.fbank_patch"]._autotuned_kernel()}, seen))

    # The official path: one clip at a time on the CPU, a few clips, scaled to the batch.
    clips = waves_cpu[: 2 if quick else 4]
    (med, p20, p80) = cpu_timing(lambda: [torchaudio_clip(c, target_length) for c in clips],
                                 repeats=1 if quick else 3, warmup=1)
    scale = batch / clips.shape[0]
    row("cpu_torchaudio", (med * scale, p20 * scale, p80 * scale), clean_bytes, 0.0, med * 1e3 / clips.shape[0],
        f"{clips.shape[0]} clips on {torch.get_num_threads()} CPU threads, scaled to the batch")


def print_table(rows: list[dict]) -> None:
    print(f"{'variant':22s} {'median ms':>10s} {'us/clip':>9s} {'GB/s':>8s} {'TFLOP/s':>8s} "
          f"{'peak MB':>8s} {'x ours':>7s}")
    ours = next(r for r in rows if r["variant"] == "ours")["median_ms"]
    for r in rows:
        print(f"{r['variant']:22s} {r['median_ms']:10.4f} {r['us_per_clip']:9.3f} "
              f"{r['throughput']:8.1f} {r['tflops']:8.2f} {r['peak_mem_mb']:8.1f} "
              f"{r['median_ms'] / ours:7.2f}")
    mix = next(r for r in rows if r["variant"] == "ours+mix")["median_ms"]
    print(f"fused mixing costs {100 * (mix / ours - 1):+.1f} % over the clean-only kernel")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--seconds", type=float, default=10.0, help="clip duration")
    parser.add_argument("--csv", type=Path, default=None, help="append result rows to this CSV")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes; on a CPU-only machine runs under the Triton interpreter")
    args = parser.parse_args(argv)

    device = kernel_device(parser, args.quick)
    if args.quick:
        batch, samples, target_length = 2, 63 * FRAME_SHIFT + FRAME_LENGTH, 64
    else:
        batch, samples, target_length = args.batch, int(args.seconds * 16000), 1024

    env = environment(device)
    rows = CsvRows(args.csv, **env, benchmark="fbank_patch", case=f"B={batch},N={samples},T={target_length}",
                   **{"pass": "fwd"})
    bench(batch, samples, target_length, device, args.quick, rows)
    print(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}")
    print_table(rows)


if __name__ == "__main__":
    main()
