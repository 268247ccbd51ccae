"""Build and install sslam.

The top-level ``kernels/`` folder is installed as ``sslam.kernels``. The optional C++ extension
``sslam._native`` (``csrc/``) is built with pybind11; if it cannot be built the install still
succeeds and the pure-Python references are used (``sslam.native.built()`` says which).
"""

import glob
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """Build the C++ extension when possible; otherwise say so once and carry on."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # a missing compiler surfaces as various distutils errors
            self._warn(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._warn(exc)

    def _warn(self, exc):
        if getattr(self, "_warned", False):
            return
        self._warned = True
        print(
            f"WARNING: sslam._native was not built ({exc}); the Python reference "
            "implementations will be used instead.",
            file=sys.stderr,
        )


def native_extensions():
    try:
        from pybind11.setup_helpers import Pybind11Extension
    except ImportError:
        print("WARNING: pybind11 is not installed; sslam._native will not be built.", file=sys.stderr)
        return []
    sources = sorted(glob.glob("csrc/*.cpp"))
    if not sources:
        return []
    return [
        Pybind11Extension(
            "sslam._native",
            sources=sources,
            # The headers: shipped in the sdist (a wheel built from it needs them) and a change
            # to one rebuilds the extension.
            depends=sorted(glob.glob("csrc/*.h")),
            cxx_std=17,
            extra_compile_args=["-O3"],
        )
    ]


setup(
    name="sslam",
    version="0.1.0",
    description="Fast, faithful SSLAM / EAT audio encoders: preprocessing, checkpoints, "
    "embeddings, pretraining and Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["sslam", "sslam.kernels"],
    package_dir={"sslam": "sslam", "sslam.kernels": "kernels"},
    ext_modules=native_extensions(),
    cmdclass={"build_ext": OptionalBuildExt},
    install_requires=["torch>=2.4", "numpy", "soundfile>=0.12", "safetensors>=0.4", "tqdm"],
    extras_require={
        "dev": [
            "pytest",
            "pytest-benchmark",
            "pytest-timeout",
            "hypothesis",
            "ruff",
            "pybind11>=2.10",
            "torchaudio",
            "scikit-learn",
            "matplotlib",
            "huggingface_hub>=2.4",  # the Hub tests raise its errors
        ],
        "hub": ["huggingface_hub>=0.20"],  # hf-hub:OWNER/NAME checkpoints
        "plot": ["matplotlib"],
        "tensorboard": ["tensorboard"],
    },
    entry_points={"console_scripts": ["sslam=sslam.cli:main"]},
)
