"""Training activation memory without a GPU: the bytes of every tensor autograd keeps for the
backward of one training forward (bf16 autocast), by module, for the variants of
``bench_step.py``.

What autograd saves depends on the code path, not on the speed of the device, so this shows
on a CPU where the activation part of training memory goes and what recomputing the decoder
and the cheap part of the student's blocks saves (``ours_lowmem``), or the whole blocks
(``ours_minmem``). On a GPU, autocast may cast a few ops to other dtypes. A saved tensor is
counted once per storage and charged to the leaf module whose forward started last, so
functional ops between modules (attention, GELU, residuals, the losses) count to the module
before them. Without a GPU, ``ours*`` run the PyTorch references: the Triton kernels save
slightly different tensors (e.g. the decoder keeps 2 of its ~3 tensors per layer).

The peak of the whole step is what was held before it (fp32 weights and AdamW moments, the
teacher) plus the peak of the tensors allocated during a forward and backward, read from the
CPU allocator's events in the profiler: the CPU counterpart of the GPU's
``max_memory_allocated`` that ``bench_step.py`` reports (the GPU adds its kernels' workspaces
and the caching allocator's rounding).

    python bench/bench_memory.py --preset base --stage 2 --batch 12     # ViT-B, ~4 min on 2 cores
    python bench/bench_memory.py --quick
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import Step  # noqa: E402
from common import CsvRows, environment  # noqa: E402

from sslam.features import preprocess  # noqa: E402
from sslam.train_config import preset  # noqa: E402


def peak_during_step(step: Step) -> int:
    """Peak bytes of the tensors a training forward + backward allocates on top of what was
    held before it (weights, optimizer state), from the profiler's allocator events."""
    from torch.profiler import ProfilerActivity, profile

    windows, keep = step.masks()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            clean = preprocess(step.waves, 16000, step.cfg.data.target_length, lengths=step.lengths,
                               check_finite=False)
            losses = step.model(clean, keep, windows=windows)
        losses.total.backward()
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    return max(e["args"]["Total Allocated"] for e in events
               if e.get("name") == "[memory]" and "Total Allocated" in e.get("args", {}))


def saved_by_module(step: Step) -> tuple[Counter, float]:
    """(bytes saved for the backward per module group, seconds) of one forward of ``step``."""
    model, cfg = step.model, step.cfg
    owner: dict[tuple[int, torch.dtype], tuple[str, int]] = {}  # storage -> (module group, bytes)
    current = ["(before any module)"]

    def key(t: torch.Tensor) -> tuple[int, torch.dtype]:
        return t.untyped_storage().data_ptr(), t.dtype

    def pack(t: torch.Tensor) -> torch.Tensor:
        owner.setdefault(key(t), (current[0], t.untyped_storage().nbytes()))
        return t

    def entered(name):
        # Block indices dropped: "student.blocks.3.mlp.fc1" -> "student.blocks.mlp.fc1".
        group = ".".join(part for part in name.split(".") if not part.isdigit())
        return lambda module, args: current.__setitem__(0, group)

    def layer_input(module, args):
        # With the recompute, each layer's checkpoint saves the layer's input just before
        # running it: name it for what it is rather than for the module that ran before.
        if model.checkpoint_decoder and key(args[0]) in owner:
            owner[key(args[0])] = ("decoder (layer inputs kept for the recompute)", owner[key(args[0])][1])

    hooks = [m.register_forward_pre_hook(entered(n)) for n, m in model.named_modules() if not list(m.children())]
    hooks += [block.register_forward_pre_hook(layer_input) for block in model.decoder.blocks]
    windows, keep = step.masks()
    start = time.perf_counter()
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            clean = preprocess(step.waves, 16000, cfg.data.target_length, lengths=step.lengths, check_finite=False)
            step.model(clean, keep, windows=windows)
    finally:
        for hook in hooks:
            hook.remove()
    by_module: Counter = Counter()
    for group, size in owner.values():
        by_module[group] += size
    return by_module, time.perf_counter() - start


def held_between_steps(step: Step) -> int:
    """Bytes held before a step starts: fp32 weights and the two AdamW moments of what is
    trained (student, decoder), the teacher's weights and every buffer. (The gradients are
    made by the step, so :func:`peak_during_step` counts them.)"""
    trained = [p for m in (step.model.student, step.model.decoder) for p in m.parameters()]
    teacher = [*step.model.teacher.parameters(), *step.model.teacher.buffers()]
    buffers = [*step.model.student.buffers(), *step.model.decoder.buffers()]
    return sum(3 * p.nbytes for p in trained) + sum(t.nbytes for t in teacher + buffers)


def measure(variant: str, preset_name: str, stage: int, batch: int) -> tuple[Counter, float, int]:
    """(saved bytes by module, seconds of the forward, peak bytes of the whole step)."""
    step = Step(variant, preset(preset_name, stage), batch, torch.device("cpu"))
    by_module, seconds = saved_by_module(step)
    return by_module, seconds, held_between_steps(step) + peak_during_step(step)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="base", choices=["tiny", "base", "large"])
    p.add_argument("--stage", type=int, default=2, choices=[1, 2])
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--variants", nargs="+", default=["eager", "ours_lowmem"], choices=["eager", "ours", "ours_lowmem", "ours_minmem"])
    p.add_argument("--top", type=int, default=8, help="module groups listed per variant")
    p.add_argument("--csv", default=None)
    p.add_argument("--quick", action="store_true", help="tiny preset, 4 clips (CI)")
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.batch = "tiny", 4
    env = environment("cpu")
    case = f"{args.preset},stage{args.stage},B={args.batch}"
    print(f"{env['device']}, torch {env['torch']}: activations saved for the backward, {case}, bf16 autocast")
    rows = CsvRows(args.csv)
    for variant in args.variants:
        # A fresh process per variant: the CPU allocator keeps what one ViT-B step freed, and
        # two of them would not fit in the memory of a small machine.
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            by_module, seconds, peak = pool.apply(measure, (variant, args.preset, args.stage, args.batch))
        total = sum(by_module.values())
        print(f"\n{variant}: {total / 2**30:.3f} GiB = {total / args.batch / 2**30:.3f} GiB per clip ({seconds:.0f} s); "
              f"peak of the whole step {peak / 2**30:.2f} GiB = {peak / args.batch / 2**30:.3f} GiB per clip")
        for name, size in by_module.most_common(args.top):
            print(f"  {size / 2**30:8.3f} GiB  {name}")
        top = "; ".join(f"{name}={size / 2**20:.0f}MiB" for name, size in by_module.most_common(3))
        rows.append({**env, "benchmark": "saved_activations", "case": case, "variant": variant, "pass": "fwd",
                     "peak_mem_mb": total / 2**20, "note": f"GiB/clip={total / args.batch / 2**30:.4f}; "
                     f"step_peak_GiB/clip={peak / args.batch / 2**30:.4f}; {top}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
