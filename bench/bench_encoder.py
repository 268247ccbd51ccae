"""Embedding extraction throughput: 10-s clips per second, ours against the official path.

The official path, re-implemented faithfully: per clip, torchaudio resampling, mean removal,
torchaudio Kaldi fbank, padding and normalisation; then the encoder with explicit
matmul-softmax attention (the official computation), fp32. Ours: :meth:`sslam.Encoder.embed`
(batched bit-identical resampling and fbank, SDPA attention -- the Triton kernel on CUDA).
Both run in the same process on the same clips (32 kHz, like the official example clip), at
each batch size, with and without preprocessing.

    python bench/bench_encoder.py --variant base --batch 1 16 --csv bench/results/encoder.csv
    python bench/bench_encoder.py --quick        # tiny model, a few clips (CI)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_rows, cpu_timing, cuda_timing, environment  # noqa: E402

from sslam.model import VARIANTS, Encoder  # noqa: E402

RATE = 32000


def official_features(clips: list[torch.Tensor], device) -> torch.Tensor:
    """The official per-clip chain with torchaudio (SPEC 1.1)."""
    import torchaudio

    out = []
    for wave in clips:
        wave = torchaudio.functional.resample(wave, RATE, 16000)
        wave = wave - wave.mean()
        fb = torchaudio.compliance.kaldi.fbank(
            wave[None], htk_compat=True, sample_frequency=16000, use_energy=False, window_type="hanning",
            num_mel_bins=128, dither=0.0, frame_shift=10,
        )
        fb = torch.nn.functional.pad(fb, (0, 0, 0, max(0, 1024 - fb.shape[0])))[:1024]
        out.append(((fb + 4.268) / (2 * 4.569))[None, None])
    return torch.cat(out).to(device)


def clips_of(n: int, seconds: float = 10.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    t = torch.arange(int(seconds * RATE)) / RATE
    return [0.3 * torch.sin(2 * torch.pi * (220 + 40 * i) * t) + 0.05 * torch.randn(t.numel(), generator=g)
            for i in range(n)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="base", choices=sorted(VARIANTS))
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--csv", default=None)
    p.add_argument("--quick", action="store_true", help="tiny model, batches 1 and 2, one repeat")
    args = p.parse_args(argv)
    if args.quick:
        args.variant, args.batch, args.repeats = "tiny", [1, 2], 1
    device = torch.device(args.device)
    torch.manual_seed(0)
    official = Encoder(VARIANTS[args.variant]).to(device).eval().set_attention("math")
    ours = Encoder(VARIANTS[args.variant]).to(device).eval()
    ours.load_state_dict(official.state_dict())
    env = environment(device)
    timing = (lambda fn: cuda_timing(fn)) if device.type == "cuda" else (lambda fn: cpu_timing(fn, repeats=args.repeats))
    rows, lines = [], []
    print(f"{env['device']}, torch {env['torch']}, {args.variant}, 10-s clips at {RATE} Hz")
    print(f"{'batch':>5} {'path':>9} {'with preprocessing':>19} {'model only':>11}   (clips/s)")
    for batch in args.batch:
        clips = clips_of(batch)
        feats = official_features(clips, device)

        @torch.inference_mode()
        def official_full():
            official(official_features(clips, device))

        @torch.inference_mode()
        def official_model():
            official(feats)

        def ours_full():
            ours.embed(clips, RATE, batch_size=batch)

        @torch.inference_mode()
        def ours_model():
            ours(feats)

        result = {}
        for path, full, model in (("official", official_full, official_model), ("ours", ours_full, ours_model)):
            full_ms = timing(full)
            model_ms = timing(model)
            result[path] = (batch / full_ms[0] * 1e3, batch / model_ms[0] * 1e3)
            for name, ms in (("with_preprocessing", full_ms), ("model_only", model_ms)):
                rows.append({**env, "benchmark": "encoder", "case": f"{args.variant},B={batch}", "variant": path,
                             "pass": name, "median_ms": ms[0], "p20_ms": ms[1], "p80_ms": ms[2],
                             "throughput": batch / ms[0] * 1e3, "unit": "clips/s"})
            print(f"{batch:>5} {path:>9} {result[path][0]:>19.3f} {result[path][1]:>11.3f}")
        ratio = (result["ours"][0] / result["official"][0], result["ours"][1] / result["official"][1])
        lines.append(f"batch {batch}: ours/official = {ratio[0]:.2f}x with preprocessing, {ratio[1]:.2f}x model only")
        rows[-1]["note"] = rows[-2]["note"] = f"ours/official {ratio[0]:.3f}x (with preprocessing)"
    print("\n".join(lines))
    # Sanity: both paths compute the same embeddings.
    with torch.inference_mode():
        clips = clips_of(1, 10.0)
        a = official(official_features(clips, device)).x[:, 0]
        b = ours.embed(clips, RATE).utterance.to(device)
    print(f"max |official - ours| on the CLS embedding: {(a - b).abs().max().item():.2e}")
    if args.csv:
        append_rows(args.csv, rows)
        print(f"appended {len(rows)} rows to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
