"""Training-step throughput: clips/s, MFU, peak memory and the largest batch that fits, for
four implementations of the same step, measured in one run.

(i)   ``official``: a faithful eager port of the official step -- explicit matmul-softmax
      attention, targets copied per clone, eager features, plain AdamW, and on GPU fp16 weights
      and activations over fp32 master weights with loss scaling, as the official runs
      (``model.half()``);
(ii)  ``eager``: SDPA (the best backend PyTorch picks), targets indexed, fused AdamW;
(iii) ``compile``: (ii) with the student, decoder and teacher compiled by ``torch.compile``;
(iv)  ``ours``: the Triton kernels (fused features with SSLAM mixing, attention, gather,
      mixing, the decoder's grouped conv and norm/GELU), fused AdamW;
      ``ours_compile``: the same with the student, decoder and teacher compiled by ``torch.compile``
      (the kernels are custom ops it traces; what ``--run.compile=true`` trains with);
      ``ours_lowmem``: the same with the decoder recomputed in the backward (its activations
      are the largest block of training memory, a few percent more FLOPs) and, in the student's
      blocks, everything but the matmul and attention outputs (no extra matmul);
      ``ours_minmem`` (only when asked for): the decoder and the whole student blocks
      recomputed (the least memory, about 1/3 more student FLOPs);
      ``ours_pure``: the networks wholly in bf16 over fp32 master weights
      (``--run.precision=bf16-pure``, :mod:`sslam.precision`) instead of bf16 autocast.

Every variant runs the full step: features from 16-kHz waveforms on the device, masks, student
+ decoder forward/backward, teacher forward(s), optimizer step, EMA update. MFU uses the model
FLOPs of DESIGN.md (:func:`sslam.pretrain.train_flops_per_clip`) against the card's peak
(:func:`sslam.train.peak_tflops`: 790 TFLOP/s for an H100 or H200, none for other cards).

    python bench/bench_step.py --stage 2 --preset base --batch 12 --csv bench/results/step.csv \\
        --profile bench/results/profile      # ViT-B shapes on a GPU
    python bench/bench_step.py --preset tiny --stage 1 --variants official ours   # CPU
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CsvRows, environment  # noqa: E402

from sslam.features import preprocess  # noqa: E402
from sslam.masking import clone_masks, kept_indices  # noqa: E402
from sslam.mixing import sample_windows  # noqa: E402
from sslam.precision import MATMUL_MODULES, half_weights  # noqa: E402
from sslam.pretrain import Pretrainer, ema_decay, train_flops_per_clip  # noqa: E402
from sslam.schedule import param_groups  # noqa: E402
from sslam.train import peak_tflops  # noqa: E402
from sslam.train_config import encoder_config, mask_config, objective_config, preset  # noqa: E402

VARIANTS = ("official", "eager", "compile", "ours", "ours_compile", "ours_lowmem", "ours_minmem", "ours_pure")
COMPILED = ("compile", "ours_compile")
# Variants whose step --profile traces: good eager, ours and ours in half weights.
PROFILED = ("eager", "ours", "ours_pure")
RECOMPUTED_BLOCKS = {"ours_lowmem": "selective", "ours_minmem": "full"}
# On GPU, variants whose networks run wholly in a half type over fp32 master weights (the others
# run under bf16 autocast).
PURE = {"official": torch.float16, "ours_pure": torch.bfloat16}


class Step:
    """One variant's training step on fixed waveforms. ``gpu_path``: run what a GPU runs (bf16
    autocast or half weights, fused AdamW; for ours the kernels and fused features) whatever
    the device; by default on CUDA devices only."""

    def __init__(self, variant: str, cfg, batch: int, device: torch.device, gpu_path: bool | None = None):
        self.variant, self.cfg, self.batch, self.device = variant, cfg, batch, device
        self.gpu_path = device.type == "cuda" if gpu_path is None else gpu_path
        torch.manual_seed(0)
        enc_cfg = encoder_config(cfg)
        self.model = Pretrainer(enc_cfg, objective_config(cfg, enc_cfg.depth)).to(device).train()
        self.model.copy_targets = variant == "official"
        self.model.checkpoint_decoder = variant in RECOMPUTED_BLOCKS
        self.model.student.set_block_checkpointing(RECOMPUTED_BLOCKS.get(variant, "off"))
        attention = {"official": "math", "eager": "sdpa", "compile": "sdpa"}.get(variant, "auto")
        self.model.student.set_attention(attention)
        self.model.teacher.encoder.set_attention(attention)
        if variant in COMPILED:
            self.model.compile_networks()
        fused = {"fused": True} if self.gpu_path and variant != "official" else {}
        self.optimizer = torch.optim.AdamW(
            param_groups(torch.nn.ModuleList([self.model.student, self.model.decoder]), cfg.optim.weight_decay),
            lr=1e-4, betas=(cfg.optim.beta1, cfg.optim.beta2), **fused)
        self.amp = self.pure = None
        if self.gpu_path:
            self.pure = PURE.get(variant)
            self.amp = None if self.pure else torch.bfloat16
        # The trainer's (fairseq's) initial loss scale: torch's 2^16 would skip early fp16 steps.
        self.scaler = torch.amp.GradScaler(device.type, init_scale=2.0**7, enabled=self.pure == torch.float16)
        frames = cfg.data.target_length
        self.mask_cfg = mask_config(cfg)
        samples = (frames - 1) * 160 + 400
        g = torch.Generator().manual_seed(1)
        self.waves = (0.1 * torch.randn(batch, samples, generator=g)).to(device)
        self.lengths = torch.full((batch,), samples)  # on the CPU, as a data loader gives them
        self.count = self.skipped = 0

    def masks(self):
        """(mixing windows or None in stage 1, (B * clones, K) kept patch indices on the CPU) of
        step number ``self.count``."""
        obj = self.model.objective
        windows = None
        if obj.stage == 2:
            windows = sample_windows(self.cfg.data.target_length, obj.mix_width,
                                     generator=torch.Generator().manual_seed(self.count))
        masks = clone_masks(self.batch, obj.clones, self.mask_cfg, self.count, threads=1)
        return windows, kept_indices(masks)[0]

    def half_weights(self):
        """The weights of a forward and its backward, as the trainer makes them in one process:
        the pure variants' half weights; for ours under autocast, the matmuls' weights cast once
        (autocast would cast them at each use); the other variants leave that to autocast."""
        if self.pure:
            return half_weights([self.model], self.pure)
        if self.amp and self.variant.startswith("ours"):
            return half_weights([self.model], self.amp, only=MATMUL_MODULES)
        return nullcontext()

    def forward(self, windows, keep):
        """The step's losses: features from the waveforms (the fused kernel for ours on a GPU)
        and the model, under the variant's autocast."""
        # Ours on a GPU must run the kernels: "auto" would fall back to the references unseen.
        ours_kernels = self.variant.startswith("ours") and self.gpu_path
        os.environ["SSLAM_KERNELS"] = "1" if ours_kernels else "0"
        cfg = self.cfg
        with torch.autocast(self.device.type, dtype=self.amp) if self.amp else nullcontext():
            mixed = None
            if ours_kernels:
                from sslam.kernels import fbank_patch

                out = fbank_patch(self.waves, self.lengths, target_length=cfg.data.target_length, mix=windows)
                clean, mixed = (out[: self.batch], out[self.batch :]) if windows else (out, None)
            else:
                clean = preprocess(self.waves, 16000, cfg.data.target_length, lengths=self.lengths,
                                   check_finite=False)
            return self.model(clean, keep, windows=windows, mixed=mixed)

    def __call__(self) -> float:
        """One step; its loss. Every variant reads the loss and the gradient norm once, as the
        trainer does (fp16's loss scaler reads its overflow flag besides). A step whose gradient
        norm is not finite is counted in ``skipped`` (fp16's scaler makes no update there)."""
        cfg = self.cfg
        windows, keep = self.masks()
        keep = keep.to(self.device, non_blocking=True)
        with self.half_weights():
            losses = self.forward(windows, keep)
            self.scaler.scale(losses.total).backward()
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.model.trainable_parameters(), cfg.optim.clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.count += 1
        self.model.update_teacher(ema_decay(self.count))
        loss, norm = torch.stack([losses.total.detach().float(), norm.float()]).tolist()
        self.skipped += not math.isfinite(norm)
        return loss


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Step, warmup: int, steps: int) -> tuple[float, list[float], float]:
    """(mean seconds per step, (median, p20, p80) of the steps' seconds, peak memory GiB over
    the timed steps). The steps run back to back as in training, each reading its loss and
    gradient norm as the trainer does; on a GPU each one's time is the gap between CUDA events
    recorded after consecutive steps."""
    cuda = step.device.type == "cuda"
    for _ in range(warmup):
        step()
    sync(step.device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(step.device)

    def mark():
        if not cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    start = time.perf_counter()
    marks = [mark()]
    for _ in range(steps):
        loss = step()
        marks.append(mark())
    sync(step.device)
    seconds = (time.perf_counter() - start) / steps
    if not math.isfinite(loss):
        raise RuntimeError(f"{step.variant}: non-finite loss")
    each = [a.elapsed_time(b) / 1e3 if cuda else b - a for a, b in zip(marks, marks[1:])]
    quantiles = torch.tensor(each, dtype=torch.float64).quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    peak = torch.cuda.max_memory_allocated(step.device) / 2**30 if cuda else 0.0
    return seconds, quantiles.tolist(), peak


def step_peak(variant, cfg, device, batch: int) -> int | None:
    """Peak GPU memory (bytes) of building the variant and two training steps of ``batch``
    clips; None when it runs out of memory. Two: AdamW makes its state (8 bytes a parameter,
    0.65 GiB for ViT-B) in the first step's update, when the activations are already freed, so
    only from the second step on does a step hold both."""
    step = None
    torch.cuda.reset_peak_memory_stats(device)
    try:
        step = Step(variant, cfg, batch, device)
        step()
        step()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device)
    except RuntimeError as exc:
        # Near the limit cuBLAS and cuDNN report their failed allocations as plain RuntimeErrors.
        if not isinstance(exc, torch.OutOfMemoryError) and not any(
                sign in str(exc) for sign in ("out of memory", "ALLOC_FAILED")):
            raise
        peak = None
    del step  # free the model and its activations before the next try
    gc.collect()
    torch.cuda.empty_cache()
    return peak


