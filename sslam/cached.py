"""A cache for functions that build constant tensors (filter banks, windows, kernel bases)."""

from __future__ import annotations

import functools
import threading

import torch

__all__ = ["cached_constant"]


def cached_constant(maxsize: int | None = None):
    """``functools.lru_cache(maxsize)`` for builders of constant tensors, with two differences.

    * The builder runs outside inference mode: a tensor created under ``torch.inference_mode``
      can never be saved for backward, so a cache filled during inference would break every
      later differentiable call that uses it.
    * Concurrent callers wait for one build instead of each building the same value (which for
      a large resampling bank doubles a gigabyte of memory).
    * The builder runs eagerly under ``torch.compile`` too: compiled, its float ops may round
      otherwise (the official mel bank's bits were lost so), and the cache would keep that
      value for every later call.

    The wrapper keeps ``cache_clear``.
    """

    def decorate(build):
        cached = functools.lru_cache(maxsize)(build)
        lock = threading.Lock()

        @torch.compiler.disable
        @functools.wraps(build)
        def get(*args):
            with lock, torch.inference_mode(False):
                return cached(*args)

        get.cache_clear = cached.cache_clear
        return get

    return decorate
