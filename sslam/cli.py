"""The ``sslam`` command: ``extract``, ``convert``, ``info``, ``pretrain``, ``evaluate``, ``demo``.

Each sub-command parses its arguments (``pretrain``, ``evaluate`` and ``demo`` add theirs from
their modules) and calls one library function; errors about the user's input are printed as one
line (``sslam: error: ...``) with exit status 2.
"""

from __future__ import annotations

import argparse
import io
import os
import select
import sys

import torch

AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
CHECKPOINT_HELP = "official fairseq .pt, Hugging Face folder, sslam folder, or hf-hub:OWNER/NAME[/PATH][@REVISION]"


def _device(name: str | None) -> str:
    if name:
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def cmd_extract(args) -> int:
    from .checkpoint import load_encoder
    from .embedding import with_preprocessing
    from .extract import check_output, run_extract
    from .features import parse_norm

    check_output(args.out)  # before the checkpoint is read
    norm = None if args.norm is None else parse_norm(args.norm)
    model = with_preprocessing(load_encoder(args.checkpoint, device=_device(args.device), weights=args.weights),
                               norm=norm, target_length=args.target_length)
    if args.compile:
        model.compile_for_inference()
    try:
        report = run_extract(
            model,
            args.inputs,
            args.out,
            granularity=args.granularity,
            batch_size=args.batch_size,
            padding=args.padding,
            crop=args.crop,
            hop=args.hop,
            autocast=AUTOCAST[args.autocast],
            workers=args.workers,
            manifest_root=args.manifest_root,
            progress=not args.no_progress,
        )
    except OSError as exc:  # e.g. --out under a file or a read-only folder: one line, not a traceback
        raise ValueError(f"cannot extract to {args.out}: {exc}") from exc
    print(report.summary())
    return 1 if report.failed and not args.skip_errors else 0


def cmd_convert(args) -> int:
    from .checkpoint import CheckpointError, convert

    try:
        out = convert(args.src, args.out, weights=args.weights, labels=args.labels, overwrite=args.overwrite)
    except OSError as exc:  # e.g. OUT under a file or a read-only folder: one line, not a traceback
        raise CheckpointError(f"cannot convert {args.src} to {args.out}: {exc}") from exc
    print(f"wrote {out}/model.safetensors and {out}/config.json")
    return 0


def cmd_info(args) -> int:
    from .checkpoint import CheckpointError, describe

    try:
        text = describe(args.file, weights=args.weights)
    except OSError as exc:  # e.g. an unreadable file
        raise CheckpointError(f"{args.file}: {exc}") from exc
    print(text)
    return 0


def _add_extract(sub) -> None:
    p = sub.add_parser("extract", help="embeddings of audio files, folders and .tsv manifests")
    p.add_argument("inputs", nargs="+", help="audio files, folders (recursive) or fairseq .tsv manifests")
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--out", required=True, help="a .npz file, or a folder for one .npz per input")
    p.add_argument("--granularity", default="utterance", choices=["utterance", "mean", "frames", "timestamps", "all"])
    p.add_argument("--batch-size", type=int, default=16,
                   help="windows per forward pass; files share a pass up to that many window lengths of "
                        "audio, so long files go alone")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--weights", default="student", choices=["student", "teacher"])
    p.add_argument("--padding", default="official", choices=["official", "mask"],
                   help="official: pad each clip to the encoder's window (10.24 s for the official checkpoints); "
                        "mask: pad to the batch and mask")
    p.add_argument("--crop", action="store_true", help="keep only the first window (the official crop)")
    p.add_argument("--target-length", type=int, default=None,
                   help="frames per window if not the checkpoint's (the official extraction's --target_length)")
    p.add_argument("--norm", default=None,
                   help="normalisation if not the checkpoint's: audioset, esc50, spass, spcv2, or --norm=MEAN,STD "
                        "(the official extraction's --norm_mean and --norm_std)")
    p.add_argument("--hop", type=int, default=None,
                   help="frames between the windows of long audio (default: half the window; not with --crop)")
    p.add_argument("--autocast", default="none", choices=sorted(AUTOCAST), help="GPU autocast dtype")
    p.add_argument("--workers", type=int, default=2, help="decoding threads")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the encoder first: a slow start; on a CPU faster at batch 1, "
                        "slower at batch 16 (see the README's Performance section)")
    p.add_argument("--manifest-root", default=None, help="override the root line of .tsv manifests")
    p.add_argument("--skip-errors", action="store_true", help="exit 0 even if some files failed")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_extract)


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint to the sslam format (safetensors + JSON)")
    p.add_argument("src", help=CHECKPOINT_HELP)
    p.add_argument("out", help="output folder")
    p.add_argument("--weights", default="student", choices=["student", "teacher"])
    p.add_argument("--labels", default=None, help="class names of a fine-tuned model (index,mid,display_name CSV or one per line)")
    p.add_argument("--overwrite", action="store_true", help="replace an encoder already exported in OUT")
    p.set_defaults(func=cmd_convert)


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="format, architecture and parameter count of a checkpoint")
    p.add_argument("file", help=CHECKPOINT_HELP)
    p.add_argument("--weights", default="student", choices=["student", "teacher"])
    p.set_defaults(func=cmd_info)


