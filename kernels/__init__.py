"""Triton kernels of sslam (installed as ``sslam.kernels``).

Every kernel has its PyTorch reference beside it (``*_ref``), which is the CPU path and the
baseline of the tests and benchmarks. ``SSLAM_KERNELS`` (see :mod:`sslam.kernels.switch`) picks
between them: ``auto`` (kernels for CUDA tensors), ``1`` (always; CPU tensors need
``TRITON_INTERPRET=1``) or ``0`` (always the references).

* :func:`fbank_patch` -- waveforms -> Kaldi fbank -> normalised 16x16 patches (+ SSLAM mixing);
* :func:`attention` / :func:`attention_varlen` -- softmax attention over the kept tokens;
* :func:`mix_spectrograms` / :func:`gather_tokens` -- mixture synthesis and the partner gather.
"""

import importlib

_EXPORTS = {
    "attention": "attention",
    "attention_ref": "attention",
    "attention_varlen": "attention",
    "attention_varlen_ref": "attention",
    "fbank_patch": "fbank_patch",
    "fbank_patch_ref": "fbank_patch",
    "gather_tokens": "mixture",
    "gather_tokens_ref": "mixture",
    "mix_patches_ref": "mixture",
    "mix_spectrograms": "mixture",
    "mix_spectrograms_ref": "mixture",
    "use_kernels": "switch",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    # Lazy: the kernel modules import Triton, which machines without it must not need.
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sslam.kernels' has no attribute {name!r}")
