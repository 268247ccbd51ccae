"""The CPU side of the training data path, per 10-s clip, on one core.

What must stay on the CPU when training on a GPU is decoding, resampling to 16 kHz and the
masks (features, mixing and the model run on the GPU). Compared here:

* official style: per clip, ``soundfile`` decode, ``torchaudio`` resample, ``torchaudio`` Kaldi
  fbank + pad + normalise (the official data loader computes features on the CPU), and the
  clip's masks drawn one clip at a time with the torch reference;
* ours: ``soundfile`` decode, the fast resampler, the C++ masks for the whole step; features on
  the CPU are also reported (batched reference), for CPU-only training.

Goal: <= 2.5 ms per clip for decode + resample + masks, so one core feeds a GPU at 400 clips/s.

    python bench/bench_cpu.py --rate 44100 --clips 16 --csv bench/results/cpu.csv
    python bench/bench_cpu.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CsvRows, environment  # noqa: E402

from sslam.audio import load_audio  # noqa: E402
from sslam.features import preprocess  # noqa: E402
from sslam.masking import MaskConfig, block_masks, block_masks_ref  # noqa: E402
from sslam.native import built  # noqa: E402
from sslam.resampler import resample  # noqa: E402

CLONES = 8  # stage 2: 8 clones per clip


def write_clips(folder: Path, count: int, rate: int, seconds: float) -> list[Path]:
    rng = np.random.default_rng(0)
    t = np.arange(int(rate * seconds)) / rate
    paths = []
    for i in range(count):
        wave = 0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t) + 0.05 * rng.standard_normal(t.size)
        path = folder / f"clip{i}.wav"
        sf.write(path, wave.astype(np.float32), rate, subtype="PCM_16")
        paths.append(path)
    return paths


def official_clip(path: Path, config: MaskConfig, generator) -> dict[str, float]:
    import torchaudio

    times = {}
    t0 = time.perf_counter()
    wave, rate = sf.read(path, dtype="float32")
    wave = torch.from_numpy(wave)
    t1 = time.perf_counter()
    wave = torchaudio.functional.resample(wave, rate, 16000)
    t2 = time.perf_counter()
    wave = wave - wave.mean()
    fb = torchaudio.compliance.kaldi.fbank(wave[None], htk_compat=True, sample_frequency=16000, use_energy=False,
                                           window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10)
    fb = torch.nn.functional.pad(fb, (0, 0, 0, max(0, 1024 - fb.shape[0])))[:1024]
    _ = (fb + 4.268) / (2 * 4.569)
    t3 = time.perf_counter()
    block_masks_ref(CLONES, config, generator)
    t4 = time.perf_counter()
    times.update(decode=t1 - t0, resample=t2 - t1, features=t3 - t2, masks=t4 - t3)
    return times


def ours_step(paths: list[Path], config: MaskConfig, seed: int) -> dict[str, float]:
    t0 = time.perf_counter()
    waves = []
    resample_s = 0.0
    for path in paths:
        wave, rate = load_audio(path)  # decode + checks; the trainer's loader then resamples
        r0 = time.perf_counter()
        waves.append(resample(wave, rate, 16000, exact=False))
        resample_s += time.perf_counter() - r0
    t1 = time.perf_counter()
    block_masks(len(paths) * CLONES, config, seed, threads=1)
    t2 = time.perf_counter()
    preprocess(waves, 16000, check_finite=False)  # load_audio checked them, as in the trainer
    t3 = time.perf_counter()
    return {"decode": (t1 - t0) - resample_s, "resample": resample_s, "masks": t2 - t1, "features": t3 - t2}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=int, default=44100)
    p.add_argument("--clips", type=int, default=16)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--csv", default=None)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.clips, args.repeats, args.seconds = 2, 1, 2.0
    torch.set_num_threads(1)
    config = MaskConfig()
    env = environment("cpu")
    env["device"] = env["device"].replace(f"({torch.get_num_threads()} threads)", "(1 thread)")
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_clips(Path(tmp), args.clips, args.rate, args.seconds)
        load_audio(paths[0])  # warm-up
        runs = {"official": [], "ours": []}
        for r in range(args.repeats):
            g = torch.Generator().manual_seed(r)
            per_clip = [official_clip(path, config, g) for path in paths]
            runs["official"].append({k: sum(c[k] for c in per_clip) / len(paths) for k in per_clip[0]})
            runs["ours"].append({k: v / len(paths) for k, v in ours_step(paths, config, r).items()})
    # Each stage's median over the repeats of its mean per clip.
    median = {name: {k: statistics.median(run[k] for run in repeats) for k in repeats[0]}
              for name, repeats in runs.items()}
    stages = ("decode", "resample", "features", "masks")
    cpu_part = ("decode", "resample", "masks")
    print(f"{env['device']}; {args.clips} clips of {args.seconds:g} s at {args.rate} Hz; C++ masks built: {built()}")
    print(f"{'ms per clip':>14} " + " ".join(f"{s:>9}" for s in stages) + f" {'CPU part':>9} {'all':>8}")
    rows = CsvRows(args.csv)
    timing = f"per clip: median over {args.repeats} repeats of the mean over {args.clips} clips"
    for name, t in median.items():
        cpu_ms = 1e3 * sum(t[s] for s in cpu_part)
        all_ms = 1e3 * sum(t.values())
        print(f"{name:>14} " + " ".join(f"{1e3 * t[s]:>9.3f}" for s in stages) + f" {cpu_ms:>9.3f} {all_ms:>8.3f}")
        for stage in stages:
            rows.append({**env, "benchmark": "cpu_data_path", "case": f"{args.rate}Hz,{args.seconds:g}s",
                         "variant": name, "pass": stage, "median_ms": 1e3 * t[stage], "unit": "ms/clip",
                         "note": timing})
        rows.append({**env, "benchmark": "cpu_data_path", "case": f"{args.rate}Hz,{args.seconds:g}s", "variant": name,
                     "pass": "cpu_part", "median_ms": cpu_ms, "throughput": 1e3 / cpu_ms, "unit": "clips/s/core",
                     "note": f"decode + resample + masks: the sum of their medians ({timing})"})
    ours_cpu = 1e3 * sum(median["ours"][s] for s in cpu_part)
    print(f"ours: {ours_cpu:.2f} ms per clip for what stays on the CPU = {1e3 / ours_cpu:.0f} clips/s per core "
          f"(goal <= 2.5 ms, 400 clips/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
