"""Inverse block masks of EAT / data2vec 2.0 (SPEC section 3) and the kept-token indices.

Each student instance (one clone of one clip) gets its own mask over the (time, frequency)
patch grid, (64, 8) = 512 patches for 10-s clips. Per row:

1. ``p = 1 - mask_prob`` when ``inverse`` (the blocks mark tokens to KEEP), else ``mask_prob``.
2. Draw ``num_centres = int(L * ((p + mask_prob_adjust) / mask_length**2) * (1 + mask_dropout))``
   flat positions uniformly in ``[0, L)``, with replacement.
3. Mark, for each centre ``(t, f)``, the cells ``(t + a, f + b)`` for ``a, b`` in
   ``range(-(l // 2), l - l // 2)`` (``-2..2`` for ``l = 5``), clamped to the grid.
4. Equalise to exactly ``num_marked = int(L * p)`` marked cells: unmark a uniform sample of the
   marked cells when there are too many, mark a uniform sample of the unmarked ones when too
   few.
5. Invert when ``inverse``, so that in every returned mask True = masked (hidden from the
   student). Every row then keeps exactly ``num_kept`` tokens (102 of 512 for ViT-B).

Two implementations: :func:`block_masks_ref`, readable torch driven by a
``torch.Generator``; and the C++ extension (``sslam._native``), which :func:`block_masks` uses
when built. They agree in distribution, not bit for bit.
"""

from __future__ import annotations

import math
import numbers
import operator
import os
from dataclasses import dataclass

import torch

from sslam import native