def build_parser() -> argparse.ArgumentParser:
    from .demo import add_demo_command
    from .evaluate import add_evaluate_command
    from .train import add_pretrain_command

    parser = argparse.ArgumentParser(prog="sslam", description="SSLAM / EAT audio encoders")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_demo_command, add_pretrain_command, add_evaluate_command, _add_extract, _add_convert, _add_info):
        add(sub)
    # No abbreviations: `evaluate finetune --seed=3` would otherwise be read as --seeds=3 instead
    # of reaching FinetuneConfig.seed, and `pretrain --out` could shadow a future --output.
    for p in (parser, *sub.choices.values()):
        p.allow_abbrev = False
    return parser


def _message(exc: BaseException) -> str:
    """``exc``'s message. One a DataLoader worker met is re-raised with the worker's traceback in
    its text ("Caught X in DataLoader worker process 0. Original Traceback ..."): its last
    line, the original message, is what the user needs."""
    text = str(exc)
    if not (text.startswith("Caught ") and "\nOriginal Traceback" in text):
        return text
    kind = type(exc)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    return text.rpartition(f"\n{name}: ")[2].strip() or text


def main(argv: list[str] | None = None) -> int:
    from .audio import AudioError
    from .checkpoint import CheckpointError
    from .runs import StopTraining

    for stream in (sys.stdout, sys.stderr):  # a file name the terminal cannot encode is escaped, not fatal
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not hasattr(args, "overrides"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = extra  # pretrain's --section.key=value, evaluate's --key=value
    try:
        return args.func(args)
    except BrokenPipeError as exc:
        if _output_reader_left():  # `sslam info ckpt | head -1`: end quietly
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # nothing left to flush at exit
            os.close(devnull)
            return 1
        print(f"sslam: error: {_message(exc)}", file=sys.stderr)  # another pipe than the output's
        return 2
    # OSError: e.g. --out naming an existing file, a read-only folder.
    except (AudioError, CheckpointError, ValueError, OSError) as exc:
        print(f"sslam: error: {_message(exc)}", file=sys.stderr)
        return 2
    except StopTraining as exc:  # a run stopped for a reason it explains (bad files, NaN losses)
        print(f"sslam: {exc}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as exc:  # after StopTraining, itself a RuntimeError
        if not _out_of_memory(exc):
            raise
        detail = _message(exc).strip().splitlines()[:1] or [type(exc).__name__]
        print(f"sslam: error: out of memory ({detail[0]}): lower the batch size or the sizes of the model or "
              f"data{_resume_hint(args)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"sslam: interrupted{_resume_hint(args)}", file=sys.stderr)
        return 130


def _out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation that failed: Python's MemoryError, torch's
    ``OutOfMemoryError`` (CUDA), or the RuntimeError of torch's CPU allocator."""
    import torch

    return (isinstance(exc, (MemoryError, torch.OutOfMemoryError))
            or "DefaultCPUAllocator: can't allocate memory" in str(exc))


def _output_reader_left() -> bool:
    """Whether stdout is a pipe whose reader has gone (poll reports an error on its write end)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), no file descriptor
        return False


def _resume_hint(args) -> str:
    """What rerunning an interrupted command does: runs resume from their last checkpoint (every
    write is atomic, so an interrupted one leaves the previous file whole)."""
    from .train_config import parse_option

    given = [item.split("=", 1)[1] for item in getattr(args, "overrides", []) if item.startswith("--run.resume=")]
    try:  # (a bad value is refused before any work; it can only be met here if interrupted before that)
        fresh = bool(given) and parse_option(given[-1], "bool", "run.resume") is False
    except ValueError:
        fresh = False
    if fresh:  # the same command is refused where checkpoints now are
        return "; without --run.resume=false the same command resumes from the last checkpoint"
    if args.command in ("pretrain", "demo") or getattr(args, "mode", None) == "finetune":
        return "; the same command resumes from the last checkpoint in its output folder, if it has one"
    if args.command == "extract":
        return "; the same command embeds the inputs not yet done"
    return ""


if __name__ == "__main__":
    sys.exit(main())
