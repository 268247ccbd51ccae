"""Triton kernels of sslam (installed as ``sslam.kernels``).

Every kernel has its PyTorch reference beside it (``*_ref``), which is the CPU path and the
baseline of the tests and benchmarks. ``SSLAM_KERNELS`` (see :mod:`sslam.kernels.switch`) picks
between them.
"""

from .switch import use_kernels

__all__ = ["use_kernels"]
