"""Triton kernels of sslam (installed as ``sslam.kernels``).

The public functions share their names with their modules (``sslam.kernels.attention`` is the
function; ``importlib.import_module("sslam.kernels.attention")`` is the module).

Every kernel has its PyTorch reference beside it (``*_ref``), which is the CPU path and the
baseline of the tests and benchmarks. ``SSLAM_KERNELS`` (see :mod:`sslam.kernels.switch`) picks
between them: ``auto`` (kernels for CUDA tensors), ``1`` (always; CPU tensors need
``TRITON_INTERPRET=1``) or ``0`` (always the references).

* :func:`fbank_patch` -- waveforms -> Kaldi fbank -> normalised 16x16 patches (+ SSLAM mixing);
* :func:`attention` / :func:`attention_varlen` -- softmax attention over the kept tokens;
* :func:`mix_spectrograms` / :func:`gather_tokens` -- mixture synthesis and the partner gather;
* :func:`decoder_layer` / :func:`decoder_norm_act` -- the CNN decoder's layer on token-major tensors;
* :func:`grouped_conv_tokens` -- its grouped 'same' convolution as implicit GEMMs over token rows;
* :func:`regression_sums` -- the masked regression sums of the frame and SRL losses, fused.
"""

from .switch import triton_available, use_kernels

__all__ = ["use_kernels"]

# The kernel modules import Triton; without it (CPU-only torch builds) only the switch is here,
# and the library runs its PyTorch references.
if triton_available():
    from .attention import attention, attention_ref, attention_varlen, attention_varlen_ref
    from .decoder import decoder_layer, decoder_layer_ref, decoder_norm_act, decoder_norm_act_ref
    from .fbank_patch import fbank_patch, fbank_patch_ref
    from .grouped_conv import grouped_conv_tokens, grouped_conv_tokens_ref
    from .mixture import (
        gather_tokens,
        gather_tokens_ref,
        mix_patches_ref,
        mix_spectrograms,
        mix_spectrograms_ref,
    )
    from .regression import regression_sums, regression_sums_ref

    __all__ += [
        "attention", "attention_ref", "attention_varlen", "attention_varlen_ref", "decoder_layer",
        "decoder_layer_ref", "decoder_norm_act", "decoder_norm_act_ref", "fbank_patch",
        "fbank_patch_ref", "gather_tokens", "gather_tokens_ref", "grouped_conv_tokens",
        "grouped_conv_tokens_ref", "mix_patches_ref", "mix_spectrograms", "mix_spectrograms_ref",
        "regression_sums", "regression_sums_ref",
    ]
