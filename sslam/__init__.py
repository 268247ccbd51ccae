"""sslam: fast, faithful SSLAM / EAT audio encoders.

Load an official checkpoint and embed audio::

    import sslam
    enc = sslam.load_encoder("SSLAM_pretrain/checkpoint_last.pt")
    emb = enc.embed("clip.wav")          # emb.utterance (1, 768), emb.frames, emb.timestamps

Names are imported lazily so ``import sslam`` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "AudioError": "audio",
    "load_audio": "audio",
    "resample": "resampler",
    "preprocess": "features",
    "NORM_STATS": "features",
    "patchify": "features",
    "Encoder": "model",
    "EncoderConfig": "model",
    "VARIANTS": "model",
    "create_model": "model",
    "load_encoder": "checkpoint",
    "read_checkpoint": "checkpoint",
    "save_encoder": "checkpoint",
    "convert": "checkpoint",
    "CheckpointError": "checkpoint",
    "Embeddings": "embedding",
    "embed": "embedding",
    "SceneConfig": "synth",
    "SynthDataset": "synth",
    "render_scene": "synth",
    "benchmark": "synth",
    "default_pretraining_data": "synth",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sslam' has no attribute {name!r}")


def __dir__():
    return __all__
