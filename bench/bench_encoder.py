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
from common import CsvRows, cpu_timing, cuda_timing, environment  # noqa: E402

from sslam.model import VARIANTS, Encoder  # noqa: E402

RATE = 32000
# The official code itself, timed on the development machines' CPU class (AMD EPYC, 2 threads):
# ViT-B extract_features 1.47 s per 10-s clip, preprocessing 14.0 ms (tests/data/golden/README.md).
OFFICIAL_CODE_SECONDS_PER_CLIP = 1.47 + 0.014


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


def linear_layers_only(model: Encoder, spec: torch.Tensor):
    """Only the encoder's Linear layers, at the shapes of its forward on ``spec`` (B, 1, T, F):
    work that every fp32 implementation of the model, the official one included, does with the
    same BLAS. Its time bounds how much faster than the official path any such implementation
    can be."""
    batch, device, dim = spec.shape[0], spec.device, model.cfg.embed_dim
    tokens = 1 + (spec.shape[2] // model.cfg.patch_size) * model.cfg.freq_patches
    x = torch.randn(batch, tokens, dim, device=device)
    h = torch.randn(batch, tokens, model.blocks[0].mlp.fc1.out_features, device=device)

    @torch.inference_mode()
    def run():
        for block in model.blocks:
            for layer, inputs in ((block.attn.qkv, x), (block.attn.proj, x), (block.mlp.fc1, x), (block.mlp.fc2, h)):
                layer(inputs)

    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="base", choices=sorted(VARIANTS))
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--csv", default=None)
    p.add_argument("--compile", action="store_true", help="also time ours with Encoder.compile_for_inference()")
    p.add_argument("--quick", action="store_true", help="tiny model, batches 1 and 2, one repeat")
    args = p.parse_args(argv)
    if args.quick:
        args.variant, args.batch, args.repeats = "tiny", [1, 2], 1
    device = torch.device(args.device)
    torch.manual_seed(0)
    official = Encoder(VARIANTS[args.variant]).to(device).eval().set_attention("math")
    ours = Encoder(VARIANTS[args.variant]).to(device).eval()
    ours.load_state_dict(official.state_dict())
    compiled = None
    if args.compile:
        compiled = Encoder(VARIANTS[args.variant]).to(device).eval()
        compiled.load_state_dict(official.state_dict())
        compiled.compile_for_inference()
    env = environment(device)
    if device.type == "cuda":
        timing = lambda fn: cuda_timing(fn, warmup_ms=5, rep_ms=50)[0]  # noqa: E731
    else:
        timing = lambda fn: cpu_timing(fn, repeats=1, warmup=0)[0]  # noqa: E731
    rows, lines = CsvRows(args.csv), []
    print(f"{env['device']}, torch {env['torch']}, {args.variant}, 10-s clips at {RATE} Hz")
    print(f"{'batch':>5} {'path':>12} {'with preprocessing':>19} {'model only':>11}   (clips/s)")
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

        paths = [("official", official_full, official_model), ("ours", ours_full, ours_model)]
        if compiled is not None:
            def compiled_full():
                compiled.embed(clips, RATE, batch_size=batch)

            @torch.inference_mode()
            def compiled_model():
                compiled(feats)

            paths.append(("ours+compile", compiled_full, compiled_model))
        linears = linear_layers_only(ours, feats)
        # Rounds interleave the paths, so slow drifts of the machine's speed hit all alike.
        times = {(path, kind): [] for path, _, _ in paths for kind in ("with_preprocessing", "model_only")}
        linear_times = []
        for fn_path in paths:  # warm-up (and compilation)
            fn_path[1]()
            fn_path[2]()
        linears()
        for _ in range(args.repeats):
            for path, full, model in paths:
                times[(path, "with_preprocessing")].append(timing(full))
                times[(path, "model_only")].append(timing(model))
            linear_times.append(timing(linears))
        result = {}
        for path, _, _ in paths:
            for kind in ("with_preprocessing", "model_only"):
                ms = torch.tensor(times[(path, kind)], dtype=torch.float64)
                med, p20, p80 = (float(ms.quantile(q)) for q in (0.5, 0.2, 0.8))  # median: of the middle two
                result.setdefault(path, []).append(batch / med * 1e3)
                rows.append({**env, "benchmark": "encoder", "case": f"{args.variant},B={batch}", "variant": path,
                             "pass": kind, "median_ms": med, "p20_ms": p20, "p80_ms": p80,
                             "throughput": batch / med * 1e3, "unit": "clips/s"})
            print(f"{batch:>5} {path:>12} {result[path][0]:>19.3f} {result[path][1]:>11.3f}")
        linear_ms = float(torch.tensor(linear_times, dtype=torch.float64).quantile(0.5))
        rows.append({**env, "benchmark": "encoder", "case": f"{args.variant},B={batch}", "variant": "linear_layers_only",
                     "pass": "model_only", "median_ms": linear_ms, "throughput": batch / linear_ms * 1e3,
                     "unit": "clips/s", "note": "the Linear layers alone: a floor for any fp32 forward"})
        lines.append(f"batch {batch}: the Linear layers alone take {linear_ms / batch / 1e3:.3f} s per clip, "
                     f"{100 * linear_ms / batch * result['ours'][1] / 1e3:.0f}% of ours (model only); no fp32 "
                     f"implementation on this BLAS beats the official path by more than "
                     f"{batch / linear_ms * 1e3 / result['official'][0]:.2f}x with preprocessing")
        for path in result:
            if path == "official":
                continue
            ratio = (result[path][0] / result["official"][0], result[path][1] / result["official"][1])
            lines.append(f"batch {batch}: {path}/official = {ratio[0]:.2f}x with preprocessing, {ratio[1]:.2f}x model only")
            if args.variant == "base" and device.type == "cpu":
                vs_code = result[path][0] * OFFICIAL_CODE_SECONDS_PER_CLIP
                lines.append(f"batch {batch}: {path} vs the official code's own timing (1.484 s per clip with "
                             f"preprocessing, tests/data/golden/README.md) = {vs_code:.2f}x")
    print("\n".join(lines))
    # Sanity: both paths compute the same embeddings.
    with torch.inference_mode():
        clips = clips_of(1, 10.0)
        a = official(official_features(clips, device)).x[:, 0]
        b = ours.embed(clips, RATE).utterance.to(device)
    print(f"max |official - ours| on the CLS embedding: {(a - b).abs().max().item():.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