@dataclass(frozen=True)
class MaskConfig:
    """Parameters of the inverse block masks; the defaults are SSLAM / EAT ViT-B's.

    ``grid`` is (time patches, frequency patches). ``mask_dropout`` follows SPEC section 3: it
    only scales the number of block centres by ``1 + mask_dropout``; the masks are still
    equalised to exactly ``num_marked`` cells and nothing else is dropped.
    """

    grid: tuple[int, int] = (64, 8)
    mask_prob: float = 0.8
    mask_prob_adjust: float = 0.07
    mask_length: int = 5
    inverse: bool = True
    mask_dropout: float = 0.0

    def __post_init__(self):
        try:
            grid = tuple(self.grid)
        except TypeError:  # e.g. a bare int: say which argument is wrong, not "not iterable"
            grid = ()
        if len(grid) != 2 or not all(_is_int(g) and g >= 1 for g in grid):
            raise ValueError(
                f"MaskConfig.grid must be two positive ints (time, frequency), got {self.grid!r}"
            )
        # Store a plain tuple so equal configs compare and hash equal whatever was passed in.
        object.__setattr__(self, "grid", (int(grid[0]), int(grid[1])))
        if self.num_patches > 2**31:
            raise ValueError(
                f"MaskConfig.grid {self.grid} has {self.num_patches} patches; at most 2**31 are supported"
            )
        # Ranges are checked on the floats stored: 1 - 1e-30 passes "< 1" but is stored as 1.0.
        prob, adjust, dropout = (_as_float(getattr(self, name)) for name in ("mask_prob", "mask_prob_adjust", "mask_dropout"))
        if not (prob is not None and 0.0 < prob < 1.0):
            raise ValueError(f"MaskConfig.mask_prob must lie in (0, 1), got {self.mask_prob!r}")
        if not (adjust is not None and 0.0 <= adjust <= 1.0):
            raise ValueError(
                f"MaskConfig.mask_prob_adjust must lie in [0, 1], got {self.mask_prob_adjust!r}"
            )
        # Bounded like the grid: the C++ extension squares it in int64, and a block this long
        # already covers any supported grid from every centre.
        if not (_is_int(self.mask_length) and 1 <= self.mask_length <= _MAX_MASK_LENGTH):
            raise ValueError(
                f"MaskConfig.mask_length must be an int in [1, 2**31], got {self.mask_length!r}"
            )
        if not isinstance(self.inverse, bool):
            raise ValueError(f"MaskConfig.inverse must be a bool, got {self.inverse!r}")
        if not (dropout is not None and 0.0 <= dropout < 1.0):
            raise ValueError(
                f"MaskConfig.mask_dropout must lie in [0, 1), got {self.mask_dropout!r}"
            )
        # Plain Python numbers from here on (the C++ extension and hashing take them as such).
        for name, value in (("mask_prob", prob), ("mask_prob_adjust", adjust), ("mask_length", int(self.mask_length)),
                            ("mask_dropout", dropout)):
            object.__setattr__(self, name, value)
        if self.num_kept == 0 or self.num_masked == 0:
            raise ValueError(
                f"MaskConfig(grid={self.grid}, mask_prob={self.mask_prob}, inverse={self.inverse}) "
                f"keeps {self.num_kept} and masks {self.num_masked} of {self.num_patches} patches; "
                "both must be at least 1"
            )

    @property
    def num_patches(self) -> int:
        """L, the number of patches of the grid."""
        return self.grid[0] * self.grid[1]

    @property
    def marked_fraction(self) -> float:
        """p: the fraction of cells the blocks mark (kept cells when ``inverse``)."""
        # Computed as 1.0 - mask_prob exactly like the official code (0.19999999999999996 for
        # 0.8), so the int() below floors the same way.
        return 1.0 - self.mask_prob if self.inverse else self.mask_prob

    @property
    def num_marked(self) -> int:
        """Cells marked by the blocks after equalisation: ``int(L * p)``."""
        return int(self.num_patches * self.marked_fraction)

    @property
    def num_kept(self) -> int:
        """Tokens the student sees in every row (102 for ViT-B, 128 for ViT-L)."""
        return self.num_marked if self.inverse else self.num_patches - self.num_marked

    @property
    def num_masked(self) -> int:
        """Tokens hidden from the student in every row (410 for ViT-B)."""
        return self.num_patches - self.num_kept

    @property
    def num_centres(self) -> int:
        """Block centres drawn per row (5 for ViT-B, 7 for ViT-L)."""
        # Same expression and evaluation order as the official code and csrc/masks.cpp.
        return int(
            self.num_patches
            * ((self.marked_fraction + self.mask_prob_adjust) / self.mask_length**2)
            * (1 + self.mask_dropout)
        )

    @property
    def block_span(self) -> tuple[int, int]:
        """The first and last offset of a block's cells from its centre along each axis:
        ``-(l//2)`` and ``l-1-l//2``."""
        return -(self.mask_length // 2), self.mask_length - 1 - self.mask_length // 2

    @property
    def block_offsets(self) -> tuple[int, ...]:
        """Every offset of :attr:`block_span` (``mask_length`` of them)."""
        low, high = self.block_span
        return tuple(range(low, high + 1))

    @property
    def native_args(self) -> tuple:
        """The configuration as the C++ extension takes it: (grid_t, grid_f, mask_prob, adjust,
        mask_length, inverse, mask_dropout)."""
        return (self.grid[0], self.grid[1], self.mask_prob, self.mask_prob_adjust, self.mask_length,
                self.inverse, self.mask_dropout)


_MAX_MASK_LENGTH = 2**31
# numpy and torch index elements with int64: larger outputs cannot exist, refuse them up front.
_MAX_ELEMENTS = 2**63 - 1


# numbers.Integral / Real: numpy and other scalars count too (np.int64(64), np.float32(0.8)).
def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _as_float(value) -> float | None:
    """``value`` as a finite Python float, or None if it is not one (a bool, text, NaN, or an int
    past any float)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _check_rows(name: str, value) -> int:
    if not _is_int(value) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return int(value)


def _check_size(num_rows, config: MaskConfig) -> int:
    """``num_rows`` as an int, after checking that the masks can exist."""
    if not isinstance(config, MaskConfig):
        raise TypeError(f"config: expected a MaskConfig, got {type(config).__name__}")
    num_rows = _check_rows("num_rows", num_rows)
    if num_rows * config.num_patches > _MAX_ELEMENTS:
        raise ValueError(
            f"num_rows={num_rows} x {config.num_patches} patches = "
            f"{num_rows * config.num_patches} mask elements; at most 2**63 - 1 are supported"
        )
    return num_rows


def mark_blocks(centres: torch.Tensor, config: MaskConfig) -> torch.Tensor:
    """Mark the clamped block around every centre.

    centres: int64 (R, C) flat positions ``t * F + f`` on ``config.grid = (T, F)``.
    Returns bool (R, L), True where some block covers the cell.
    """
    num_rows = centres.shape[0]
    grid_t, grid_f = config.grid
    low, high = config.block_span

    def axis_offsets(size: int) -> torch.Tensor:
        # Offsets past +-(size - 1) only reach cells that the clamp below maps to the border,
        # which the block covers anyway: dropping them changes nothing, and keeps a block far
        # longer than the grid (mask_length up to 2**31) from allocating mask_length offsets.
        return torch.arange(max(low, 1 - size), min(high, size - 1) + 1, dtype=torch.int64)

    # Coordinates are clamped to the grid as in the official code. Each axis of a block is a
    # contiguous range, so this marks exactly the in-grid part of the block: clamped cells land
    # on border cells the block covers anyway (the same as discarding them).
    rows = ((centres // grid_f).unsqueeze(-1) + axis_offsets(grid_t)).clamp(0, grid_t - 1)
    cols = ((centres % grid_f).unsqueeze(-1) + axis_offsets(grid_f)).clamp(0, grid_f - 1)
    cells = rows.unsqueeze(-1) * grid_f + cols.unsqueeze(-2)  # (R, C, l_t, l_f)
    marked = torch.zeros(num_rows, config.num_patches, dtype=torch.bool)
    return marked.scatter_(1, cells.flatten(1), True)


def equalise(marked: torch.Tensor, target: int, generator: torch.Generator) -> torch.Tensor:
    """Make every row of ``marked`` (bool (R, L)) have exactly ``target`` True cells.

    Rows with too many lose a uniform sample of their marked cells; rows with too few gain a
    uniform sample of their unmarked cells. Returns a new bool (R, L).
    """
    # Give every cell a random key, marked cells in [0, 1) and unmarked ones in [1, 2), and keep
    # the `target` smallest keys: that is a uniform `target`-subset of the marked cells when a
    # row has too many, or all of them plus a uniform sample of the others when it has too few
    # -- the law of the official per-row draws without replacement. float64 keys make ties
    # (which would break by position) practically impossible.
    keys = torch.rand(marked.shape, generator=generator, dtype=torch.float64) + (~marked)
    chosen = keys.topk(target, dim=1, largest=False, sorted=False).indices
    return torch.zeros_like(marked).scatter_(1, chosen, True)


def block_masks_ref(num_rows: int, config: MaskConfig, generator: torch.Generator) -> torch.Tensor:
    """Inverse block masks with torch: bool (num_rows, L), True = masked.

    Draws from ``generator`` (a CPU ``torch.Generator``); readable reference of
    :func:`block_masks`, vectorised over rows.
    """
    num_rows = _check_size(num_rows, config)
    centres = torch.randint(
        0, config.num_patches, (num_rows, config.num_centres), generator=generator
    )
    marked = equalise(mark_blocks(centres, config), config.num_marked, generator)
    return ~marked if config.inverse else marked


def _seed64(seed) -> int:
    """``seed`` (any Python int) as an unsigned 64-bit integer."""
    try:
        if isinstance(seed, bool):  # True is an int to Python, but never meant as seed 1
            raise TypeError
        seed = operator.index(seed)
    except TypeError:
        raise TypeError(f"seed must be an int, got {type(seed).__name__}") from None
    return seed % 2**64


def default_threads() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # platforms without sched_getaffinity (macOS, Windows)
        return os.cpu_count() or 1


def block_masks(
    num_rows: int, config: MaskConfig, seed: int, *, threads: int | None = None
) -> torch.Tensor:
    """Inverse block masks, bool (num_rows, L), True = masked; deterministic in ``seed``.

    Uses the C++ extension when available (``sslam.native.available()``): row ``r`` then
    depends only on ``(seed, r)``, whatever ``threads`` (default: all usable cores). Otherwise
    :func:`block_masks_ref` with a ``torch.Generator`` seeded by ``seed``. The two paths give
    different masks for the same seed, with the same distribution.
    """
    num_rows = _check_size(num_rows, config)
    seed = _seed64(seed)
    if threads is None:
        threads = default_threads()
    elif not _is_int(threads) or not 1 <= threads < 2**31:
        raise ValueError(f"threads must be an int in [1, 2**31) or None, got {threads!r}")
    threads = int(threads)
    if native.available():
        masks = native.extension().block_masks(num_rows, *config.native_args, seed, threads)
        return torch.from_numpy(masks)
    generator = torch.Generator().manual_seed(seed)
    return block_masks_ref(num_rows, config, generator)


def clone_masks(
    batch_size: int, clones: int, config: MaskConfig, seed: int, *, threads: int | None = None
) -> torch.Tensor:
    """Masks of ``clones`` student instances per clip: bool (batch_size * clones, L).

    Rows are clip-major (rows ``b * clones .. (b + 1) * clones - 1`` belong to clip ``b``), the
    order of ``x.repeat_interleave(clones, dim=0)``; every row is an independent draw.
    """
    batch_size = _check_rows("batch_size", batch_size)
    if not _is_int(clones) or clones < 1:
        raise ValueError(f"clones must be an int >= 1, got {clones!r}")
    return block_masks(batch_size * int(clones), config, seed, threads=threads)


def kept_indices(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices that gather the kept tokens and put them back.

    mask: bool (R, L), True = masked; every row must keep the same number K of positions.
    Returns ``ids_keep`` int64 (R, K), the kept positions in ascending order, and
    ``ids_restore`` int64 (R, L), the inverse of the permutation "kept positions first, then
    masked ones, each in ascending order", so that
    ``cat([kept, masked], 1).gather(1, ids_restore) == original``.
    """
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
        got = (
            f"{mask.dtype} tensor of shape {tuple(mask.shape)}"
            if isinstance(mask, torch.Tensor)
            else type(mask).__name__
        )
        raise ValueError(f"mask must be a 2-D bool tensor (rows, patches), got {got}")
    num_rows, length = mask.shape
    kept_per_row = (~mask).sum(dim=1)
    num_kept = int(kept_per_row[0]) if num_rows else 0
    differing = (kept_per_row != num_kept).nonzero()
    if differing.numel():
        row = int(differing[0, 0])
        raise ValueError(
            f"mask row {row} keeps {int(kept_per_row[row])} positions but row 0 keeps {num_kept}; "
            "every row must keep the same number"
        )
    # A stable sort of 0 (kept) / 1 (masked) lists kept positions first, each group ascending.
    ids_shuffle = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)
    positions = torch.arange(length, device=mask.device).expand(num_rows, length)
    ids_restore = torch.empty_like(ids_shuffle).scatter_(1, ids_shuffle, positions)
    return ids_shuffle[:, :num_kept], ids_restore


__all__ = [
    "MaskConfig",
    "block_masks",
    "block_masks_ref",
    "clone_masks",
    "default_threads",
    "equalise",
    "kept_indices",
    "mark_blocks",
]
