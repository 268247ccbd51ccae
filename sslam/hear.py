"""The HEAR benchmark API (hearbenchmark.com): ``load_model``, ``get_scene_embeddings``,
``get_timestamp_embeddings``.

Scene embeddings are the utterance (CLS) embedding by default (``scene="cls"``; ``"mean"`` or
``"cls+mean"`` on request). Timestamp embeddings are one per 16-frame patch row (160 ms), the
mean over the frequency patches, at the row centres. A finer hop (``hop_ms=40``: HEAR suggests
50 ms or less for event detection) embeds the sound again from each hop up to 160 ms on and
interleaves the rows, at that many times the cost. Audio longer than the 10.24-s window is
covered by overlapping windows (see :mod:`sslam.embedding`).
"""

from __future__ import annotations

import math
import numbers
import os

import torch

from .checkpoint import load_encoder
from .embedding import FRAME_SECONDS, checked_batch_size, row_times
from .model import Encoder

SCENE_MODES = ("cls", "mean", "cls+mean")


def load_model(model_file_path: str = "", *, device: str | None = None, weights: str = "student",
               scene: str = "cls", batch_size: int = 16, hop_ms: float | None = None) -> Encoder:
    """Load an encoder for HEAR. ``model_file_path``: any checkpoint :func:`sslam.load_encoder`
    reads; when empty, the ``SSLAM_CHECKPOINT`` environment variable names it. ``hop_ms``: the
    timestamp embeddings' spacing, a patch row's duration (160 ms for 16-frame patches, the
    default) divided by a whole number."""
    path = model_file_path or os.environ.get("SSLAM_CHECKPOINT", "")
    if not path:
        raise ValueError(
            "sslam.hear.load_model: give model_file_path (an SSLAM/EAT checkpoint, a path or "
            "hf-hub:OWNER/NAME) or set SSLAM_CHECKPOINT"
        )
    if scene not in SCENE_MODES:
        raise ValueError(f"scene={scene!r}: choose one of {SCENE_MODES}")
    batch_size = checked_batch_size(batch_size)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_encoder(path, device=device, weights=weights)
    model.sample_rate = model.preprocessing.get("sample_rate", 16000)
    hop_ms = _row_ms(model) if hop_ms is None else hop_ms
    number = not isinstance(hop_ms, bool) and isinstance(hop_ms, numbers.Real) and hop_ms > 0
    starts, samples = (_row_ms(model) / hop_ms, hop_ms * model.sample_rate / 1000) if number else (math.nan, math.nan)
    # Whole samples too: a rounded start would space the timestamps unevenly.
    if not (starts >= 1 and abs(starts - round(starts)) < 1e-9 and abs(samples - round(samples)) < 1e-6):
        raise ValueError(f"hop_ms={hop_ms!r}: must be a patch row's {_row_ms(model):g} ms divided by a whole number, "
                         f"and a whole number of samples at {model.sample_rate} Hz")
    dim = model.cfg.embed_dim
    model.scene_embedding_size = 2 * dim if scene == "cls+mean" else dim
    model.timestamp_embedding_size = dim
    model.hear_scene = scene
    model.hear_batch_size = batch_size
    model.hear_hop_ms = float(hop_ms)
    return model


def _row_ms(model: Encoder) -> float:
    """A patch row's duration in milliseconds: 160 for 16-frame patches."""
    return 1000 * FRAME_SECONDS * model.cfg.patch_size


def _check_audio(audio) -> None:
    """HEAR's input: a (n_sounds, n_samples) torch tensor; ValueError otherwise."""
    if not isinstance(audio, torch.Tensor) or audio.dim() != 2:
        got = f"shape {tuple(audio.shape)}" if isinstance(audio, torch.Tensor) else type(audio).__name__
        raise ValueError(f"audio: expected a (n_sounds, n_samples) torch tensor, got {got}")


def _embed(audio: torch.Tensor, model: Encoder):
    _check_audio(audio)
    # No .float() here: embed checks the samples (integer PCM is refused, not rescaled).
    return model.embed(audio, model.sample_rate, batch_size=model.hear_batch_size)


def get_scene_embeddings(audio: torch.Tensor, model: Encoder) -> torch.Tensor:
    """(n_sounds, n_samples) at ``model.sample_rate`` -> (n_sounds, scene_embedding_size)."""
    emb = _embed(audio, model)
    if model.hear_scene == "cls":
        return emb.utterance
    if model.hear_scene == "mean":
        return emb.mean
    return torch.cat([emb.utterance, emb.mean], dim=1)


def get_timestamp_embeddings(audio: torch.Tensor, model: Encoder) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_sounds, n_samples) -> embeddings (n_sounds, n_timestamps, timestamp_embedding_size)
    and timestamps (n_sounds, n_timestamps) in milliseconds: the centres of the patch rows
    that lie within the audio (at least one row), every ``hop_ms`` (:func:`load_model`). A
    last, partly filled row whose centre falls after the end is left out: HEAR requires
    timestamps within the audio, evenly spaced. A sound shorter than the first row's centre
    (87.5 ms) gets its one timestamp at its middle."""
    _check_audio(audio)
    duration_ms = 1000 * audio.shape[-1] / model.sample_rate
    hop_ms = getattr(model, "hear_hop_ms", _row_ms(model))
    embeddings, times = [], []
    for step in range(round(_row_ms(model) / hop_ms)):
        skip = round(step * hop_ms * model.sample_rate / 1000)  # the sound from this hop on
        start_ms = 1000 * skip / model.sample_rate
        if step and start_ms + 1000 * float(row_times(1, model.cfg.patch_size)[0]) > duration_ms:
            break  # no row of this or later starts is centred within the audio
        emb, centres = _rows_within(audio[:, skip:], model, start_ms, duration_ms)
        embeddings.append(emb)
        times.append(centres)
    # Interleaved in time order: the starts' row k lie between the first start's rows k and k+1.
    order = torch.cat(times).argsort(stable=True)
    times = torch.cat(times)[order].float().to(embeddings[0].device)
    embeddings = torch.cat(embeddings, dim=1)[:, order.to(embeddings[0].device)]
    return embeddings, times.expand(len(embeddings), -1).contiguous()


def _rows_within(audio: torch.Tensor, model: Encoder, start_ms: float,
                 duration_ms: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Timestamp embeddings (n_sounds, rows, D) of ``audio`` (the sound from ``start_ms`` on)
    and their centres (rows,) in float64 ms of the whole sound, for the rows centred within
    its ``duration_ms`` (at least one: a sound shorter than a row's centre gets its middle)."""
    emb = _embed(audio, model)
    rows = int(emb.timestamp_mask.sum(1).max())  # every sound has the same length in HEAR
    # In float64 milliseconds: float32 seconds times 1000 spaces the rows 159.9995..160.0005 ms.
    times = start_ms + row_times(rows, model.cfg.patch_size, torch.float64) * 1000
    rows = max(1, int((times <= duration_ms).sum()))
    times = times[:rows]
    if times[0] > duration_ms:  # a sound shorter than the first row's centre: its middle
        times[0] = duration_ms / 2
    return emb.timestamps[:, :rows], times
