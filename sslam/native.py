"""The optional C++ extension ``sslam._native`` and the ``SSLAM_NATIVE`` switch.

``sslam._native`` is built from ``csrc/*.cpp`` by ``pip install`` when a C++ compiler and
pybind11 are present; it takes and returns numpy arrays and does not link against torch. It
provides:

* ``block_masks(num_rows, grid_t, grid_f, mask_prob, adjust, mask_length, inverse,
  mask_dropout, seed, threads) -> numpy.ndarray[bool] (num_rows, grid_t * grid_f)`` -- inverse
  block masks (SPEC section 3), True = masked, computed by ``threads`` std::threads with the GIL
  released; row ``r`` depends only on ``(seed, r)``, so the result does not depend on
  ``threads`` (0 = one per hardware thread);
* ``mask_counts(grid_t, grid_f, mask_prob, adjust, mask_length, inverse, mask_dropout) ->
  (num_centres, num_marked)`` -- the per-row counts the masks use.

``SSLAM_NATIVE`` (environment variable, read at every call):

* unset or ``auto`` -- use the extension when it was built, the Python references otherwise;
* ``0`` -- never use it (always the Python references);
* ``1`` -- always use it; an error if it was not built, so a missing build is never hidden.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

_ENV = "SSLAM_NATIVE"
_VALUES = ("", "auto", "0", "1")
_REBUILD_HINT = (
    "build it with `pip install -e . --no-build-isolation` (needs a C++17 compiler and pybind11)"
)


@functools.cache
def _import_extension() -> tuple[ModuleType | None, str]:
    """(module, "") when ``sslam._native`` imports, else (None, the reason it does not)."""
    try:
        from sslam import _native
    except ImportError as exc:
        return None, str(exc)
    return _native, ""


def mode() -> str:
    """The ``SSLAM_NATIVE`` setting: ``'auto'``, ``'0'`` or ``'1'``."""
    value = os.environ.get(_ENV, "auto").strip().lower()
    if value not in _VALUES:
        raise ValueError(f"{_ENV}={value!r}: expected one of 'auto', '0' or '1'")
    return value or "auto"


def built() -> bool:
    """Whether the extension was built and imports, whatever ``SSLAM_NATIVE`` says."""
    return _import_extension()[0] is not None


def available() -> bool:
    """Whether callers should use the extension (see the module docstring for the switch).

    Raises ``RuntimeError`` when ``SSLAM_NATIVE=1`` and the extension is not built.
    """
    value = mode()
    if value == "0":
        return False
    module, reason = _import_extension()
    if module is None and value == "1":
        raise RuntimeError(
            f"{_ENV}=1 but sslam._native is not importable ({reason}); {_REBUILD_HINT}"
        )
    if module is None:
        _warn_missing(reason)
    return module is not None


@functools.cache
def _warn_missing(reason: str) -> None:
    """Say once per process that the slower Python references stand in for the extension."""
    import warnings

    warnings.warn(
        f"sslam._native is not built ({reason}); using the slower Python reference instead. "
        + _REBUILD_HINT,
        RuntimeWarning,
        stacklevel=3,
    )


def extension() -> ModuleType:
    """The ``sslam._native`` module; ``RuntimeError`` if it is switched off or not built."""
    if not available():
        module, reason = _import_extension()
        why = (
            f"{_ENV}=0"
            if module is not None
            else f"it is not importable ({reason}); {_REBUILD_HINT}"
        )
        raise RuntimeError(f"sslam._native is not available: {why}")
    return _import_extension()[0]