def available_memory(device) -> int:
    """Bytes this process's tensors can take: free device memory (the CUDA context and other
    processes already left out) plus what PyTorch's allocator holds in reserve."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device)


def largest_fitting(peak_of, start: int, capacity: float, limit: int = 1024, resolution: int = 4) -> int:
    """The largest batch whose step fits in ``capacity`` bytes, within ``resolution`` clips; 0 if
    ``start`` does not fit. ``peak_of(batch)`` is a step's peak memory, None when it ran out.

    Peak memory grows linearly with the batch (the activations), so the peaks at ``start`` and
    twice that predict the answer, and one probe on each side of the prediction confirms it:
    4 steps where a blind search takes about 12, each a model build and a step at a large batch.
    Where the prediction misses, doubling and bisection take over from the bounds found."""
    first = peak_of(start)
    if first is None:
        return 0
    fits = lambda batch: peak_of(batch) is not None  # noqa: E731
    good, bad = start, None
    if 2 * start <= limit:
        second = peak_of(2 * start)
        if second is None:
            bad = 2 * start
        else:
            good = 2 * start
            per_clip = (second - first) / start
            guess = min(limit, good + int((capacity - second) / per_clip)) if per_clip > 0 else good
            if guess > good:
                # Confirm the prediction with one probe just past it (when it fits) or just
                # short of it (when it does not).
                if fits(guess):
                    good, probe = guess, guess + resolution
                else:
                    bad, probe = guess, guess - resolution
                if good < probe <= limit and (bad is None or probe < bad):
                    if fits(probe):
                        good = probe
                    else:
                        bad = probe
    while bad is None:
        if 2 * good > limit:
            return good
        if fits(2 * good):
            good *= 2
        else:
            bad = 2 * good
    while bad - good > resolution:
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    return good


def search_largest_batch(rows: list, case: str, variant: str, cfg, device, start: int) -> int | str:
    """:func:`largest_fitting` for ``variant`` from ``start`` clips, its row appended to ``rows``
    (a failed search's too); the batch found, or '-'."""
    searching = time.perf_counter()
    try:
        capacity = available_memory(device)
        most = largest_fitting(lambda b: step_peak(variant, cfg, device, b), start, capacity)
    except Exception as exc:
        traceback.print_exc()
        rows.append({"case": case, "variant": variant, "pass": "max_batch",
                     "note": f"failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]}"})
        most = "-"
    else:
        rows.append({"case": case, "variant": variant, "pass": "max_batch", "throughput": most, "unit": "clips",
                     "note": f"the largest batch whose step fits, within 4 clips; capacity_GiB={capacity / 2**30:.1f}; "
                             f"search_s={time.perf_counter() - searching:.0f}"})
    gc.collect()  # after the except block: its traceback held the failed try's model
    torch.cuda.empty_cache()
    return most


def profile(step: Step, folder: Path, steps: int = 3) -> str:
    """A torch.profiler trace of a few steps and the table of the top operations (also saved
    split by input shapes, ``ops_by_shape_*.txt``)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if step.device.type == "cuda" else [])
    # Shapes tell which of the many calls of one op (copies, adds) cost the time.
    with torch_profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            step()
        sync(step.device)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{step.variant}_stage{step.model.objective.stage}"
    prof.export_chrome_trace(str(folder / f"trace_{name}.json.gz"))  # gzipped by its name: ViT-B traces are large
    sort = "self_cuda_time_total" if step.device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=30)
    by_shape = prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=40)
    (folder / f"top_ops_{name}.txt").write_text(table)
    (folder / f"ops_by_shape_{name}.txt").write_text(by_shape)
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="base", choices=["tiny", "base", "large"])
    p.add_argument("--stage", type=int, nargs="+", default=[2, 1])
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--variants", nargs="+", default=[v for v in VARIANTS if v != "ours_minmem"], choices=VARIANTS)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-batch", action="store_true", help="also search the largest batch that fits (GPU)")
    p.add_argument("--profile", default=None, help="folder for profiler traces of 'eager', 'ours' and 'ours_pure'")
    p.add_argument("--csv", default=None)
    p.add_argument("--quick", action="store_true", help="tiny preset, 2 steps (CI)")
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.batch, args.steps, args.warmup = "tiny", 4, 2, 1
        args.variants = [v for v in args.variants if v not in COMPILED]
    device = torch.device(args.device)
    env = environment(device)

    rows = CsvRows(args.csv, **env, benchmark="train_step")  # each row written as soon as it is measured
    print(f"{env['device']}, torch {env['torch']}, preset {args.preset}, batch {args.batch} clips per step")
    if device.type != "cuda":
        print("(no GPU: 'ours' runs the PyTorch references, the same computation as 'eager')")
    for stage in args.stage:
        cfg = preset(args.preset, stage)
        enc_cfg = encoder_config(cfg)
        flops = train_flops_per_clip(enc_cfg, objective_config(cfg, enc_cfg.depth), cfg.data.target_length,
                                     mask_config(cfg).num_kept)  # the preset's masks (large keeps 128)
        case = f"{args.preset},stage{stage},B={args.batch}"
        print(f"\n== stage {stage}: {flops / 1e12:.3f} TFLOP per clip")
        print(f"{'variant':>12} {'s/step':>9} {'clips/s':>9} {'MFU':>7} {'peak GiB':>9} {'GiB/clip':>9} {'max batch':>10} "
              f"{'x official':>11} {'wall s':>7}")
        base = None
        for variant in args.variants:
            began = time.perf_counter()  # the variant's whole cost here: build, compile, tuning, search
            try:
                step = Step(variant, cfg, args.batch, device)
                seconds, (median, p20, p80), peak = time_steps(step, args.warmup, args.steps)
            except Exception as exc:  # a variant that cannot run is reported, not fatal
                step = None  # nor would the memory of a variant that failed be the next one's
                print(f"{variant:>12} failed after {time.perf_counter() - began:.0f} s: {type(exc).__name__}: "
                      f"{(str(exc).splitlines() or [''])[0][:120]}")
                # Where it failed, for the log (an inductor assertion can carry no message).
                print("".join(traceback.format_exception(exc)[-12:]), file=sys.stderr)
                rows.append({"case": case, "variant": variant, "pass": "full", "note": f"failed: {type(exc).__name__}"})
                continue
            finally:
                gc.collect()
            clips = args.batch / seconds
            peak_flops = peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
            mfu = flops * clips / (peak_flops * 1e12) if peak_flops else float("nan")  # nan: a card of unknown peak
            base = base or (seconds if variant == "official" else None)
            speedup = base / seconds if base else float("nan")
            rows.append({"case": case, "variant": variant, "pass": "full", "median_ms": median * 1e3,
                         "p20_ms": p20 * 1e3, "p80_ms": p80 * 1e3, "throughput": clips, "unit": "clips/s",
                         "peak_mem_mb": peak * 1024,
                         "note": f"mfu={mfu:.4f}; flops_per_clip={flops:.4e}; wall_s={time.perf_counter() - began:.0f}; "
                                 f"skipped_steps={step.skipped}"})
            # The profile and the search come after the row, the profile first: a script stopped
            # at its time limit loses the least.
            if args.profile and variant in PROFILED:
                try:
                    print(f"\n-- top operations, {variant}, stage {stage}\n" + profile(step, Path(args.profile)))
                except Exception:  # the row above stands
                    traceback.print_exc()
            step = None  # its model and optimizer would take memory from the batch search
            gc.collect()
            most = "-"
            # The search recompiles a compiled variant for every size: measured for the others.
            if args.max_batch and device.type == "cuda" and variant not in COMPILED:
                most = search_largest_batch(rows, case, variant, cfg, device, args.batch)
            print(f"{variant:>12} {seconds:>9.4f} {clips:>9.2f} {100 * mfu:>6.1f}% {peak:>9.2f} "
                  f"{peak / args.batch:>9.3f} {most or '-':>10} {speedup:>10.2f}x {time.perf_counter() - began:>7.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
