"""What the forward of a training step issues on a GPU, counted on any machine (no GPU needed).

The forward of ours (fused features, student, decoder, teacher passes, targets, losses) runs
on fake CUDA tensors (``torch._subclasses.FakeTensorMode``: shapes and dtypes, no data), under
bf16 autocast (``ours``) or with bf16 half weights (``ours_pure``). Every ATen operation
is recorded; under the fake mode each kernel call goes through its custom op (``sslam::*``,
whose fake implementation runs instead), so each counts once. The census lists what the host issues, the
dtype casts with the bytes they move (read + written), which are most of a step's copies, and
the peak of the bytes the forward's tensors hold (activations, targets, temporaries).
Views and allocations are counted apart: they launch nothing. The backward cannot run
(autograd's engine needs a real device); its graph is counted instead: each node is one
backward function the engine runs, one or more ops.

    python bench/bench_census.py --preset base --stage 2 1 --batch 12
    python bench/bench_census.py --quick
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys
import weakref
from pathlib import Path

import torch
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import Step  # noqa: E402

import sslam.pretrain  # noqa: E402
from sslam.train_config import preset  # noqa: E402

VARIANTS = ("ours", "ours_pure")
ALLOCATIONS = ("empty", "empty_like", "empty_strided")  # the caching allocator's: no launch


class Census(TorchDispatchMode):
    """Counts every ATen op reaching the dispatcher, and the casts with their bytes."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.views = 0
        self.allocations = 0
        # Bytes of the tensors the forward made that are still alive, and their peak: the
        # activations, targets and temporaries (the parameters, made before, not counted).
        self._live: dict[int, int] = {}
        self.live_bytes = self.peak_bytes = 0
        self.casts = collections.Counter()  # (shape, from, to) -> count
        self.cast_bytes = 0

    def _track(self, tensor: torch.Tensor) -> None:
        """Count a new storage's bytes as live until it is freed (views share their storage)."""
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._live:
            return
        self._live[key] = storage.nbytes()
        self.live_bytes += storage.nbytes()
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live_bytes -= self._live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in pytree.tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._track(leaf)
        name = func.overloadpacket.__name__
        if name in ("device", "dim", "size", "stride", "numel", "sym_size", "sym_stride", "sym_numel"):
            return out  # metadata queries of the fake tensors, not operations
        if func.is_view or name == "detach":
            self.views += 1
            return out
        if name in ALLOCATIONS:
            self.allocations += 1
            return out
        self.ops[name] += 1
        pairs = {"_to_copy": lambda: [(args[0], out)], "copy_": lambda: [(args[1], args[0])],
                 "_foreach_copy_": lambda: list(zip(args[1], args[0]))}.get(name, list)()
        for src, dst in pairs:  # (source, destination) of each copy
            if src.dtype != dst.dtype and src.is_floating_point():
                self.casts[(tuple(src.shape), str(src.dtype)[6:], str(dst.dtype)[6:])] += 1
                self.cast_bytes += dst.numel() * (src.element_size() + dst.element_size())
        return out


@contextlib.contextmanager
def host_side_on_real_tensors():
    """The step's CPU-side helper (the partner's indices) computes on real CPU tensors, as it
    does in a real step; under the fake mode its data would be unknown."""
    patched = [(sslam.pretrain, "partner_keep_indices")]
    saved = [getattr(module, name) for module, name in patched]

    def real(fn):
        def run(*args, **kwargs):
            with unset_fake_temporarily():
                return fn(*args, **kwargs)
        return run

    try:
        for (module, name), fn in zip(patched, saved):
            setattr(module, name, real(fn))
        yield
    finally:
        for (module, name), fn in zip(patched, saved):
            setattr(module, name, fn)


@contextlib.contextmanager
def cuda_autocast(dtype: torch.dtype | None):
    """Autocast for CUDA tensors; ``torch.autocast('cuda')`` turns itself off without a GPU."""
    if dtype is None:
        yield
        return
    enabled, previous = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    try:
        yield
    finally:
        torch.set_autocast_enabled("cuda", enabled)
        torch.set_autocast_dtype("cuda", previous)


def autograd_nodes(loss: torch.Tensor) -> collections.Counter:
    """The backward graph of ``loss``: node type -> count (each node is run once by the engine)."""
    nodes, seen, stack = collections.Counter(), set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nodes[node.name()] += 1
        stack.extend(next_node for next_node, _ in node.next_functions)
    return nodes


def census(variant: str, cfg, batch: int) -> tuple[Census, collections.Counter]:
    """The forward of one step of ``variant`` as the GPU would get it: (its ops, its backward
    graph's nodes)."""
    step = Step(variant, cfg, batch, torch.device("cpu"), gpu_path=True)  # moved to fake CUDA below
    windows, keep = step.masks()
    ops = Census()
    previous = os.environ.get("SSLAM_KERNELS")  # (the step sets it)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), host_side_on_real_tensors():
            step.model.to("cuda")
            step.waves, step.device = step.waves.to("cuda"), torch.device("cuda")
            # The variant's half weights as the step makes them on a GPU; its autocast is
            # turned on here (see cuda_autocast), not by the step.
            weights = step.half_weights()
            autocast, step.amp = cuda_autocast(step.amp), None
            with ops, weights, autocast:
                losses = step.forward(windows, keep.to("cuda"))
            nodes = autograd_nodes(losses.total)
    finally:
        if previous is None:
            os.environ.pop("SSLAM_KERNELS", None)
        else:
            os.environ["SSLAM_KERNELS"] = previous
    return ops, nodes


def summary(variant: str, ops: Census, nodes: collections.Counter, top: int = 12) -> str:
    activations = sum(n for (shape, _, _), n in ops.casts.items() if len(shape) >= 3)
    lines = [f"{variant}: {sum(ops.ops.values())} ops ({ops.views} views and {ops.allocations} "
             f"allocations apart; each Triton kernel call is one custom op); {sum(ops.casts.values())} casts "
             f"({activations} of activations) moving {ops.cast_bytes / 1e9:.2f} GB; "
             f"the tensors it makes peak at {ops.peak_bytes / 2**30:.2f} GiB",
             "  ops: " + ", ".join(f"{name} {n}" for name, n in ops.ops.most_common(top)),
             "  largest casts: " + ", ".join(
                 f"{n}x {shape} {a}->{b}" for (shape, a, b), n in
                 sorted(ops.casts.items(), key=lambda kv: -kv[1] * torch.Size(kv[0][0]).numel())[:6]),
             f"  backward graph: {sum(nodes.values())} nodes: "
             + ", ".join(f"{name} {n}" for name, n in nodes.most_common(top))]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="base", choices=["tiny", "base", "large"])
    p.add_argument("--stage", type=int, nargs="+", default=[2, 1])
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--quick", action="store_true", help="tiny preset, 4 clips")
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.batch = "tiny", 4
    print(f"forward of one training step on fake CUDA tensors: preset {args.preset}, {args.batch} clips")
    for stage in args.stage:
        cfg = preset(args.preset, stage)
        print(f"\n== stage {stage}")
        for variant in args.variants:
            print(summary(variant, *census(variant, cfg, args.batch)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
