"""Reading and writing encoder checkpoints, safely.

Formats read (detected by their sentinel keys, see :func:`read_checkpoint`):

* ``fairseq-pretrain``: official EAT / SSLAM pretraining ``.pt`` (``model`` with
  ``modality_encoders.IMAGE.*`` + ``blocks.*``, the CNN decoder, and the EMA teacher nested in
  ``model['_ema']``);
* ``fairseq-finetune``: official fine-tuned ``.pt`` (``model.``-prefixed encoder, ``fc_norm``,
  ``head``);
* ``hf``: Hugging Face EAT / SSLAM ``model.safetensors`` (+ ``config.json``), folder or file;
* ``sslam``: ours -- a folder with ``model.safetensors`` and ``config.json`` (the config is also
  stored in the safetensors metadata, so the weights file alone is enough);
* ``sslam-train``: the trainer's checkpoints (``torch.save`` of plain tensors and containers).

Loading never executes code from the file. Pickles are read by PyTorch's ``weights_only``
unpickler; objects of a few inert namespaces that official files carry (argparse, omegaconf,
fairseq, numpy, ...) are replaced by :class:`InertObject` stand-ins that only hold their data,
and any other global (``os.system``, ``builtins.eval``, ...) makes the load fail before anything
is unpickled.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .model import Encoder, EncoderConfig

FAIRSEQ_ENCODER_PREFIX = "modality_encoders.IMAGE."
FAIRSEQ_DECODER_PREFIX = "modality_encoders.IMAGE.decoder."

# Embedding-stage names: official (fairseq, Hugging Face) -> ours. Block names are shared.
_EMBEDDING_NAMES = {
    "extra_tokens": "cls_token",
    "local_encoder.proj.weight": "patch_embed.weight",
    "local_encoder.proj.bias": "patch_embed.bias",
    "fixed_positional_encoder.positions": "pos_embed",
    "context_encoder.norm.weight": "pre_norm.weight",  # fairseq
    "context_encoder.norm.bias": "pre_norm.bias",
    "pre_norm.weight": "pre_norm.weight",  # Hugging Face
    "pre_norm.bias": "pre_norm.bias",
}
_HEAD_NAMES = ("fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias")

# Globals that official checkpoints pickle besides tensors (configs, meters, numpy scalars).
# They are replaced by inert stand-ins; anything else is refused.
INERT_NAMESPACES = (
    "argparse", "omegaconf", "fairseq", "hydra", "numpy", "collections", "copyreg",
    "typing", "enum", "pathlib", "datetime", "_codecs", "functools.partial",
)


class CheckpointError(ValueError):
    """A checkpoint could not be read: unknown format, unsafe content, or keys/shapes that do
    not match the architecture. The message names the file."""


class InertObject:
    """Stand-in for a pickled object of an allowed namespace: keeps its data, runs nothing."""

    qualified_name = "?"

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state):
        self.state = state

    def __call__(self, *args, **kwargs):  # an inert stand-in for a function call result
        return type(self)(*args, **kwargs)

    def __repr__(self):
        return f"<inert {self.qualified_name}>"


def _stand_in(name: str) -> type:
    return type(name.rsplit(".", 1)[-1], (InertObject,), {"qualified_name": name, "__module__": __name__})


def _is_inert(name: str) -> bool:
    return any(name == ns or name.startswith(ns + ".") for ns in INERT_NAMESPACES)


def safe_torch_load(path: str | os.PathLike):
    """``torch.load`` that cannot execute code from the file (see the module docstring)."""
    path = Path(path)
    stand_ins = []
    is_zip = zipfile.is_zipfile(path)
    if is_zip:
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception as exc:
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({exc})") from exc
        refused = sorted(name for name in unsafe if not _is_inert(name))
        if refused:
            raise CheckpointError(
                f"{path}: refusing to load: unpickling it would call {', '.join(refused)}, which "
                "could run arbitrary code. Only tensors, containers and inert config/metric "
                "objects are accepted."
            )
        stand_ins = [(_stand_in(name), name) for name in unsafe]
    try:
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: refusing to load: {exc}".split("\n")[0]) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({exc})") from exc


@dataclass
class Checkpoint:
    """What :func:`read_checkpoint` found.

    state: encoder weights under our names (see :class:`sslam.model.Encoder`), float tensors.
    decoder: the CNN decoder's weights (pretraining checkpoints), names as in
        :class:`sslam.pretrain.CNNDecoder`; teacher: EMA teacher encoder weights when present.
    """

    path: Path
    format: str
    config: EncoderConfig
    state: dict[str, torch.Tensor]
    preprocessing: dict = field(default_factory=lambda: {"sample_rate": 16000, "target_length": 1024, "norm": "audioset"})
    label_names: list[str] | None = None
    decoder: dict[str, torch.Tensor] | None = None
    teacher: dict[str, torch.Tensor] | None = None
    raw_config: dict | None = None
    extra: dict = field(default_factory=dict)


# ---- key maps -------------------------------------------------------------------------------
def _rename_encoder(state: dict, prefix: str = "") -> tuple[dict, dict]:
    """Map official encoder names (after removing ``prefix``) to ours.
    Returns (encoder state, everything else with its original name)."""
    out, rest = {}, {}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            rest[name] = value
            continue
        if not name.startswith(prefix):
            rest[name] = value
            continue
        key = name[len(prefix):]
        if key.startswith(FAIRSEQ_ENCODER_PREFIX):
            key = key[len(FAIRSEQ_ENCODER_PREFIX):]
        if key in _EMBEDDING_NAMES:
            out[_EMBEDDING_NAMES[key]] = value
        elif key.startswith("blocks.") or key in _HEAD_NAMES:
            out[key] = value
        else:
            rest[name] = value
    return out, rest


def infer_config(state: dict[str, torch.Tensor], num_heads: int | None = None, **fields) -> EncoderConfig:
    """Architecture from the shapes of an encoder state (our names). Heads cannot be read from
    shapes: pass ``num_heads`` (from the file's config); otherwise head dim 64 is assumed."""
    try:
        dim = state["cls_token"].shape[-1]
        patch = state["patch_embed.weight"].shape[-1]
        depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
        mlp_dim = state["blocks.0.mlp.fc1.weight"].shape[0]
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"cannot infer the architecture: missing {exc}") from None
    config = dict(
        embed_dim=dim,
        depth=depth,
        num_heads=num_heads or max(1, dim // 64),
        mlp_ratio=mlp_dim / dim,
        patch_size=patch,
        qkv_bias="blocks.0.attn.qkv.bias" in state,
        num_classes=state["head.weight"].shape[0] if "head.weight" in state else 0,
    )
    if "pos_embed" in state:
        freq = fields.get("mel_bins", 128) // patch
        config["max_length"] = state["pos_embed"].shape[1] // freq
    config.update(fields)
    return EncoderConfig(**config)


def _fairseq_model_cfg(ckpt: dict) -> dict:
    cfg = ckpt.get("cfg")
    model = cfg.get("model") if isinstance(cfg, dict) else None
    return model if isinstance(model, dict) else {}


def _from_fairseq(path: Path, ckpt: dict, weights: str) -> Checkpoint:
    model = ckpt["model"]
    mcfg = _fairseq_model_cfg(ckpt)
    finetuned = any(k.startswith("model.") for k in model)
    if finetuned:
        state, rest = _rename_encoder(model, "model.")
        for name in _HEAD_NAMES:
            if name in rest:
                state[name] = rest.pop(name)
        if weights == "teacher":
            raise CheckpointError(f"{path}: a fine-tuned checkpoint has no EMA teacher")
        pre = mcfg.get("pretrained_model_args") or {}
        heads = (pre.get("model") or {}).get("num_heads") if isinstance(pre, dict) else None
        config = infer_config(state, heads or mcfg.get("num_heads"))
        return Checkpoint(path, "fairseq-finetune", config, state, raw_config=mcfg,
                          extra={"ignored": sorted(k for k in rest if isinstance(rest[k], torch.Tensor))})
    state, rest = _rename_encoder(model, "")
    decoder = {k[len(FAIRSEQ_DECODER_PREFIX):]: v for k, v in rest.items() if k.startswith(FAIRSEQ_DECODER_PREFIX)}
    teacher = None
    if isinstance(model.get("_ema"), dict):
        teacher, _ = _rename_encoder(model["_ema"], "")
    image = (mcfg.get("modalities") or {}).get("image") or {}
    config = infer_config(state, mcfg.get("num_heads"), norm_eps=float(mcfg.get("norm_eps", 1e-6)))
    prep = {"sample_rate": 16000, "target_length": int(image.get("target_length", 1024)), "norm": "audioset"}
    if weights == "teacher":
        if teacher is None:
            raise CheckpointError(f"{path}: weights='teacher' but the file has no '_ema' teacher")
        state, teacher = teacher, state
    unknown = sorted(k for k, v in rest.items() if isinstance(v, torch.Tensor) and not k.startswith(FAIRSEQ_DECODER_PREFIX))
    if unknown:
        raise CheckpointError(f"{path}: unexpected keys in the fairseq model: {unknown}")
    return Checkpoint(path, "fairseq-pretrain", config, state, preprocessing=prep, decoder=decoder or None,
                      teacher=teacher, raw_config=mcfg)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable JSON config ({exc})") from exc


def _load_safetensors(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    return tensors, metadata


def _hf_config(cfg: dict, state: dict) -> tuple[EncoderConfig, dict]:
    img = cfg.get("img_size") or [1024, cfg.get("mel_bins", 128)]
    fields = dict(
        norm_eps=float(cfg.get("norm_eps", 1e-6)),
        mel_bins=int(cfg.get("mel_bins", img[1])),
        head_norm_eps=1e-5,  # HF's fc_norm is nn.LayerNorm with its default eps
    )
    if "max_length" in cfg:
        fields["max_length"] = int(cfg["max_length"])
    config = infer_config(state, cfg.get("num_heads"), **fields)
    prep = {"sample_rate": 16000, "target_length": int(img[0]), "norm": "audioset"}
    return config, prep


def _from_safetensors(path: Path, config_path: Path | None, weights: str) -> Checkpoint:
    tensors, metadata = _load_safetensors(path)
    if metadata.get("format") == "sslam" or (config_path and _read_json(config_path).get("format") == "sslam"):
        meta = json.loads(metadata["sslam"]) if "sslam" in metadata else _read_json(config_path)
        if weights != "student":
            raise CheckpointError(f"{path}: an exported sslam encoder holds one set of weights; weights={weights!r} is not available")
        config = EncoderConfig.from_dict(meta["encoder"])
        return Checkpoint(path, "sslam", config, tensors, preprocessing=meta["preprocessing"],
                          label_names=meta.get("label_names"), raw_config=meta)
    # Hugging Face EAT / SSLAM: keys under "model." (EATModel.model), names of SPEC 7.3.
    prefix = "model." if any(k.startswith("model.") for k in tensors) else ""
    state, rest = _rename_encoder(tensors, prefix)
    for name in _HEAD_NAMES:
        if prefix + name in rest:
            state[name] = rest.pop(prefix + name)
    if rest:
        raise CheckpointError(f"{path}: unexpected keys for a Hugging Face EAT model: {sorted(rest)[:20]}")
    if weights != "student":
        raise CheckpointError(f"{path}: Hugging Face EAT files have no EMA teacher")
    cfg = _read_json(config_path) if config_path else {}
    config, prep = _hf_config(cfg, state)
    labels = cfg.get("id2label")
    label_names = [labels[str(i)] for i in range(len(labels))] if isinstance(labels, dict) and labels else None
    return Checkpoint(path, "hf", config, state, preprocessing=prep, label_names=label_names, raw_config=cfg)


def _from_train(path: Path, ckpt: dict, weights: str) -> Checkpoint:
    config = EncoderConfig.from_dict(ckpt["encoder_config"])
    if weights == "teacher":
        if ckpt.get("teacher") is None:
            raise CheckpointError(f"{path}: this training checkpoint has no teacher")
        state = ckpt["teacher"]
    else:
        state = ckpt["model"]
    return Checkpoint(path, "sslam-train", config, dict(state), preprocessing=ckpt.get("preprocessing", {}),
                      decoder=ckpt.get("decoder"), teacher=ckpt.get("teacher"), raw_config=ckpt.get("config"),
                      extra={"step": ckpt.get("step")})


WEIGHTS = ("student", "teacher")


def read_checkpoint(path: str | os.PathLike, weights: str = "student") -> Checkpoint:
    """Detect the format of ``path`` (file or folder) and return its weights under our names.

    ``weights``: 'student' (what official inference and fine-tuning use) or 'teacher' (the EMA
    teacher of pretraining checkpoints)."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}: choose 'student' or 'teacher'")
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        weights_file, config_file = path / "model.safetensors", path / "config.json"
        if not weights_file.exists():
            raise CheckpointError(f"{path}: folder without model.safetensors")
        return _from_safetensors(weights_file, config_file if config_file.exists() else None, weights)
    with path.open("rb") as f:
        head = f.read(16)
    if path.suffix == ".safetensors" or (len(head) >= 9 and head[8:9] == b"{"):
        beside = path.with_name("config.json")
        return _from_safetensors(path, beside if beside.exists() else None, weights)
    ckpt = safe_torch_load(path)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: expected a dict at the top level, got {type(ckpt).__name__}")
    if ckpt.get("format") == "sslam-train":
        return _from_train(path, ckpt, weights)
    if isinstance(ckpt.get("model"), dict):
        return _from_fairseq(path, ckpt, weights)
    raise CheckpointError(
        f"{path}: unknown checkpoint layout (top-level keys {sorted(map(str, ckpt))[:12]}); expected a "
        "fairseq EAT/SSLAM checkpoint, a Hugging Face EAT folder/model.safetensors, or an sslam file"
    )


def check_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str | os.PathLike) -> dict:
    """Compare ``state`` with ``model.state_dict()``: every key present, no extras, every shape
    equal. Returns the state with dtypes converted to the model's; raises CheckpointError listing
    every problem otherwise. Official files may omit the fixed position table; it is recomputed."""
    expected = model.state_dict()
    state = dict(state)
    if "pos_embed" in expected and "pos_embed" not in state:
        state["pos_embed"] = expected["pos_embed"]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state))
        if state[k].shape != expected[k].shape
    ]
    if missing or unexpected or shapes:
        lines = [f"{source}: weights do not match the architecture"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {missing}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {unexpected}")
        if shapes:
            lines.append(f"  shape mismatches ({len(shapes)}): {shapes}")
        raise CheckpointError("\n".join(lines))
    out = {}
    for k, v in state.items():
        if not torch.is_floating_point(v) or not torch.isfinite(v).all():
            raise CheckpointError(f"{source}: {k} is not a finite floating-point tensor")
        out[k] = v.to(expected[k].dtype)
    return out


def _fit_positions(model: Encoder, state: dict) -> dict:
    """A file's position table may have a different number of rows than the model's: keep the
    file's values for the rows both have (they are the same sin-cos table, possibly rounded)."""
    pos = state.get("pos_embed")
    if pos is None or pos.shape == model.pos_embed.shape:
        return state
    table = model.pos_embed.detach().clone()
    rows = min(pos.shape[1], table.shape[1])
    table[:, :rows] = pos[:, :rows].to(table.dtype)
    return {**state, "pos_embed": table}


def encoder_from_checkpoint(ckpt: Checkpoint, device="cpu", dtype: torch.dtype = torch.float32) -> Encoder:
    model = Encoder(ckpt.config)
    state = check_state(model, _fit_positions(model, ckpt.state), ckpt.path)
    model.load_state_dict(state, strict=True)
    model.preprocessing = dict(ckpt.preprocessing)
    model.label_names = list(ckpt.label_names) if ckpt.label_names else None
    return model.to(device=device, dtype=dtype).eval()


def load_encoder(path, device="cpu", weights: str = "student", dtype: torch.dtype = torch.float32) -> Encoder:
    """Load an encoder from any supported checkpoint (see the module docstring), in eval mode.

    The architecture (tiny to large) is read from the file; every key and shape is checked.
    ``weights='teacher'`` selects the EMA teacher of a pretraining checkpoint."""
    return encoder_from_checkpoint(read_checkpoint(path, weights), device=device, dtype=dtype)


def load_weights_into(model: Encoder, path, weights: str = "student") -> Encoder:
    """Load a checkpoint's encoder weights into an existing ``model`` (strict keys and shapes)."""
    ckpt = read_checkpoint(path, weights)
    model.load_state_dict(check_state(model, _fit_positions(model, ckpt.state), path), strict=True)
    return model


# ---- writing ------------------------------------------------------------------------------
def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_metadata(model: Encoder, source: dict | None = None) -> dict:
    return {
        "format": "sslam",
        "format_version": 1,
        "encoder": model.cfg.to_dict(),
        "preprocessing": model.preprocessing,
        "label_names": model.label_names,
        "source": source or {},
    }


def save_encoder(model: Encoder, out_dir: str | os.PathLike, source: dict | None = None) -> Path:
    """Write our format: ``out_dir/model.safetensors`` (float32 weights, config in its metadata)
    and ``out_dir/config.json``, each written atomically."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a folder")
    meta = export_metadata(model, source)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    atomic_write(out / "model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": "sslam", "sslam": json.dumps(meta)}))
    atomic_write(out / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))
    return out


def read_label_names(path: str | os.PathLike) -> list[str]:
    """Class names in index order from an AudioSet-style ``index,mid,display_name`` CSV or a
    text file with one name per line."""
    import csv

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read labels ({exc})") from exc
    rows = list(csv.reader(text.splitlines()))
    if rows and len(rows[0]) >= 3 and rows[0][0].strip().lower() == "index":
        entries = sorted((int(r[0]), r[2]) for r in rows[1:] if r)
        if [i for i, _ in entries] != list(range(len(entries))):
            raise CheckpointError(f"{path}: label indices are not 0..{len(entries) - 1}")
        return [name for _, name in entries]
    return [line.strip() for line in text.splitlines() if line.strip()]


def convert(src, out_dir, weights: str = "student", labels: str | os.PathLike | None = None) -> Path:
    """Convert any readable checkpoint to our format; ``labels`` names a fine-tuned model's
    classes (AudioSet ``class_labels_indices.csv`` style or one name per line)."""
    ckpt = read_checkpoint(src, weights)
    model = encoder_from_checkpoint(ckpt)
    if labels is not None:
        names = read_label_names(labels)
        if len(names) != model.cfg.num_classes:
            raise CheckpointError(f"{labels}: {len(names)} label names for a head of {model.cfg.num_classes} classes")
        model.label_names = names
    return save_encoder(model, out_dir, source={"format": ckpt.format, "weights": weights, "file": Path(src).name})


def describe(path, weights: str = "student") -> str:
    """A short human-readable summary (format, architecture, parameter count)."""
    ckpt = read_checkpoint(path, weights)
    cfg = ckpt.config
    n = sum(v.numel() for k, v in ckpt.state.items() if k != "pos_embed")
    lines = [
        f"file:         {ckpt.path}",
        f"format:       {ckpt.format}",
        f"weights:      {weights}" + ("" if ckpt.teacher is None else " (EMA teacher also present)"),
        f"architecture: dim {cfg.embed_dim}, depth {cfg.depth}, heads {cfg.num_heads}, mlp {cfg.mlp_dim}, "
        f"patch {cfg.patch_size}, positions {cfg.max_length} x {cfg.freq_patches}",
        f"parameters:   {n:,} (encoder without the fixed position table)",
        f"head:         {cfg.num_classes} classes" if cfg.num_classes else "head:         none (embeddings only)",
        f"decoder:      {'yes' if ckpt.decoder else 'no'}",
        f"preprocessing: {json.dumps(ckpt.preprocessing)}",
    ]
    if ckpt.label_names:
        lines.append(f"labels:       {len(ckpt.label_names)} ({', '.join(ckpt.label_names[:5])}, ...)")
    lines.append("config:       " + json.dumps(cfg.to_dict()))
    return "\n".join(lines)
