"""Reading and writing encoder checkpoints, safely.

Formats read (detected by their sentinel keys, see :func:`read_checkpoint`):

* ``fairseq-pretrain``: official EAT / SSLAM pretraining ``.pt`` (``model`` with
  ``modality_encoders.IMAGE.*`` + ``blocks.*``, the CNN decoder, and the EMA teacher nested in
  ``model['_ema']``);
* ``fairseq-finetune``: official fine-tuned ``.pt`` (``model.``-prefixed encoder, ``fc_norm``,
  ``head``);
* ``hf``: Hugging Face EAT / SSLAM ``model.safetensors`` or ``pytorch_model.bin`` (+
  ``config.json``), folder or file;
* ``state-dict``: a bare ``torch.save`` of encoder tensors (official, Hugging Face or our names);
* ``sslam``: ours -- a folder with ``model.safetensors`` and ``config.json`` (the config is also
  stored in the safetensors metadata, so the weights file alone is enough);
* ``sslam-train`` / ``sslam-finetune``: the trainers' checkpoints (``torch.save`` of plain
  tensors and containers).

Each may also be named on the Hugging Face Hub, ``hf-hub:OWNER/NAME[/PATH][@REVISION]`` (see
:mod:`sslam.hub`).

The architecture is read from the file: shapes fix the width, depth, MLP size, patch size and
head; the file's config gives the number of heads (which shapes cannot tell) and must agree
with the shapes. Every key and shape is checked before weights are loaded.

Loading never executes code from the file (see :mod:`sslam.safe_load`); outputs are written
atomically (see :mod:`sslam.files`).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .audio import SUPPORTED_RATES
from .features import NUM_MEL_BINS, norm_stats
from .files import (
    EXPORT_FILES,
    check_output_folder,
    checkpoints_in,
    creation_mode,
    load_json_object,
    read_json_object,
)
from .hub import MODEL_FILES, is_hub_name, local_path
from .model import HEAD_NAMES, VARIANTS, Encoder, EncoderConfig
from .safe_load import CheckpointError, file_kind, safe_torch_load, to_plain

FAIRSEQ_ENCODER_PREFIX = "modality_encoders.IMAGE."
FAIRSEQ_DECODER_PREFIX = "modality_encoders.IMAGE.decoder."
# Heads the official code adds for its optional losses (reconstruction, utterance-level DINO,
# whose centre is one tensor) and a shared decoder: trained beside the encoder, never read by
# its forward, so not loaded.
FAIRSEQ_TRAINING_HEADS = ("recon_proj.", "cls_proj.", "shared_decoder.")
FAIRSEQ_DINO_CENTER = "center"

# Embedding-stage names, ours -> Hugging Face's and fairseq's (SPEC 7.3); block names are shared.
_HF_EMBEDDING_NAMES = {
    "cls_token": "extra_tokens",
    "patch_embed.weight": "local_encoder.proj.weight",
    "patch_embed.bias": "local_encoder.proj.bias",
    "pos_embed": "fixed_positional_encoder.positions",
    "pre_norm.weight": "pre_norm.weight",
    "pre_norm.bias": "pre_norm.bias",
}
_FAIRSEQ_EMBEDDING_NAMES = {ours: FAIRSEQ_ENCODER_PREFIX + name.replace("pre_norm.", "context_encoder.norm.")
                            for ours, name in _HF_EMBEDDING_NAMES.items()}
# Any of them (fairseq's without its prefix, which renaming removes first) -> ours.
_EMBEDDING_NAMES = {
    **{ours: ours for ours in _HF_EMBEDDING_NAMES},
    **{name: ours for ours, name in _HF_EMBEDDING_NAMES.items()},
    **{name.removeprefix(FAIRSEQ_ENCODER_PREFIX): ours for ours, name in _FAIRSEQ_EMBEDDING_NAMES.items()},
}
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.")
_EMA_BLOCKS_ONLY_KEY = re.compile(r"\d+\.")  # data2vec ema_encoder_only: the teacher is the ModuleList


def _section(cfg, *keys) -> dict:
    """``cfg[k1][k2]...`` when every level is a dict, else {}."""
    for key in keys:
        cfg = cfg.get(key) if isinstance(cfg, dict) else None
    return cfg if isinstance(cfg, dict) else {}


@dataclass
class Checkpoint:
    """What :func:`read_checkpoint` found.

    state: the selected encoder weights (student or teacher) under our names (see
        :class:`sslam.model.Encoder`), float tensors.
    decoder: the CNN decoder's weights (pretraining checkpoints), names as in
        :class:`sslam.pretrain.CNNDecoder`; teacher: the EMA teacher's encoder weights when the
        file has them (whichever set ``state`` holds). preprocessing: sample_rate, target_length
        (where the file gives none, 1024 frames or what the position table covers) and norm. raw_config: the file's own config as written
        (fairseq's model cfg, Hugging Face's config.json, our metadata), for inspection.
    """

    path: Path
    format: str
    config: EncoderConfig
    state: dict[str, torch.Tensor]
    preprocessing: dict
    label_names: list[str] | None = None
    decoder: dict[str, torch.Tensor] | None = None
    teacher: dict[str, torch.Tensor] | None = None
    raw_config: dict | None = None
    # Config fields the file states (the rest were read from shapes or are defaults/guesses).
    declared: frozenset[str] = frozenset(f.name for f in dataclasses.fields(EncoderConfig))
    # Where ``state`` sits in the file, for messages: "" (the file's main weights) or a part.
    part: str = ""
    # How the file names the weights, for messages: (prefix, "fairseq" | "hf" | "sslam"), and
    # whether its EMA teacher is a bare block list (``0.*`` for our ``blocks.0.*``).
    naming: tuple[str, str] = ("", "sslam")
    teacher_is_block_list: bool = False

    @property
    def source(self) -> str:
        """The file, and the part of it that ``state`` comes from, as messages name it."""
        return f"{self.path} ({self.part})" if self.part else str(self.path)

    def file_key(self, key: str) -> str:
        """The name the file gives the weight ``key`` (ours) of ``state``: the official files
        name the embedding stage otherwise, and prefix the encoder with ``model.`` (fairseq's
        fine-tuned heads excepted). For messages only."""
        return self._file_key(key, teacher=self.state is self.teacher)  # weights="teacher" selects it

    def teacher_file_key(self, key: str) -> str:
        """The name the file gives the weight ``key`` (ours) of ``teacher``."""
        return self._file_key(key, teacher=True)

    def _file_key(self, key: str, teacher: bool) -> str:
        if teacher and self.teacher_is_block_list and key.startswith("blocks."):
            return key.removeprefix("blocks.")  # the rest is the student's, named as the student is
        prefix, style = self.naming
        if style == "fairseq" and prefix and key.split(".")[0] in ("fc_norm", "head"):
            return key  # a fine-tuned fairseq model's head is outside its "model." encoder
        names = {"fairseq": _FAIRSEQ_EMBEDDING_NAMES, "hf": _HF_EMBEDDING_NAMES}.get(style, {})
        return prefix + names.get(key, key)

    def decoder_file_key(self, key: str) -> str:
        """The name the file gives the decoder weight ``key`` (ours) of ``decoder``."""
        return FAIRSEQ_DECODER_PREFIX + key if self.naming[1] == "fairseq" else key


# ---- key maps -------------------------------------------------------------------------------
def _rename_encoder(state: dict, prefix: str = "") -> tuple[dict, dict]:
    """Map official encoder names (after removing ``prefix``) to ours.
    Returns (encoder tensors, everything else -- other names and non-tensor values -- with its
    original name)."""
    out, rest = {}, {}
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor) or not name.startswith(prefix):
            rest[name] = value
            continue
        key = name[len(prefix):]
        if key.startswith(FAIRSEQ_ENCODER_PREFIX):
            key = key[len(FAIRSEQ_ENCODER_PREFIX):]
        ours = _EMBEDDING_NAMES.get(key, key if key.startswith("blocks.") or key in HEAD_NAMES else None)
        # A second name for a weight already read (pre_norm.weight beside the official name)
        # is left over, so the caller reports it rather than one of the two silently winning.
        if ours is None or ours in out:
            rest[name] = value
        else:
            out[ours] = value
    return out, rest


def _take_heads(state: dict, rest: dict) -> None:
    """Move into ``state`` the head tensors that ``rest`` holds outside the encoder's prefix
    (fairseq fine-tuned files: ``head.*`` beside ``model.*``); a second copy of one already in
    ``state`` stays in ``rest``, to be reported."""
    for name in HEAD_NAMES:
        if isinstance(rest.get(name), torch.Tensor) and name not in state:
            state[name] = rest.pop(name)


def _naming(keys, prefix: str = "") -> tuple[str, str]:
    """How a file names its encoder weights (:attr:`Checkpoint.naming`), from its keys."""
    names = {k[len(prefix):] for k in keys if isinstance(k, str) and k.startswith(prefix)}
    if any(name.startswith(FAIRSEQ_ENCODER_PREFIX) for name in names):
        return prefix, "fairseq"
    if names & {_HF_EMBEDDING_NAMES[k] for k in ("cls_token", "patch_embed.weight", "pos_embed")}:
        return prefix, "hf"
    return prefix, "sslam"


# ---- architecture ---------------------------------------------------------------------------
def _block_indices(state: dict) -> set[int]:
    return {int(m.group(1)) for k in state if isinstance(k, str) and (m := _BLOCK_KEY.match(k))}


def shape_architecture(state: dict) -> dict:
    """What the tensor shapes of an encoder state (our names) fix. A key is present only when a
    tensor decides it: embed_dim, patch_size (an (h, w) pair if the kernel is not square), depth
    (highest block index + 1), mlp_dim (fc1 rows of the first block), qkv_bias, num_classes (0
    without a head), pos_rows (rows of the position table)."""
    def tensor(name, ndim):
        value = state.get(name)
        return value if isinstance(value, torch.Tensor) and value.dim() == ndim else None

    found = {}
    for name, ndim, axis in (("cls_token", 3, -1), ("patch_embed.weight", 4, 0), ("pre_norm.weight", 1, 0)):
        if (value := tensor(name, ndim)) is not None:
            found["embed_dim"] = value.shape[axis]
            break
    if (conv := tensor("patch_embed.weight", 4)) is not None:
        h, w = conv.shape[-2:]
        found["patch_size"] = w if h == w else (h, w)
    blocks = _block_indices(state)
    if blocks:
        found["depth"] = max(blocks) + 1
        if (fc1 := tensor(f"blocks.{min(blocks)}.mlp.fc1.weight", 2)) is not None:
            found["mlp_dim"] = fc1.shape[0]
        found["qkv_bias"] = any(k.endswith(".attn.qkv.bias") for k in state if isinstance(k, str))
    head = tensor("head.weight", 2)
    found["num_classes"] = head.shape[0] if head is not None else 0
    if (pos := tensor("pos_embed", 3)) is not None:
        found["pos_rows"] = pos.shape[1]
    return found


def architecture_mismatches(config: EncoderConfig, state: dict) -> list[str]:
    """Where ``config`` disagrees with the shapes of ``state`` (our names); [] if nowhere.
    Cheap (no model is built), so a config that declares an absurd size fails here."""
    found = shape_architecture(state)
    declared = {"embed_dim": config.embed_dim, "depth": config.depth, "mlp_dim": config.mlp_dim,
                "patch_size": config.patch_size, "qkv_bias": config.qkv_bias, "num_classes": config.num_classes,
                "pos_rows": config.max_length * config.freq_patches}
    problems = [f"{k}: config {declared[k]}, weights {found[k]}" for k in declared if k in found and found[k] != declared[k]]
    blocks = _block_indices(state)
    if not blocks:  # nothing shows the depth: an encoder of any declared one would be built
        problems.append(f"depth: config {config.depth}, weights 0 (no blocks.* weights)")
    elif len(blocks) != max(blocks) + 1:
        top = max(blocks)
        gaps = sorted(set(range(top + 1)) - blocks)[:20] if top < 100_000 else "many"
        problems.append(f"blocks: {len(blocks)} blocks numbered up to {top}; missing block(s) {gaps}")
    return problems


def _check_architecture(config: EncoderConfig, state: dict, source) -> None:
    problems = architecture_mismatches(config, state)
    if problems:
        raise CheckpointError(f"{source}: the architecture does not match the weights: " + "; ".join(problems))


def _default_heads(dim: int, source) -> int:
    """Heads for a file that does not record them: those of the known variant of this width
    (tiny 64 -> 2, small 384 -> 6, base 768 -> 12, large 1024 -> 16), else head dim 64. Shapes
    cannot tell the number of heads, so this is a guess and says so."""
    variant = next((v for v in VARIANTS.values() if v.embed_dim == dim), None)
    heads = variant.num_heads if variant else max(1, dim // 64)
    if dim % heads:
        heads = 1
    warnings.warn(
        f"{source}: the file does not record num_heads (weight shapes cannot tell it); assuming "
        f"{heads} (head dim {dim // heads}). If that is wrong, build the encoder yourself: "
        "sslam.create_model(EncoderConfig(..., num_heads=H), checkpoint=path).",
        stacklevel=4,
    )
    return heads


def infer_config(state: dict[str, torch.Tensor], num_heads: int | None = None, *, source="checkpoint",
                 config_source=None, **fields) -> EncoderConfig:
    """Architecture from the shapes of an encoder state (our names), with ``fields`` (values the
    file's config declares; None = not declared) taking precedence -- :func:`read_checkpoint`
    then checks they agree with the shapes. Heads cannot be read from shapes: pass
    ``num_heads`` (from the file's config); otherwise :func:`_default_heads` guesses, warning.
    Errors in ``fields`` name ``config_source`` (a config.json beside the weights) if given."""
    found = shape_architecture(state)
    missing = [name for name in ("embed_dim", "patch_size", "depth", "mlp_dim") if name not in found]
    if missing:
        names = sorted(map(str, state))
        held = f"its tensors are named {_listed(names)}" if names else "it holds no tensors"
        raise CheckpointError(f"{source}: cannot infer the architecture: no tensor gives {', '.join(missing)}; {held}")
    if isinstance(found["patch_size"], tuple):
        raise CheckpointError(f"{source}: non-square patch kernel {found['patch_size']} is not supported")
    dim, patch = found["embed_dim"], found["patch_size"]
    values = dict(embed_dim=dim, depth=found["depth"], mlp_ratio=found["mlp_dim"] / dim, patch_size=patch,
                  qkv_bias=found["qkv_bias"], num_classes=found["num_classes"])
    mel_bins = fields.get("mel_bins") or NUM_MEL_BINS  # a bad value is EncoderConfig's to name
    freq = mel_bins // patch if isinstance(mel_bins, int) and not isinstance(mel_bins, bool) else 0
    pos = state.get("pos_embed")
    if isinstance(pos, torch.Tensor) and pos.dim() == 3 and freq > 0 and pos.shape[1] % freq == 0 and pos.shape[1]:
        values["max_length"] = pos.shape[1] // freq
    values.update({k: v for k, v in fields.items() if v is not None})
    values["num_heads"] = num_heads if num_heads is not None else _default_heads(values["embed_dim"], source)
    try:
        return EncoderConfig(**values)
    except (TypeError, ValueError) as exc:
        where = f"{config_source}: invalid architecture" if config_source else f"{source}: invalid architecture in the file's config"
        raise CheckpointError(f"{where}: {exc}") from None


# ---- fairseq (official EAT / SSLAM) ---------------------------------------------------------
def _fairseq_model_cfg(ckpt: dict, source) -> dict:
    """``cfg['model']`` as plain dicts (hydra-era files; a pickled DictConfig also works), else
    the legacy flat ``args`` namespace, else {}. A tensor in it is an error naming where."""
    model = _section(to_plain(ckpt.get("cfg"), source), "model")
    if not model:
        args = to_plain(ckpt.get("args"), source)
        model = args if isinstance(args, dict) else {}
    where = _tensor_in(model)
    if where is not None:
        raise CheckpointError(f"{source}: the model config holds a tensor at {where}, where numbers or text belong")
    return model


def _tensor_in(cfg, where: str = "model") -> str | None:
    """Where the first tensor in the plain config ``cfg`` is (one would make the config's
    comparisons ambiguous), else None."""
    if isinstance(cfg, torch.Tensor):
        return where
    items = cfg.items() if isinstance(cfg, dict) else enumerate(cfg) if isinstance(cfg, list) else ()
    return next((found for key, value in items if (found := _tensor_in(value, f"{where}.{key}"))), None)


def _unsupported(model_cfg: dict, source, image: dict | None = None) -> None:
    """Refuse configs this encoder does not compute (instead of loading them wrongly): a fairseq
    model config (image settings under ``modalities.image``) or a Hugging Face config.json
    (``image=cfg``: one flat dict)."""
    image = _section(model_cfg, "modalities", "image") if image is None else image
    problems = []
    if model_cfg.get("layer_norm_first") is True:
        problems.append("layer_norm_first=True (pre-LN blocks with a final norm)")
    if model_cfg.get("norm_affine") is False:
        problems.append("norm_affine=False")
    if image.get("use_alibi_encoder") is True:
        problems.append("use_alibi_encoder=True")
    if image.get("num_extra_tokens") not in (None, 1):
        problems.append(f"num_extra_tokens={image['num_extra_tokens']} (one CLS token is supported)")
    if image.get("prenet_depth") not in (None, 0):
        problems.append(f"prenet_depth={image['prenet_depth']}")
    if image.get("fixed_positions") is False:
        problems.append("fixed_positions=False (no fixed sin-cos position table)")
    if problems:
        raise CheckpointError(f"{source}: unsupported encoder configuration: {'; '.join(problems)}")


def _stated(fields: dict) -> frozenset[str]:
    """The config fields a file states: those of ``fields`` (None = absent) with a value."""
    return frozenset(name for name, value in fields.items() if value is not None)


def _fairseq_fields(model_cfg: dict, state: dict) -> dict:
    """Architecture fields a data2vec_multi model config declares (None where absent). The
    stored position table, when there is one, is what the official model used: its rows give
    max_length; the config's value only replaces a missing table."""
    image = _section(model_cfg, "modalities", "image")
    return {
        "embed_dim": model_cfg.get("embed_dim"),
        "depth": model_cfg.get("depth"),
        "num_heads": model_cfg.get("num_heads"),
        "mlp_ratio": model_cfg.get("mlp_ratio"),
        "norm_eps": model_cfg.get("norm_eps"),
        "patch_size": image.get("patch_size"),
        "max_length": None if "pos_embed" in state else image.get("max_length"),
        "qkv_bias": True,  # data2vec_multi blocks always have one: a file without is damaged
    }


def _check_official_patches(config: EncoderConfig, source) -> None:
    """The official patch embedding convolves with a ``patch_size`` kernel but always strides 16
    frames and bins: any other size makes overlapping (or gapped) patches that this encoder,
    striding by its kernel, does not compute. No release uses one."""
    if config.patch_size != 16:
        raise CheckpointError(f"{source}: patch_size={config.patch_size}: the official patch embedding strides 16 "
                              "whatever its kernel, so only 16 x 16 patches are computed as it computes them")


def _is_block_list(ema) -> bool:
    """Whether an EMA teacher dict is data2vec's ``ema_encoder_only`` block list (``{i}.*``)."""
    names = [k for k, v in ema.items() if isinstance(k, str) and isinstance(v, torch.Tensor)]
    return bool(names) and all(_EMA_BLOCKS_ONLY_KEY.match(k) for k in names)


def _teacher_state(ema, student: dict, model_cfg: dict, source) -> dict | None:
    """The EMA teacher's encoder weights (our names) from ``model['_ema']``, or None.

    data2vec 2.0 (which EAT / SSLAM train with) stores the teacher as a nested dict of fp32
    copies named like the student's encoder, without the decoder. Two config switches leave
    parts out, and the official teacher then uses the student's copy of those parts:
    ``ema_encoder_only`` (the dict is the block list, names ``{i}.*``) and
    ``modalities.image.ema_local_encoder=False`` (no patch convolution)."""
    if not isinstance(ema, dict):
        return None
    tensors = {k: v for k, v in ema.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        return None
    outside_blocks = [k for k in student if not k.startswith("blocks.")]
    if _is_block_list(tensors):
        teacher = {f"blocks.{k}": v for k, v in tensors.items()}
        shared = outside_blocks
    else:
        teacher, rest = _rename_encoder(tensors)
        twice = sorted(k for k in rest if k in teacher)  # pre_norm.weight beside its official name
        if twice:
            raise CheckpointError(f"{source}: model['_ema'] holds {twice} under two names")
        # Unknown teacher tensors stay under their names so that loading lists them.
        teacher.update({k: v for k, v in rest.items() if not k.startswith(FAIRSEQ_DECODER_PREFIX)})
        shared = []
        if model_cfg.get("ema_encoder_only") is True:
            shared = outside_blocks
        elif _section(model_cfg, "modalities", "image").get("ema_local_encoder") is False:
            shared = ["patch_embed.weight", "patch_embed.bias"]
    # The teacher module has no such parts: the official forward reads the student's, even
    # where ``_ema`` still holds copies (left by a run started from a file whose teacher had them).
    teacher.update({key: student[key] for key in shared if key in student})
    return teacher


def _finetune_preprocessing(model_cfg: dict, source) -> dict:
    """Fine-tuning recipes fix the clip length and the normalisation (ESC-50: 512 frames and
    its own statistics; Speech Commands: 128 frames)."""
    pre_image = _section(model_cfg, "pretrained_model_args", "model", "modalities", "image")
    length = model_cfg.get("target_length") or pre_image.get("target_length")
    norm = "esc50" if model_cfg.get("esc50_eval") else "spcv2" if model_cfg.get("spcv2_eval") else "audioset"
    return _check_preprocessing({"sample_rate": 16000, "target_length": length, "norm": norm}, source)


def _is_training_head(key) -> bool:
    """``key`` names a weight of one of :data:`FAIRSEQ_TRAINING_HEADS` or the DINO centre."""
    return isinstance(key, str) and (key == FAIRSEQ_DINO_CENTER or key.startswith(FAIRSEQ_TRAINING_HEADS))


def _pretraining_leftover(key, value) -> bool:
    """A fine-tuned file's ``model.`` entry that only pretraining used: the decoder, the EMA
    teacher, or a weight of an optional loss's head (the official fine-tuning keeps
    ``cls_proj`` and ``center``)."""
    if not isinstance(key, str) or not key.startswith("model."):
        return False
    name = key[len("model."):]
    return (name.startswith(FAIRSEQ_DECODER_PREFIX) or name == "_ema"
            or (_is_training_head(name) and isinstance(value, torch.Tensor)))


def _from_fairseq_finetuned(path: Path, model: dict, mcfg: dict, weights: str) -> Checkpoint:
    state, rest = _rename_encoder(model, "model.")
    _take_heads(state, rest)
    if weights == "teacher":
        raise CheckpointError(f"{path}: a fine-tuned checkpoint has no EMA teacher")
    pre_model = _section(mcfg, "pretrained_model_args", "model")
    _unsupported(pre_model, path)
    if mcfg.get("use_fc_norm") is False:
        raise CheckpointError(f"{path}: use_fc_norm=False heads (no LayerNorm before the head) are not supported")
    mode = mcfg.get("prediction_mode")
    if mode not in (None, "CLS_TOKEN") and not str(mode).endswith("CLS_TOKEN"):
        # The encoder is sound, but its head reads a pooling this package does not compute:
        # applied to the CLS token its logits would be wrong, so it is not loaded at all.
        warnings.warn(f"{path}: its head was trained on prediction_mode={mode}, not on the CLS token; "
                      "the encoder is loaded without it (no logits)", stacklevel=4)
        for name in HEAD_NAMES:
            state.pop(name, None)
        mcfg = {**mcfg, "num_classes": None}
    unknown = sorted(str(k) for k, v in rest.items() if not _pretraining_leftover(k, v))
    if unknown:
        raise CheckpointError(f"{path}: unexpected keys in the fine-tuned fairseq model: {unknown[:20]}")
    fields = _fairseq_fields(pre_model, state)
    if mcfg.get("norm_eps") is not None:  # the fine-tuning config may override it
        fields["norm_eps"] = mcfg["norm_eps"]
    fields["num_classes"] = mcfg.get("num_classes")
    config = infer_config(state, source=path, **fields)
    _check_official_patches(config, path)
    return Checkpoint(path, "fairseq-finetune", config, state, preprocessing=_finetune_preprocessing(mcfg, path),
                      raw_config=mcfg, declared=_stated(fields),
                      naming=_naming(model, "model."))


def _from_fairseq(path: Path, ckpt: dict, weights: str) -> Checkpoint:
    model = ckpt["model"]
    mcfg = _fairseq_model_cfg(ckpt, path)
    if any(isinstance(k, str) and k.startswith("model.") for k in model):
        return _from_fairseq_finetuned(path, model, mcfg, weights)
    _unsupported(mcfg, path)
    state, rest = _rename_encoder(model, "")
    decoder, unknown = {}, []
    for key, value in rest.items():
        if isinstance(key, str) and key.startswith(FAIRSEQ_DECODER_PREFIX) and isinstance(value, torch.Tensor):
            decoder[key[len(FAIRSEQ_DECODER_PREFIX):]] = value
        elif _is_training_head(key) and isinstance(value, torch.Tensor):
            continue
        elif key != "_ema":
            unknown.append(str(key))
    if unknown:
        raise CheckpointError(f"{path}: unexpected keys (or non-tensor values) in the fairseq model: {sorted(unknown)[:20]}")
    teacher = _teacher_state(model.get("_ema"), state, mcfg, path)
    if weights == "teacher":
        if teacher is None:
            raise CheckpointError(f"{path}: weights='teacher' but the file has no (non-empty) '_ema' teacher")
        state = teacher
    part = "its EMA teacher, model['_ema']" if weights == "teacher" else ""
    image = _section(mcfg, "modalities", "image")
    fields = _fairseq_fields(mcfg, state)
    config = infer_config(state, source=f"{path} ({part})" if part else path, **fields)
    _check_official_patches(config, path)
    prep = _check_preprocessing({"target_length": image.get("target_length")}, path)
    return Checkpoint(path, "fairseq-pretrain", config, state, preprocessing=prep, decoder=decoder or None,
                      teacher=teacher, raw_config=mcfg, declared=_stated(fields), part=part,
                      naming=_naming(model), teacher_is_block_list=teacher is not None and _is_block_list(model["_ema"]))


# ---- Hugging Face / bare state dicts ---------------------------------------------------------
def _read_json(path: Path | None) -> dict:
    """The JSON object of a config.json at ``path``; {} where there is none (None)."""
    if path is None:
        return {}
    try:
        return load_json_object(path)
    except ValueError as exc:  # e.g. integers over 4300 digits
        raise CheckpointError(f"{path}: unreadable JSON config ({exc})") from exc


def _load_safetensors(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    return tensors, metadata


def _hf_fields(cfg: dict, has_head: bool, source) -> dict:
    """Architecture fields an EAT ``config.json`` declares; refuses configs the encoder does
    not compute (pre-LN, no positions, ...)."""
    _unsupported(cfg, source, image=cfg)
    fields = {k: cfg.get(k) for k in ("embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "patch_size",
                                      "mel_bins", "max_length", "norm_eps")}
    # config.json carries num_classes (527) for the pretraining variant too; only a head counts.
    if has_head or cfg.get("model_variant") == "finetune":
        fields["num_classes"] = cfg.get("num_classes")
    return fields


def _hf_labels(cfg: dict, num_classes: int, source) -> list[str] | None:
    """Class names from ``id2label`` when they name every output of the head, else None."""
    labels = cfg.get("id2label")
    if not isinstance(labels, dict) or not labels or num_classes == 0:
        return None
    names = [labels.get(str(i), labels.get(i)) for i in range(len(labels))]
    if len(names) != num_classes or not all(isinstance(n, str) for n in names):
        warnings.warn(f"{source}: ignoring id2label ({len(labels)} entries) for a head of {num_classes} classes",
                      stacklevel=4)
        return None
    return names


def _from_tensors(path: Path, tensors: dict, cfg: dict, weights: str, fmt: str,
                  config_path: Path | None = None) -> Checkpoint:
    """A flat dict of encoder tensors: Hugging Face EAT (``model.`` prefix, names of SPEC 7.3),
    official fairseq names, or ours; ``cfg`` is the Hugging Face config.json at ``config_path``
    (or {})."""
    prefix = "model." if any(isinstance(k, str) and k.startswith("model.") for k in tensors) else ""
    if prefix and "model.pre_norm.weight" in tensors:
        fmt = "hf"  # Hugging Face names (a fairseq fine-tuned state dict has context_encoder.norm)
    state, rest = _rename_encoder(tensors, prefix)
    _take_heads(state, rest)
    if rest:
        raise CheckpointError(f"{path}: unexpected keys for an EAT encoder: {sorted(map(str, rest))[:20]}")
    if weights != "student":
        raise CheckpointError(f"{path}: this file holds one set of weights (no EMA teacher)")
    image, config_source = cfg.get("img_size"), config_path or path  # what names config problems
    fields = _hf_fields(cfg, "head.weight" in state, config_source)
    if fields.get("mel_bins") is None and isinstance(image, (list, tuple)) and len(image) == 2:
        fields["mel_bins"] = image[1]
    # Hugging Face's fc_norm is nn.LayerNorm with its default eps (1e-5); fairseq's uses 1e-6. A
    # file without a head has no such norm: the default (the official fine-tuning's) stands.
    fields["head_norm_eps"] = 1e-5 if fmt == "hf" and "head.weight" in state else None
    config = infer_config(state, source=path, config_source=config_path, **fields)
    _check_architecture(config, state, config_source)  # first: a wrong patch_size is named as such
    stride = cfg.get("stride")
    if isinstance(stride, (list, tuple)) and stride and all(s == stride[0] for s in stride):  # (16, 16)
        stride = stride[0]
    if stride not in (None, config.patch_size):
        raise CheckpointError(f"{config_source}: unsupported encoder configuration: stride={cfg['stride']} differs from the "
                              f"patch size {config.patch_size} (patches must tile the spectrogram)")
    length = image[0] if isinstance(image, (list, tuple)) and image else cfg.get("target_length")
    prep = _check_preprocessing({"sample_rate": 16000, "target_length": length, "norm": "audioset"}, config_source)
    return Checkpoint(path, fmt, config, state, preprocessing=prep,
                      label_names=_hf_labels(cfg, config.num_classes, config_source), raw_config=cfg, declared=_stated(fields),
                      naming=_naming(tensors, prefix))


# ---- ours ------------------------------------------------------------------------------------
def _check_preprocessing(prep, source) -> dict:
    """The file's preprocessing settings over the defaults, each checked: a bad value would
    otherwise surface later as a wrong embedding or a huge allocation. A ``target_length`` the
    file does not give stays None until :func:`_check_window` knows the position table."""
    default = {"sample_rate": 16000, "target_length": None, "norm": "audioset"}
    if prep is None:
        return default
    if not isinstance(prep, dict):
        raise CheckpointError(f"{source}: preprocessing must be a dict, got {type(prep).__name__}")
    prep = {**default, **{k: v for k, v in prep.items() if v is not None or k == "norm"}}
    for key in ("sample_rate", "target_length"):
        if key == "target_length" and prep[key] is None:
            continue
        if not isinstance(prep[key], int) or isinstance(prep[key], bool) or prep[key] < 1:
            raise CheckpointError(f"{source}: preprocessing {key}={prep[key]!r} must be a positive integer")
    low, high = SUPPORTED_RATES
    if not low <= prep["sample_rate"] <= high:
        raise CheckpointError(
            f"{source}: preprocessing sample_rate={prep['sample_rate']} is outside {low}..{high} Hz"
        )
    try:
        norm_stats(prep["norm"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: preprocessing norm={prep['norm']!r} is not usable ({exc})") from None
    return prep


def _check_window(ckpt: Checkpoint) -> None:
    """The preprocessing window must be whole patches that the position table covers; where the
    file gives none, it is the config's default (AudioSet's 1024 frames, or what the table covers
    if that is less)."""
    if ckpt.preprocessing.get("target_length") is None:
        ckpt.preprocessing = {**ckpt.preprocessing, "target_length": ckpt.config.default_frames}
    _check_frames(ckpt.config, ckpt.preprocessing["target_length"], ckpt.path)


def _check_frames(config: EncoderConfig, frames: int, source) -> None:
    if not config.fits_window(frames):
        raise CheckpointError(
            f"{source}: preprocessing target_length={frames} frames must be a multiple of the "
            f"patch size {config.patch_size} and at most the {config.max_frames} "
            "frames the position table covers"
        )


def _check_labels(names, num_classes: int, source) -> list[str] | None:
    if names is None:
        return None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(names) != num_classes:
        count = len(names) if isinstance(names, list) else type(names).__name__
        raise CheckpointError(f"{source}: label names ({count}) must be {num_classes} strings, one per class")
    return names


def _encoder_config(values, source) -> EncoderConfig:
    try:
        return EncoderConfig.from_dict(values)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: invalid encoder config: {exc}") from None


def _from_sslam(path: Path, tensors: dict, metadata: dict, beside: dict, config_path: Path | None,
                weights: str) -> Checkpoint:
    """Our export: the config inside the weights file (``metadata``), else config.json
    (``beside``, read from ``config_path``)."""
    if "sslam" in metadata:
        try:
            meta = json.loads(metadata["sslam"])
        except ValueError as exc:  # not JSON, or integers over 4300 digits
            raise CheckpointError(f"{path}: unreadable sslam metadata ({exc})") from None
        if config_path is not None and beside != meta:
            warnings.warn(f"{config_path} differs from the config inside {path.name}, which is the one used (it was "
                          "saved with these weights); edits to config.json change nothing", stacklevel=5)
    else:
        meta = beside
    if not isinstance(meta, dict) or not isinstance(meta.get("encoder"), dict):
        raise CheckpointError(f"{path}: sslam metadata without an 'encoder' config")
    if weights != "student":
        raise CheckpointError(f"{path}: an exported sslam encoder holds one set of weights; weights={weights!r} is not available")
    config = _encoder_config(meta["encoder"], path)
    return Checkpoint(path, "sslam", config, tensors, preprocessing=_check_preprocessing(meta.get("preprocessing"), path),
                      label_names=_check_labels(meta.get("label_names"), config.num_classes, path), raw_config=meta)


def _from_safetensors(path: Path, config_path: Path | None, weights: str) -> Checkpoint:
    tensors, metadata = _load_safetensors(path)
    cfg = _read_json(config_path)
    if metadata.get("format") == "sslam" or cfg.get("format") == "sslam":
        return _from_sslam(path, tensors, metadata, cfg, config_path, weights)
    return _from_tensors(path, tensors, cfg, weights, "hf", config_path)


def _from_own_torch(path: Path, ckpt: dict, weights: str) -> Checkpoint:
    """The trainers' checkpoints: ``sslam-train`` (student, decoder, teacher) and
    ``sslam-finetune`` (encoder with head, class names)."""
    fmt = ckpt["format"]
    if "encoder_config" not in ckpt:
        raise CheckpointError(f"{path}: {fmt} checkpoint without 'encoder_config'")
    config = _encoder_config(ckpt["encoder_config"], path)
    teacher = ckpt.get("teacher") if isinstance(ckpt.get("teacher"), dict) and ckpt.get("teacher") else None
    if weights == "teacher" and teacher is None:
        raise CheckpointError(f"{path}: this {fmt} checkpoint has no teacher")
    state = teacher if weights == "teacher" else ckpt.get("model")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: {fmt} checkpoint without a 'model' state dict")
    labels = ckpt.get("class_names")
    labels = list(labels) if isinstance(labels, tuple) else labels
    return Checkpoint(path, fmt, config, dict(state), preprocessing=_check_preprocessing(ckpt.get("preprocessing"), path),
                      label_names=_check_labels(labels or None, config.num_classes, path),
                      decoder=ckpt.get("decoder") if isinstance(ckpt.get("decoder"), dict) else None,
                      teacher=teacher, raw_config=ckpt.get("config"))


WEIGHTS = ("student", "teacher")
_OWN_TORCH_FORMATS = ("sslam-train", "sslam-finetune")


def _is_encoder_state(obj: dict) -> bool:
    """A bare state dict of an encoder: only tensors, and encoder names among them."""
    if not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        return False
    names = (k.removeprefix("model.").removeprefix(FAIRSEQ_ENCODER_PREFIX) for k in obj)
    return any(n in _EMBEDDING_NAMES or n.startswith("blocks.") for n in names)


def _file_or_none(path: Path, what: str) -> Path | None:
    """``path`` if a file is there, None if nothing is; anything else (a folder, a pipe, a
    broken link, see :func:`sslam.safe_load.file_kind`) is a CheckpointError naming it."""
    kind = file_kind(path)
    if kind == "folder":
        raise CheckpointError(f"{path}: is a folder, not {what}")
    return path if kind == "file" else None


# A fairseq run's checkpoints, in the order a folder names them: the pretrained releases ship
# the last one, the fine-tuned releases the best one alone.
FAIRSEQ_NAMES = ("checkpoint_last.pt", "checkpoint_best.pt")


def run_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint of a training run's folder (``runs/s1``), or the last one of a
    fairseq run's (else its best one), which is what the folder names
    wherever a checkpoint is read (``pretrain --init`` too); None for a file, or for a folder
    with a model's weights file (that is its checkpoint) or without checkpoints."""
    if not folder.is_dir() or any((folder / name).exists() for name in MODEL_FILES):
        return None
    found = checkpoints_in(folder)
    if found:
        return found[-1]
    for name in FAIRSEQ_NAMES:
        if _file_or_none(folder / name, "a checkpoint"):
            return folder / name
    return None


def _read_folder(path: Path, weights: str) -> Checkpoint:
    config_file = _file_or_none(path / "config.json", "a JSON config")
    if _file_or_none(path / "model.safetensors", "a weights file"):
        return _from_safetensors(path / "model.safetensors", config_file, weights)
    if _file_or_none(path / "pytorch_model.bin", "a weights file"):  # Hugging Face, saved without safetensors
        tensors = safe_torch_load(path / "pytorch_model.bin")
        if not isinstance(tensors, dict):
            raise CheckpointError(f"{path / 'pytorch_model.bin'}: expected a dict of tensors")
        return _from_tensors(path / "pytorch_model.bin", tensors, _read_json(config_file), weights,
                             "hf", config_file)
    newest = run_checkpoint(path)
    if newest is not None:
        return _read_layout(newest, weights)
    raise CheckpointError(f"{path}: folder without model.safetensors, pytorch_model.bin or a training checkpoint "
                          f"(checkpoint_<step>.pt, or fairseq's {' or '.join(FAIRSEQ_NAMES)})")


def _read(source: str | os.PathLike, weights: str) -> Checkpoint:
    """The checkpoint of a local file or folder, or of a Hub name (see :mod:`sslam.hub`)."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}: choose 'student' or 'teacher'")
    path = local_path(source)
    try:
        try:
            return _read_layout(path, weights)
        except RecursionError:  # containers (a pickled or JSON config, say) nested thousands of levels deep
            raise CheckpointError(f"{path}: nested too deeply to read (a damaged or crafted file)") from None
    except CheckpointError as exc:
        if is_hub_name(source):  # the name given, then the cached file the message is about
            raise CheckpointError(f"{source}: {exc}") from exc
        raise


def _read_layout(path: Path, weights: str) -> Checkpoint:
    kind = file_kind(path)
    if kind is None:
        # OWNER/NAME, as Hugging Face's from_pretrained takes a Hub name: say how to name one here.
        looks_like_hub = not path.is_absolute() and len(path.parts) == 2 and not path.suffix
        hint = f" (a Hugging Face model? name it hf-hub:{path.as_posix()})" if looks_like_hub else ""
        raise CheckpointError(f"{path}: no such file or folder{hint}")
    if kind == "folder":
        return _read_folder(path, weights)
    with path.open("rb") as f:
        head = f.read(16)
    if not head:
        raise CheckpointError(f"{path}: empty file")
    if path.suffix == ".safetensors" or (len(head) >= 9 and head[8:9] == b"{"):
        return _from_safetensors(path, _file_or_none(path.with_name("config.json"), "a JSON config"), weights)
    ckpt = safe_torch_load(path)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: expected a dict at the top level, got {type(ckpt).__name__}")
    if ckpt.get("format") in _OWN_TORCH_FORMATS:
        return _from_own_torch(path, ckpt, weights)
    if isinstance(ckpt.get("model"), dict):
        return _from_fairseq(path, ckpt, weights)
    if _is_encoder_state(ckpt):
        return _from_tensors(path, ckpt, {}, weights, "state-dict")
    raise CheckpointError(
        f"{path}: unknown checkpoint layout (top-level keys {sorted(map(str, ckpt))[:12]}); expected a "
        "fairseq EAT/SSLAM checkpoint, a Hugging Face EAT folder/model.safetensors, or an sslam file"
    )


def read_checkpoint(path: str | os.PathLike, weights: str = "student") -> Checkpoint:
    """Detect the format of ``path`` (file or folder) and return its weights under our names.

    ``weights``: 'student' (what official inference and fine-tuning use) or 'teacher' (the EMA
    teacher of pretraining checkpoints). The returned config agrees with the weights' shapes
    (CheckpointError otherwise)."""
    ckpt = _read(path, weights)
    _check_architecture(ckpt.config, ckpt.state, ckpt.source)
    _check_window(ckpt)
    return ckpt


def check_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str | os.PathLike,
                file_key=None, *, values: bool = True) -> dict:
    """Compare ``state`` with ``model.state_dict()``: every key present, no extras, every shape
    equal. Returns the state with dtypes converted to the model's (fp16 / bf16 files are cast);
    raises CheckpointError listing every problem otherwise, each key also under the name the
    file gives it (``file_key``: ours -> the file's, e.g. :meth:`Checkpoint.file_key`). Official
    files may omit the fixed position table; it is recomputed. Non-finite weights (NaN / inf)
    are an error (with ``values``; without, only keys and shapes are compared and ``state`` is
    returned as it is)."""

    def shown(key: str) -> str:
        name = file_key(key) if file_key is not None else key
        return key if name == key else f"{name} (sslam: {key})"

    expected = model.state_dict()
    recomputed = ({"pos_embed"} - set(state)) & set(expected)  # the model's own table, unchecked
    not_tensors = sorted(str(k) for k, v in state.items() if not isinstance(v, torch.Tensor))
    missing = [shown(k) for k in sorted(set(expected) - set(state) - recomputed)]
    unexpected = [shown(k) for k in sorted(str(k) for k in set(state) - set(expected))]
    shapes = [
        f"{shown(k)}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state))
        if isinstance(state[k], torch.Tensor) and state[k].shape != expected[k].shape
    ]
    problems = {"missing keys": missing, "unexpected keys": unexpected, "shape mismatches": shapes,
                "not tensors": not_tensors}
    if any(problems.values()):
        lines = [f"{source}: weights do not match the architecture"]
        lines += [f"  {what} ({len(found)}): {_listed(found)}" for what, found in problems.items() if found]
        raise CheckpointError("\n".join(lines))
    if not values:
        return dict(state)
    out = {}
    for k, v in state.items():
        # Dense float tensors of the usual widths only: isfinite has no kernel for sparse, meta
        # or float8 tensors, whose errors would not name the file.
        usable = v.layout == torch.strided and not v.is_meta and v.dtype in _WEIGHT_DTYPES
        out[k] = v.to(expected[k].dtype) if usable else v
        if not usable or not torch.isfinite(out[k]).all():  # after the cast: 1e300 in float64 is inf in float32
            kind = f"{v.dtype}, {v.layout}" + (", meta" if v.is_meta else "")
            if usable and torch.isfinite(v).all():
                kind += f"; not finite as {out[k].dtype}"
            raise CheckpointError(f"{source}: {shown(k)} is not a finite floating-point tensor ({kind})")
    return out | {k: expected[k] for k in recomputed}


def _listed(items: list[str], shown: int = 20) -> str:
    """``items`` as a list literal of the first ``shown``, and how many more there are."""
    more = f", ... and {len(items) - shown} more" if len(items) > shown else ""
    return repr(items[:shown])[:-1] + more + "]"


_WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fit_positions(model: Encoder, state: dict) -> dict:
    """A file's position table may have a different number of rows than the model's: keep the
    file's values for the rows both have (they are the same sin-cos table, possibly rounded).
    A table of another width or rank is left for :func:`check_state` to report."""
    pos = state.get("pos_embed")
    table = model.pos_embed
    if not isinstance(pos, torch.Tensor) or pos.shape == table.shape:
        return state
    if pos.dim() != 3 or pos.shape[0] != 1 or pos.shape[2] != table.shape[2]:
        return state
    table = table.detach().clone()
    rows = min(pos.shape[1], table.shape[1])
    table[:, :rows] = pos[:, :rows].to(table.dtype)
    return {**state, "pos_embed": table}


def _check_on_meta(ckpt: Checkpoint, values: bool = True) -> None:
    """Keys and shapes of ``ckpt`` (and its values: see :func:`check_state`) against its
    config's model built on the meta device (no memory, even for ViT-L): a config whose size no
    weight shows (a file without them, say) could otherwise claim a model of any size,
    allocated before anything is compared."""
    _check_architecture(ckpt.config, ckpt.state, ckpt.source)
    with torch.device("meta"):
        check_state(Encoder(ckpt.config), ckpt.state, ckpt.source, ckpt.file_key, values=values)


def encoder_from_checkpoint(ckpt: Checkpoint, device="cpu", dtype: torch.dtype = torch.float32) -> Encoder:
    _check_on_meta(ckpt, values=False)  # the values once, below
    model = Encoder(ckpt.config)
    state = check_state(model, _fit_positions(model, ckpt.state), ckpt.source, ckpt.file_key)
    model.load_state_dict(state, strict=True)
    return _with_metadata(model, ckpt).to(device=device, dtype=dtype).eval()


def _with_metadata(model: Encoder, ckpt: Checkpoint) -> Encoder:
    """``model`` with what the file says about its input and its classes (an ESC-50 model
    embeds 512 frames with its own statistics)."""
    model.preprocessing = dict(ckpt.preprocessing)
    model.label_names = list(ckpt.label_names) if ckpt.label_names else None
    return model


def usable_device(device) -> torch.device:
    """``device`` as a torch.device this process can use, or ValueError naming it and why (a
    misspelt name, CUDA without a GPU, a GPU index beyond those present)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(f"device={device!r}: not a device name ({exc})") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r}: sslam runs on 'cpu' or 'cuda' devices")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device={device!r}: no CUDA device is available here")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device={device!r}: only {count} CUDA device(s) here (cuda:0..cuda:{count - 1})")
    return dev


def encoder_fingerprint(model, *, weights_only: bool = False) -> str:
    """A short hash of an encoder's weights, architecture and preprocessing: what a resumed
    extraction or fine-tuning checks it goes on with (another checkpoint, or the teacher instead
    of the student, would otherwise mix two models without a word). ``weights_only``: the
    weights and their names alone."""
    meta = {} if weights_only else {"encoder": model.cfg.to_dict(), "preprocessing": model.preprocessing}
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy())
    return digest.hexdigest()[:16]


def load_encoder(path, device="cpu", weights: str = "student", dtype: torch.dtype = torch.float32) -> Encoder:
    """Load an encoder from any supported checkpoint (see the module docstring), in eval mode.

    The architecture (tiny to large) is read from the file; every key and shape is checked.
    ``weights='teacher'`` selects the EMA teacher of a pretraining checkpoint."""
    device = usable_device(device)  # before reading what may be a large file
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype={dtype!r}: expected a floating-point torch.dtype (torch.float32, torch.bfloat16, ...)")
    return encoder_from_checkpoint(read_checkpoint(path, weights), device=device, dtype=dtype)


def load_weights_into(model: Encoder, path, weights: str = "student") -> Encoder:
    """Load a checkpoint's encoder weights into an existing ``model`` (strict keys and shapes),
    as ``load_state_dict`` does: the model's ``preprocessing`` and ``label_names`` stay as they
    are. (``create_model(cfg, checkpoint=path)`` and :func:`load_encoder` take the file's.)"""
    _load_weights(model, path, weights)
    return model


def _load_weights(model: Encoder, path, weights: str) -> Checkpoint:
    """Load the weights into ``model``; the checkpoint they came from."""
    with warnings.catch_warnings():  # the model's own config gives the heads: no guess needed
        warnings.filterwarnings("ignore", message=".*does not record num_heads")
        ckpt = _read(path, weights)
    _check_shape_blind_fields(model.cfg, ckpt)
    model.load_state_dict(check_state(model, _fit_positions(model, ckpt.state), path, ckpt.file_key), strict=True)
    return ckpt


def _load_with_metadata(model: Encoder, path) -> Encoder:
    """``model`` with the checkpoint's student weights, preprocessing and label names, as
    :func:`load_encoder` gives them (for ``create_model(cfg, checkpoint=path)``)."""
    return _with_metadata(model, _load_weights(model, path, "student"))


def _check_shape_blind_fields(config: EncoderConfig, ckpt: Checkpoint) -> None:
    """Where the file states a field that weight shapes cannot show (heads, LayerNorm eps), the
    model must agree: the weights would load and compute something else."""
    names = ["num_heads", "norm_eps"] + (["head_norm_eps"] if config.num_classes else [])
    conflicts = [
        f"{name}: file {getattr(ckpt.config, name)}, model {getattr(config, name)}"
        for name in names
        if name in ckpt.declared and getattr(ckpt.config, name) != getattr(config, name)
    ]
    if conflicts:
        raise CheckpointError(
            f"{ckpt.source}: the model differs from the file's config where weight shapes cannot "
            f"tell ({'; '.join(conflicts)}); build it with the file's values, or use "
            "sslam.load_encoder(path)"
        )


# ---- writing ------------------------------------------------------------------------------
def export_metadata(model: Encoder, source: dict | None = None) -> dict:
    return {
        "format": "sslam",
        "format_version": 1,
        "encoder": model.cfg.to_dict(),
        "preprocessing": model.preprocessing,
        "label_names": None if model.label_names is None else list(model.label_names),
        "source": source or {},
    }


def _check_export_folder(out_dir: str | os.PathLike) -> None:
    """Refuse an output folder that cannot be made (:func:`check_output_folder`), or whose
    config.json is not an export's (a training run's, a Hugging Face model's): replacing it
    would lose it, and it would not describe the weights written."""
    check_output_folder(out_dir, argument="output folder")  # as given: Path("") would be "."
    config = _file_or_none(Path(out_dir) / "config.json", "a JSON config")
    if config is not None and (read_json_object(config) or {}).get("format") != "sslam":
        raise CheckpointError(f"{config}: not the config of an exported encoder; it is kept: choose another folder")


def _check_exportable(model: Encoder, out: Path) -> None:
    """Refuse to write what :func:`read_checkpoint` would refuse to read: ``preprocessing`` and
    ``label_names`` are attributes a user may set."""
    source = f"{out} (model.preprocessing, model.label_names)"
    names = model.label_names
    if names is not None and (isinstance(names, str) or not isinstance(names, collections.abc.Sequence)):
        raise CheckpointError(f"{source}: label names must be a list of strings, got {type(names).__name__}")
    prep = _check_preprocessing(model.preprocessing, source)
    _check_labels(None if names is None else list(names), model.cfg.num_classes, source)
    if prep["target_length"] is not None:  # None: the default window, which fits
        _check_frames(model.cfg, prep["target_length"], source)


def save_encoder(model: Encoder, out_dir: str | os.PathLike, source: dict | None = None) -> Path:
    """Write our format: ``out_dir/model.safetensors`` (float32 weights, config in its metadata)
    and ``out_dir/config.json``.

    Both files are written into a temporary folder beside ``out_dir`` first, so a failure leaves
    no partial output: a new ``out_dir`` appears by one rename; in an existing folder each file
    is replaced by a rename (the weights file carries its own config, so it stays readable
    even if only it was replaced)."""
    from safetensors.torch import save_file

    _check_export_folder(out_dir)
    out = Path(out_dir)
    _check_exportable(model, out)
    meta = export_metadata(model, source)
    text = json.dumps(meta, indent=2) + "\n"  # fails here, before anything is written, if not JSON
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        os.chmod(tmp, creation_mode(0o777))  # mkdtemp makes it private; the output should not be
        save_file(state, tmp / "model.safetensors", metadata={"format": "sslam", "sslam": json.dumps(meta)})
        (tmp / "config.json").write_text(text)
        for name in EXPORT_FILES:
            os.chmod(tmp / name, creation_mode(0o666))  # safetensors creates its file 0600
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        if out.is_dir():
            for name in EXPORT_FILES:
                os.replace(tmp / name, out / name)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def read_label_names(path: str | os.PathLike) -> list[str]:
    """Class names in index order from an AudioSet-style ``index,mid,display_name`` CSV, with or
    without its header (read as :func:`sslam.labels.read_descriptors` reads it for evaluation),
    or a text file with one name per line."""
    import csv

    from .data import text_lines
    from .labels import LabelError, is_descriptor_row, read_descriptors, read_text

    path = Path(path)
    try:
        lines = [line.strip() for line in text_lines(read_text(path)) if line.strip()]
        first = next(csv.reader(lines[:1]), [""])
        if first[0].strip().lower() == "index" or is_descriptor_row(first):
            return [name for _, name in read_descriptors(path)]
    except LabelError as exc:
        raise CheckpointError(str(exc)) from None
    return lines


def convert(src, out_dir, weights: str = "student", labels: str | os.PathLike | None = None,
            overwrite: bool = False) -> Path:
    """Convert any readable checkpoint to our format; ``labels`` names a fine-tuned model's
    classes (AudioSet ``class_labels_indices.csv`` style or one name per line). An encoder
    already exported in ``out_dir`` is replaced only with ``overwrite=True``."""
    _check_export_folder(out_dir)
    existing = [name for name in EXPORT_FILES if (Path(out_dir) / name).exists()]
    if existing and not overwrite:  # checked first: a refusal costs no checkpoint read
        raise CheckpointError(f"{out_dir}: already holds an exported encoder ({', '.join(existing)}); "
                              "pass overwrite=True (sslam convert --overwrite) to replace it")
    ckpt = read_checkpoint(src, weights)
    model = encoder_from_checkpoint(ckpt)
    if labels is not None:
        names = read_label_names(labels)
        if len(names) != model.cfg.num_classes:
            raise CheckpointError(f"{labels}: {len(names)} label names for a head of {model.cfg.num_classes} classes")
        model.label_names = names
    # The file read, by the name it was given; in a folder (a model's, a run's), the folder's too.
    if is_hub_name(src):
        name = src
    elif ckpt.path == Path(src):
        name = Path(src).name
    else:
        name = f"{Path(src).resolve().name}/{ckpt.path.name}"
    # An export of a teacher holds the teacher still, however often it is converted.
    earlier = (ckpt.raw_config or {}).get("source") if ckpt.format == "sslam" else None
    held = "teacher" if isinstance(earlier, dict) and earlier.get("weights") == "teacher" else weights
    return save_encoder(model, out_dir, source={"format": ckpt.format, "weights": held, "file": name})


def describe(path, weights: str = "student") -> str:
    """A short human-readable summary (format, architecture, parameter count)."""
    ckpt = read_checkpoint(path, weights)
    cfg = ckpt.config
    _check_on_meta(ckpt)  # `info` fails where loading would
    n = sum(v.numel() for k, v in ckpt.state.items() if k != "pos_embed")
    # An export's record of what it was made from (convert, fine-tuning), when it has one.
    source = (ckpt.raw_config or {}).get("source") if ckpt.format == "sslam" else None
    converted = source.get("file") if isinstance(source, dict) and isinstance(source.get("file"), str) else None
    if weights == "teacher":
        which = "teacher (the EMA copy; the file also holds the student)"
    elif converted and source.get("weights") == "teacher":
        which = f"teacher (the EMA copy of {converted}, converted)"
    elif converted:
        which = f"student (of {converted}, converted)"
    else:
        which = "student" + ("" if ckpt.teacher is None else " (EMA teacher also present)")
    lines = [
        f"file:         {ckpt.path}",
        f"format:       {ckpt.format}",
        f"weights:      {which}",
        f"architecture: dim {cfg.embed_dim}, depth {cfg.depth}, heads {cfg.num_heads}, mlp {cfg.mlp_dim}, "
        f"patch {cfg.patch_size}, positions {cfg.max_length} x {cfg.freq_patches}",
        f"parameters:   {n:,} (encoder without the fixed position table)",
        f"head:         {cfg.num_classes} classes" if cfg.num_classes else "head:         none (embeddings only)",
        f"decoder:      {'yes' if ckpt.decoder else 'no'}",
        f"preprocessing: {json.dumps(ckpt.preprocessing)}",
    ]
    if ckpt.label_names:
        lines.append(f"labels:       {len(ckpt.label_names)} ({', '.join(ckpt.label_names[:5])}, ...)")
    if source:
        lines.append("source:       " + json.dumps(source))
    lines.append("config:       " + json.dumps(cfg.to_dict()))
    return "\n".join(lines)
