"""Edge cases of checkpoint import/export and of the encoder forward: other model sizes,
teacher layouts, hostile and damaged files, `sslam convert` / `sslam info`, odd inputs.

Official-format files are built here from the key tables of SPEC 7.2 / 7.3 (fairseq
``modality_encoders.IMAGE.*`` + ``blocks.*`` with a nested ``_ema``; fine-tuned ``model.``-prefixed
keys + ``fc_norm`` + ``head``; Hugging Face ``model.*`` safetensors + config.json) around an
encoder with random weights, so every expectation is "the loaded encoder equals the one the
file was made from"."""

from __future__ import annotations

import argparse
import errno
import io
import json
import os
import pickle
import re
import stat
import sys
import types
import typing
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import GOLDEN, load_golden
from safetensors.torch import load_file, save_file

from sslam.checkpoint import (
    CheckpointError,
    check_state,
    convert,
    describe,
    load_encoder,
    load_weights_into,
    read_checkpoint,
    save_encoder,
)
from sslam.files import atomic_write
from sslam.model import VARIANTS, Encoder, EncoderConfig
from sslam.safe_load import safe_torch_load
from sslam.train import resolve_init

TINY = GOLDEN / "tiny_ckpt.pt"
FRAMES = 64  # 4 time patches: every forward here is tiny

# SPEC 7.2 / 7.3: our names -> official names of the embedding stage (blocks are shared).
FAIRSEQ = {
    "cls_token": "modality_encoders.IMAGE.extra_tokens",
    "patch_embed.weight": "modality_encoders.IMAGE.local_encoder.proj.weight",
    "patch_embed.bias": "modality_encoders.IMAGE.local_encoder.proj.bias",
    "pos_embed": "modality_encoders.IMAGE.fixed_positional_encoder.positions",
    "pre_norm.weight": "modality_encoders.IMAGE.context_encoder.norm.weight",
    "pre_norm.bias": "modality_encoders.IMAGE.context_encoder.norm.bias",
}
HF = {
    "cls_token": "model.extra_tokens",
    "patch_embed.weight": "model.local_encoder.proj.weight",
    "patch_embed.bias": "model.local_encoder.proj.bias",
    "pos_embed": "model.fixed_positional_encoder.positions",
    "pre_norm.weight": "model.pre_norm.weight",
    "pre_norm.bias": "model.pre_norm.bias",
}


# ---- builders of official-format files -----------------------------------------------------
def random_encoder(cfg: EncoderConfig, seed: int = 0) -> Encoder:
    """An encoder whose every weight (LayerNorms included) is random, in eval mode."""
    torch.manual_seed(seed)
    model = Encoder(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.2 if "norm" in name else 0.05))
    return model.eval()


def fairseq_names(state: dict) -> dict:
    return {FAIRSEQ.get(k, k): v.clone() for k, v in state.items()}


def model_cfg(cfg: EncoderConfig, **image) -> dict:
    """cfg['model'] of an official data2vec_multi pretraining checkpoint (the fields used)."""
    return {
        "_name": "data2vec_multi", "embed_dim": cfg.embed_dim, "depth": cfg.depth, "num_heads": cfg.num_heads,
        "mlp_ratio": cfg.mlp_ratio, "norm_eps": cfg.norm_eps, "layer_norm_first": False, "norm_affine": True,
        "ema_encoder_only": False,
        "modalities": {"image": {
            "patch_size": cfg.patch_size, "embed_dim": cfg.embed_dim, "num_extra_tokens": 1, "prenet_depth": 0,
            "fixed_positions": True, "use_alibi_encoder": False, "ema_local_encoder": True,
            # AudioSet's 1024 frames, or what a small test table covers (as the official files'
            # windows are within their tables)
            "target_length": min(1024, 16 * cfg.max_length), "max_length": cfg.max_length, **image,
        }},
    }


def fairseq_pretrain(student: Encoder, teacher: Encoder | None = None, **image) -> dict:
    """An official pretraining checkpoint: student + CNN decoder in ``model``, the EMA teacher as
    the nested dict ``model['_ema']`` (no decoder), plus fairseq's bookkeeping entries."""
    state = fairseq_names(student.state_dict())
    d = student.cfg.embed_dim
    state["modality_encoders.IMAGE.decoder.blocks.0.0.weight"] = torch.randn(d, d // 16, 3, 3)
    state["modality_encoders.IMAGE.decoder.proj.weight"] = torch.randn(d, d)
    if teacher is not None:
        state["_ema"] = fairseq_names(teacher.state_dict())
    return {
        "args": None, "cfg": {"model": model_cfg(student.cfg, **image), "task": {"_name": "mae_image_pretraining"}},
        "model": state, "criterion": None,
        "optimizer_history": [{"criterion_name": "ModelCriterion", "optimizer_name": "FP16Optimizer",
                               "lr_scheduler_state": {}, "num_updates": 0}],
        "task_state": {}, "extra_state": {"previous_training_time": 1.5}, "last_optimizer_state": {},
    }


def fairseq_finetuned(model: Encoder, **model_fields) -> dict:
    """An official fine-tuned checkpoint: ``model.``-prefixed encoder, fc_norm, head."""
    state = {}
    for k, v in model.state_dict().items():
        state[k if k.split(".")[0] in ("fc_norm", "head") else "model." + FAIRSEQ.get(k, k)] = v.clone()
    cfg = {"_name": "mae_image_classification", "num_classes": model.cfg.num_classes,
           "pretrained_model_args": {"model": model_cfg(model.cfg)}, **model_fields}
    return {"args": None, "cfg": {"model": cfg}, "model": state}


def hf_folder(model: Encoder, folder: Path, **config) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    state = {HF.get(k, "model." + k): v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, folder / "model.safetensors")
    cfg = model.cfg
    (folder / "config.json").write_text(json.dumps({
        "model_type": "eat", "model_variant": "finetune" if cfg.num_classes else "pretrain",
        "embed_dim": cfg.embed_dim, "depth": cfg.depth, "num_heads": cfg.num_heads, "mlp_ratio": cfg.mlp_ratio,
        "patch_size": 16, "stride": 16, "in_chans": 1, "mel_bins": 128, "max_length": cfg.max_length,
        "num_classes": cfg.num_classes or 527, "qkv_bias": True, "layer_norm_first": False, "norm_eps": 1e-6,
        "norm_affine": True, "fixed_positions": True, "img_size": [1024, 128], **config,
    }))
    return folder


def outputs(model: Encoder, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).x


def assert_same_encoder(loaded: Encoder, source: Encoder) -> None:
    ours, theirs = loaded.state_dict(), source.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k].float()), k
    x = torch.randn(2, 1, FRAMES, 128)
    assert torch.allclose(outputs(loaded, x), outputs(source, x), atol=1e-6)


# ---- model sizes and architecture inference ---------------------------------------------------
SIZES = {
    "dim192-6heads-depth2": EncoderConfig(embed_dim=192, depth=2, num_heads=6),  # heads != dim / 64
    "dim384-mlp2.5-512frames": EncoderConfig(embed_dim=384, depth=1, num_heads=6, mlp_ratio=2.5, max_length=32),
    "dim88-mlp120": EncoderConfig(embed_dim=88, depth=3, num_heads=2, mlp_ratio=120 / 88, max_length=5),
}


@pytest.mark.parametrize("name", SIZES)
def test_official_pretraining_files_of_any_size(tmp_path, name):
    """The architecture (width, depth, heads from cfg, MLP from fc1, position rows) comes from
    the file, and the loaded student equals the one saved."""
    cfg = SIZES[name]
    student = random_encoder(cfg, seed=1)
    torch.save(fairseq_pretrain(student, random_encoder(cfg, seed=2)), tmp_path / "ckpt.pt")
    loaded = load_encoder(tmp_path / "ckpt.pt")
    assert loaded.cfg == cfg
    assert_same_encoder(loaded, student)


def test_mlp_width_read_from_fc1_is_exact():
    """int(88 * (120 / 88)) is 119: a ratio read back from fc1's rows must give them back."""
    assert EncoderConfig(embed_dim=88, num_heads=2, mlp_ratio=120 / 88).mlp_dim == 120
    assert Encoder(EncoderConfig(embed_dim=88, depth=1, num_heads=2, mlp_ratio=120 / 88)).blocks[0].mlp.fc1.out_features == 120


def test_mlp_width_of_a_stated_ratio_truncates_as_the_official_blocks(tmp_path):
    """The official blocks (as timm's) make int(dim * mlp_ratio) hidden units: 384 * 2.7 =
    1036.8 gives 1036, and a file stating 2.7 with 1036 rows was refused (1037 expected)."""
    assert EncoderConfig(embed_dim=384, num_heads=6, mlp_ratio=2.7).mlp_dim == 1036
    assert EncoderConfig(embed_dim=64, num_heads=2, mlp_ratio=2.7).mlp_dim == 172
    cfg = EncoderConfig(embed_dim=64, depth=1, num_heads=2, mlp_ratio=2.7, max_length=8)
    student = random_encoder(cfg)
    torch.save(fairseq_pretrain(student), tmp_path / "ckpt.pt")
    loaded = load_encoder(tmp_path / "ckpt.pt")
    assert loaded.blocks[0].mlp.fc1.out_features == 172 and loaded.cfg.mlp_ratio == 2.7
    assert_same_encoder(loaded, student)


@pytest.mark.parametrize("fmt", ["fairseq", "hf"])
def test_fine_tuned_heads_of_any_size(tmp_path, fmt):
    cfg = EncoderConfig(embed_dim=96, depth=2, num_heads=4, num_classes=7)
    source = random_encoder(cfg, seed=3)
    if fmt == "fairseq":
        torch.save(fairseq_finetuned(source), tmp_path / "ft.pt")
        loaded = load_encoder(tmp_path / "ft.pt")
        assert loaded.cfg == cfg
    else:
        loaded = load_encoder(hf_folder(source, tmp_path / "hf"))
        assert loaded.cfg == cfg.replace(head_norm_eps=1e-5)  # HF fc_norm: nn.LayerNorm default eps
    assert_same_encoder(loaded, source)


def test_an_encoder_without_a_head_reads_the_same_from_every_format(tmp_path):
    """Hugging Face's head eps (1e-5) belongs to its head: a headless folder read with it was
    another encoder to extract's resume than the same weights from the official file."""
    from sslam.checkpoint import encoder_fingerprint

    source = random_encoder(VARIANTS["tiny"], seed=4)
    torch.save(fairseq_pretrain(source), tmp_path / "pre.pt")
    official, hub = load_encoder(tmp_path / "pre.pt"), load_encoder(hf_folder(source, tmp_path / "hf"))
    assert hub.cfg == official.cfg and encoder_fingerprint(hub) == encoder_fingerprint(official)


def test_qkv_without_bias(tmp_path):
    cfg = EncoderConfig(embed_dim=64, depth=2, num_heads=2, qkv_bias=False)
    source = random_encoder(cfg)
    assert source.blocks[0].attn.qkv.bias is None
    torch.save(source.state_dict(), tmp_path / "state.pt")  # a bare state dict: no config at all
    with pytest.warns(UserWarning, match="assuming 2"):
        loaded = load_encoder(tmp_path / "state.pt")
    assert loaded.cfg == cfg and loaded.preprocessing["target_length"] == 1024
    assert_same_encoder(loaded, source)
    # An official (data2vec_multi) file always has the bias: one without it is damaged, not a
    # bias-free architecture.
    ft = fairseq_finetuned(random_encoder(cfg.replace(qkv_bias=True, num_classes=2)))
    ft["model"] = {k: v for k, v in ft["model"].items() if not k.endswith("qkv.bias")}
    torch.save(ft, tmp_path / "ft.pt")
    with pytest.raises(CheckpointError, match="qkv_bias: config True, weights False"):
        load_encoder(tmp_path / "ft.pt")


def test_heads_are_guessed_loudly_when_the_file_does_not_record_them(tmp_path):
    """Tiny (dim 64) has 2 heads; head dim 64 would give 1 and change every output."""
    ckpt = load_golden("tiny_ckpt.pt")
    ckpt["cfg"] = None
    torch.save(ckpt, tmp_path / "nocfg.pt")
    with pytest.warns(UserWarning, match="does not record num_heads.*assuming 2"):
        model = load_encoder(tmp_path / "nocfg.pt")
    x = load_golden("fbank.pt")["items"]["noise_2p7s_16k"]["model_input"]
    expected = load_golden("tiny_out.pt")["items"]["noise_2p7s_16k"]["all"]
    assert model.cfg.num_heads == 2
    assert torch.allclose(outputs(model, x)[0], expected, atol=1e-4)


def test_create_model_with_a_checkpoint_keeps_what_the_file_states_beyond_the_shapes(tmp_path):
    from sslam.model import create_model

    tiny = VARIANTS["tiny"]  # the golden file states num_heads=2 and norm_eps=1e-6
    assert torch.equal(create_model(tiny, checkpoint=TINY).state_dict()["pos_embed"],
                       load_encoder(TINY).state_dict()["pos_embed"])
    for change, pattern in [({"num_heads": 4}, r"num_heads: file 2, model 4"),
                            ({"norm_eps": 1e-5}, r"norm_eps: file 1e-06, model 1e-05")]:
        with pytest.raises(CheckpointError, match=rf"tiny_ckpt\.pt: the model differs .*{pattern}"):
            create_model(tiny.replace(**change), checkpoint=TINY)
    # A file that does not state them (a bare state dict) takes the model's.
    torch.save(load_encoder(TINY).state_dict(), tmp_path / "bare.pt")
    model = create_model(tiny.replace(num_heads=4, norm_eps=1e-5), checkpoint=tmp_path / "bare.pt")
    assert model.cfg.num_heads == 4 and model.cfg.norm_eps == 1e-5


def test_declared_architecture_must_agree_with_the_weights(tmp_path):
    tiny = load_golden("tiny_ckpt.pt")
    cases = {"depth": 3, "embed_dim": 96, "mlp_ratio": 2.0}
    for key, value in cases.items():
        ckpt = dict(tiny, cfg={"model": {**tiny["cfg"]["model"], key: value}})
        torch.save(ckpt, tmp_path / f"{key}.pt")
        with pytest.raises(CheckpointError, match=rf"{key}\.pt: the architecture does not match.*"):
            load_encoder(tmp_path / f"{key}.pt")
    ckpt = dict(tiny, cfg={"model": {**tiny["cfg"]["model"], "num_heads": 3}})
    torch.save(ckpt, tmp_path / "heads.pt")
    with pytest.raises(CheckpointError, match=r"heads\.pt: .*not divisible by num_heads=3"):
        load_encoder(tmp_path / "heads.pt")
    # Hugging Face: config.json says 12 blocks, the weights hold 2.
    folder = hf_folder(random_encoder(VARIANTS["tiny"]), tmp_path / "hf", depth=12)
    with pytest.raises(CheckpointError, match="depth: config 12, weights 2"):
        load_encoder(folder)


def test_absurd_config_of_an_sslam_folder_fails_before_building(tmp_path):
    convert(TINY, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    state = {k: v for k, v in load_encoder(TINY).state_dict().items()}
    for changes, pattern in [({"depth": 40}, "depth: config 40, weights 2"),
                             ({"depth": -2}, "depth=-2 must be positive"),
                             ({"num_heads": 3}, "not divisible"),
                             ({"depth": "12"}, "depth='12' must be an integer"),
                             ({"max_length": 40}, "pos_rows"),
                             ({"max_length": 10**9}, "over the 65536 supported")]:
        bad = {**meta, "encoder": {**meta["encoder"], **changes}}
        save_file(state, tmp_path / "m" / "model.safetensors", metadata={"format": "sslam", "sslam": json.dumps(bad)})
        (tmp_path / "m" / "config.json").write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=pattern):
            load_encoder(tmp_path / "m")


def test_a_config_of_any_depth_over_no_blocks_is_refused_at_once(tmp_path):
    """Without block weights nothing showed the depth, and the encoder of the declared depth
    was built (on the meta device) before the keys were compared: 2e9 blocks never returned,
    and 10000 gave a message of 3 MB listing each missing key."""
    state = {k: v for k, v in load_encoder(TINY).state_dict().items() if not k.startswith("blocks.")}
    folder = tmp_path / "m"
    convert(TINY, folder)
    meta = json.loads((folder / "config.json").read_text())
    for depth in (3, 2_000_000_000):
        bad = {**meta, "encoder": {**meta["encoder"], "depth": depth}}
        save_file(state, folder / "model.safetensors", metadata={"format": "sslam", "sslam": json.dumps(bad)})
        (folder / "config.json").write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=f"depth: config {depth}, weights 0"):
            load_encoder(folder)


def test_a_long_list_of_missing_keys_is_cut_short():
    model = Encoder(VARIANTS["tiny"].replace(depth=40))
    with pytest.raises(CheckpointError, match=r"missing keys \(.*\): \[.*\.\.\. and \d+ more\]") as info:
        check_state(model, {}, "empty.pt")
    assert len(str(info.value)) < 3000


def test_a_pickled_config_of_shared_references_is_refused_promptly(tmp_path):
    """A list nested in itself by reference, [a, a] sixty times over, is a few bytes of pickle
    that unfold to 2**60 entries: reading it as plain data never returned."""
    ckpt = load_golden("tiny_ckpt.pt")
    nest = []
    for _ in range(60):
        nest = [nest, nest]
    ckpt["cfg"]["common"] = {"x": nest}
    torch.save(ckpt, tmp_path / "nest.pt")
    with pytest.raises(CheckpointError, match=r"nest\.pt: the pickled config unfolds to more than"):
        load_encoder(tmp_path / "nest.pt")


@pytest.mark.parametrize("zip_format", [True, False])
def test_files_pickled_with_protocol_3_load_without_torch_s_warning(tmp_path, zip_format):
    """torch.load warns of protocols other than 2 in case its own unpickler lacks one of their
    instructions; where it read the file, the warning says nothing to the user."""
    torch.save(load_golden("tiny_ckpt.pt"), tmp_path / "p3.pt", pickle_protocol=3,
               _use_new_zipfile_serialization=zip_format)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_encoder(tmp_path / "p3.pt")


def test_float64_weights_beyond_float32_are_refused_not_made_infinite(tmp_path):
    ckpt = load_golden("tiny_ckpt.pt")
    weight = ckpt["model"]["blocks.0.mlp.fc1.weight"].double()
    weight[0, 0] = 1e300  # finite in the file, inf as float32
    ckpt["model"]["blocks.0.mlp.fc1.weight"] = weight
    torch.save(ckpt, tmp_path / "f64.pt")
    with pytest.raises(CheckpointError, match=r"f64\.pt: blocks\.0\.mlp\.fc1\.weight .*not finite as torch\.float32"):
        load_encoder(tmp_path / "f64.pt")
    with pytest.raises(CheckpointError, match="not finite as torch.float32"):
        convert(tmp_path / "f64.pt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_position_rows_come_from_the_file(tmp_path):
    """A fairseq file without its (fixed, recomputable) position table: max_length from its
    config, not the ViT-B default; with a table, the table's rows."""
    tiny = load_golden("tiny_ckpt.pt")
    image = {**tiny["cfg"]["model"]["modalities"]["image"], "max_length": 32, "target_length": 512}
    cfg = {"model": {**tiny["cfg"]["model"], "modalities": {"image": image}}}
    model = {k: v for k, v in tiny["model"].items() if "fixed_positional_encoder" not in k}
    torch.save(dict(tiny, cfg=cfg, model=model), tmp_path / "nopos.pt")
    assert load_encoder(tmp_path / "nopos.pt").cfg.max_length == 32
    assert "nopos.pt" in describe(tmp_path / "nopos.pt")  # checked on the meta device alike
    model["modality_encoders.IMAGE.fixed_positional_encoder.positions"] = torch.zeros(1, 40 * 8, 64)
    torch.save(dict(tiny, cfg=cfg, model=model), tmp_path / "pos40.pt")
    assert load_encoder(tmp_path / "pos40.pt").cfg.max_length == 40


@pytest.mark.filterwarnings("ignore:.*does not record num_heads")
def test_block_numbering_gap_is_reported(tmp_path):
    state = {k: v for k, v in random_encoder(VARIANTS["tiny"].replace(depth=3)).state_dict().items()
             if not k.startswith("blocks.1.")}
    torch.save(state, tmp_path / "gap.pt")
    with pytest.raises(CheckpointError, match=r"missing block\(s\) \[1\]"):
        read_checkpoint(tmp_path / "gap.pt")


def _without_pre_norm_weight(fmt: str, folder: Path) -> tuple[Path, str]:
    """A file of format ``fmt`` lacking the pre-LN weight, and the name that file gives it."""
    model = random_encoder(EncoderConfig(embed_dim=32, depth=2, num_heads=2, max_length=64, num_classes=3))
    if fmt == "hf":
        hf_folder(model, folder)
        state = load_file(folder / "model.safetensors")
        del state[HF["pre_norm.weight"]]
        save_file(state, folder / "model.safetensors")
        return folder, HF["pre_norm.weight"]
    if fmt == "fairseq-finetune":
        ckpt, name = fairseq_finetuned(model), "model." + FAIRSEQ["pre_norm.weight"]
        del ckpt["model"][name]
    elif fmt == "fairseq-pretrain":
        ckpt, name = fairseq_pretrain(random_encoder(model.cfg.replace(num_classes=0))), FAIRSEQ["pre_norm.weight"]
        del ckpt["model"][name]
    else:  # a bare state dict under our names
        ckpt, name = model.state_dict(), "pre_norm.weight"
        del ckpt[name]
    torch.save(ckpt, folder / "ckpt.pt")
    return folder / "ckpt.pt", name


@pytest.mark.parametrize("fmt", ["fairseq-pretrain", "fairseq-finetune", "hf", "ours"])
@pytest.mark.filterwarnings("ignore:.*does not record num_heads")  # a bare state dict: heads guessed
def test_missing_keys_are_named_as_the_file_names_them(tmp_path, fmt):
    """Regression: a missing official key was reported under its sslam name (pre_norm.weight),
    which the file does not contain (modality_encoders.IMAGE.context_encoder.norm.weight)."""
    path, name = _without_pre_norm_weight(fmt, tmp_path)
    shown = name if fmt == "ours" else f"{name} (sslam: pre_norm.weight)"
    with pytest.raises(CheckpointError, match=re.escape(f"missing keys (1): [{shown!r}]")):
        load_encoder(path)
    with pytest.raises(CheckpointError, match=re.escape(f"missing keys (1): [{shown!r}]")):
        describe(path)


def test_encoder_config_rejects_bad_values():
    good = dict(embed_dim=64, depth=1, num_heads=2)
    for bad in ({"num_classes": -3}, {"drop_path_rate": 2.0}, {"norm_eps": -1.0}, {"mlp_ratio": 0.001},
                {"depth": 2.5}, {"qkv_bias": "yes"}, {"embed_dim": 0}, {"max_length": 0},
                {"mlp_ratio": float("nan")}, {"mlp_ratio": 1e308}, {"embed_dim": 4 * 10**400},
                {"max_length": 2**70}):
        with pytest.raises(ValueError):
            EncoderConfig(**{**good, **bad})
    with pytest.raises(ValueError, match="expected a dict"):
        EncoderConfig.from_dict([64, 2, 2])
    assert EncoderConfig(**good, mlp_ratio=4) == EncoderConfig(**good, mlp_ratio=4.0)


# ---- teacher weights ------------------------------------------------------------------------
def test_teacher_is_the_ema_copy_and_differs_from_the_student(tmp_path):
    cfg = VARIANTS["tiny"]
    student, teacher = random_encoder(cfg, seed=4), random_encoder(cfg, seed=5)
    torch.save(fairseq_pretrain(student, teacher), tmp_path / "pt.pt")
    assert_same_encoder(load_encoder(tmp_path / "pt.pt", weights="teacher"), teacher)
    assert_same_encoder(load_encoder(tmp_path / "pt.pt"), student)
    x = torch.randn(1, 1, FRAMES, 128)
    assert not torch.allclose(outputs(student, x), outputs(teacher, x), atol=1e-3)
    assert "teacher (the EMA copy; the file also holds the student)" in describe(tmp_path / "pt.pt", "teacher")


def test_teacher_of_unknown_names_lists_them(tmp_path):
    """A teacher under a prefix this loader does not know was refused as "cannot infer the
    architecture", without the names that it did not recognise."""
    cfg = VARIANTS["tiny"]
    ckpt = fairseq_pretrain(random_encoder(cfg, seed=4), random_encoder(cfg, seed=5))
    ckpt["model"]["_ema"] = {"module." + k: v for k, v in ckpt["model"]["_ema"].items()}
    torch.save(ckpt, tmp_path / "pt.pt")
    with pytest.raises(CheckpointError, match=r"pt.pt \(its EMA teacher, model\['_ema'\]\): cannot infer the "
                                              r"architecture: no tensor gives .*; its tensors are named "
                                              r"\['module\.blocks\.0\..*, \.\.\. and \d+ more\]"):
        load_encoder(tmp_path / "pt.pt", weights="teacher")


def test_teacher_of_ema_encoder_only_checkpoints(tmp_path):
    """data2vec's ``ema_encoder_only``: ``_ema`` is the block list (``0.norm1.weight``, ...); the
    official teacher takes the patch embedding, CLS, positions and pre-LN from the student."""
    cfg = VARIANTS["tiny"]
    student, ema = random_encoder(cfg, seed=6), random_encoder(cfg, seed=7)
    ckpt = fairseq_pretrain(student)
    ckpt["model"]["_ema"] = {k[len("blocks."):]: v for k, v in ema.state_dict().items() if k.startswith("blocks.")}
    ckpt["cfg"]["model"]["ema_encoder_only"] = True
    torch.save(ckpt, tmp_path / "pt.pt")
    teacher = load_encoder(tmp_path / "pt.pt", weights="teacher")
    expected = {**student.state_dict(), **{k: v for k, v in ema.state_dict().items() if k.startswith("blocks.")}}
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in expected.items())
    # Damaged weights are named as the file names them: a block as in the list
    # (``1.mlp.fc2.weight``), the parts taken from the student as the student's are.
    ckpt["model"]["_ema"]["1.mlp.fc2.weight"] = torch.randn(3, 3)
    ckpt["model"]["modality_encoders.IMAGE.context_encoder.norm.weight"] = torch.randn(3)
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as error:
        load_encoder(tmp_path / "bad.pt", weights="teacher")
    assert "['1.mlp.fc2.weight (sslam: blocks.1.mlp.fc2.weight): file" in str(error.value)
    assert "'modality_encoders.IMAGE.context_encoder.norm.weight (sslam: pre_norm.weight): file" in str(error.value)


def test_teacher_without_its_own_patch_embedding(tmp_path):
    """``modalities.image.ema_local_encoder=False``: no local_encoder in ``_ema``; the official
    teacher runs on the student's patch embedding."""
    cfg = VARIANTS["tiny"]
    student, ema = random_encoder(cfg, seed=8), random_encoder(cfg, seed=9)
    ckpt = fairseq_pretrain(student, ema, ema_local_encoder=False)
    for k in ("weight", "bias"):
        del ckpt["model"]["_ema"][f"modality_encoders.IMAGE.local_encoder.proj.{k}"]
    torch.save(ckpt, tmp_path / "pt.pt")
    teacher = load_encoder(tmp_path / "pt.pt", weights="teacher")
    assert torch.equal(teacher.patch_embed.weight, student.patch_embed.weight)
    assert torch.equal(teacher.blocks[1].mlp.fc2.weight, ema.blocks[1].mlp.fc2.weight)
    assert torch.equal(teacher.cls_token, ema.cls_token)


def test_teacher_without_its_own_patch_embedding_ignores_one_left_in_the_file(tmp_path):
    """With ``ema_local_encoder=False`` the official teacher runs on the student's patch
    embedding whatever ``_ema`` holds: a run started from a file whose teacher had one keeps it
    in ``_ema``, stale. It was taken for the teacher's (up to 0.44 off in its outputs)."""
    cfg = VARIANTS["tiny"]
    student, ema = random_encoder(cfg, seed=8), random_encoder(cfg, seed=9)
    torch.save(fairseq_pretrain(student, ema, ema_local_encoder=False), tmp_path / "pt.pt")
    teacher = load_encoder(tmp_path / "pt.pt", weights="teacher")
    assert torch.equal(teacher.patch_embed.weight, student.patch_embed.weight)
    assert torch.equal(teacher.patch_embed.bias, student.patch_embed.bias)
    assert torch.equal(teacher.blocks[1].mlp.fc2.weight, ema.blocks[1].mlp.fc2.weight)


@pytest.mark.parametrize("declared", [True, False])
def test_fairseq_patches_other_than_16_are_refused(tmp_path, declared):
    """The official patch embedding strides 16 frames and bins whatever its kernel
    (``modalities.image.patch_size``): an 8 x 8 kernel makes overlapping 16-apart patches there,
    non-overlapping 8-apart ones here (2049 tokens instead of 513). No release uses one; such a
    file is refused rather than computed otherwise, declared in the config or only in the
    weights, pretrained or fine-tuned."""
    cfg = EncoderConfig(embed_dim=32, depth=1, num_heads=2, patch_size=8, max_length=128)
    model = random_encoder(cfg)
    pretrain = fairseq_pretrain(model, model)
    finetuned = fairseq_finetuned(random_encoder(cfg.replace(num_classes=3)))
    if not declared:
        del pretrain["cfg"]["model"]["modalities"]["image"]["patch_size"]
        del finetuned["cfg"]["model"]["pretrained_model_args"]["model"]["modalities"]["image"]["patch_size"]
    for name, ckpt in (("pt.pt", pretrain), ("ft.pt", finetuned)):
        torch.save(ckpt, tmp_path / name)
        for weights in ("student", "teacher") if name == "pt.pt" else ("student",):
            with pytest.raises(CheckpointError, match=rf"{name}.*patch_size=8.*strides 16"):
                load_encoder(tmp_path / name, weights=weights)


def test_a_damaged_teacher_is_named_as_the_teacher(tmp_path):
    """A file whose student is sound but whose ``_ema`` teacher is not: the errors named only the
    file (and a key the student has intact), not the teacher."""
    cfg = VARIANTS["tiny"]
    ckpt = fairseq_pretrain(random_encoder(cfg, seed=4), random_encoder(cfg, seed=5))
    ema = ckpt["model"]["_ema"]
    short = {k: v for k, v in ema.items() if not k.startswith("blocks.1.")}
    bad_shape = {**ema, "blocks.0.norm1.weight": torch.randn(7)}
    for name, teacher in [("short.pt", short), ("bad_shape.pt", bad_shape)]:
        torch.save({**ckpt, "model": {**ckpt["model"], "_ema": teacher}}, tmp_path / name)
        load_encoder(tmp_path / name)  # the student loads
        with pytest.raises(CheckpointError, match=rf"{name} \(its EMA teacher, model\['_ema'\]\): "):
            load_encoder(tmp_path / name, weights="teacher")
        with pytest.raises(CheckpointError, match=r"\(its EMA teacher, model\['_ema'\]\)"):
            describe(tmp_path / name, "teacher")


def test_files_without_a_teacher_say_so(tmp_path):
    cfg = VARIANTS["tiny"]
    student = random_encoder(cfg)
    ckpt = fairseq_pretrain(student)
    ckpt["model"]["_ema"] = {}  # an EMA that was never filled
    torch.save(ckpt, tmp_path / "empty_ema.pt")
    torch.save(fairseq_finetuned(random_encoder(cfg.replace(num_classes=3))), tmp_path / "ft.pt")
    convert(TINY, tmp_path / "ours")
    cases = {"empty_ema.pt": "no \\(non-empty\\) '_ema' teacher", "ft.pt": "no EMA teacher",
             "hf": "no EMA teacher", "ours": "weights='teacher' is not available"}
    hf_folder(student, tmp_path / "hf")
    for name, pattern in cases.items():
        with pytest.raises(CheckpointError, match=pattern):
            load_encoder(tmp_path / name, weights="teacher")
    assert read_checkpoint(tmp_path / "empty_ema.pt").teacher is None


# ---- hostile and damaged files --------------------------------------------------------------
def _payloads(marker: Path) -> dict:
    command = f"touch {marker}"

    class System:
        def __reduce__(self):
            return (os.system, (command,))

    class Eval:
        def __reduce__(self):
            return (eval, (f"__import__('os').system({command!r})",))

    class Getattr:
        def __reduce__(self):
            return (getattr, (os, "system"))

    class Popen:
        def __reduce__(self):
            import subprocess

            return (subprocess.Popen, (["touch", str(marker)],))

    return {"system": (System(), r"(posix|nt|os)\.system"), "eval": (Eval(), r"builtins\.eval"),
            "getattr": (Getattr(), r"builtins\.getattr"), "popen": (Popen(), r"subprocess\.Popen|\.Popen")}


class _PickleModuleByName(pickle.Pickler):
    """Pickles the ``os`` module by reference so a getattr(os, 'system') payload can be built."""

    def reducer_override(self, obj):
        if obj is os:
            return (__import__, ("os",))
        return NotImplemented


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_hostile_pickles_are_refused_by_name_and_run_nothing(tmp_path, zip_format):
    marker = tmp_path / "pwned"
    for name, (payload, offender) in _payloads(marker).items():
        ckpt = {"model": {"blocks.0.norm1.weight": torch.ones(3)}, "extra_state": {"deep": [{"x": payload}]}}
        path = tmp_path / f"{name}.pt"
        if name == "getattr":  # `os` itself cannot be pickled by torch.save: write the pickle by hand
            buf = io.BytesIO()
            _PickleModuleByName(buf, protocol=2).dump({"cfg": payload})
            torch.save({"x": 1}, path, _use_new_zipfile_serialization=zip_format)
            _replace_pickle(path, buf.getvalue(), zip_format)
        else:
            torch.save(ckpt, path, _use_new_zipfile_serialization=zip_format)
        with pytest.raises(CheckpointError, match=rf"{name}\.pt: refusing to load: .*({offender})"):
            load_encoder(path)
        assert not marker.exists(), name


def _replace_pickle(path: Path, data: bytes, zip_format: bool) -> None:
    """Put ``data`` in place of the object pickle of a torch.save file."""
    if zip_format:
        with zipfile.ZipFile(path) as z:
            entries = {n: z.read(n) for n in z.namelist()}
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
            for n, content in entries.items():
                z.writestr(n, data if n.endswith("/data.pkl") else content)
    else:  # legacy: magic, protocol, sys info, object, storage keys -- keep the first three
        raw = path.read_bytes()
        stream = io.BytesIO(raw)
        for _ in range(3):
            pickle.load(stream)
        path.write_bytes(raw[: stream.tell()] + data + pickle.dumps([], protocol=2))


def test_hostile_persistent_id_in_a_zip_checkpoint(tmp_path):
    """The payload hides inside the persistent id a tensor storage is loaded through."""
    marker = tmp_path / "pwned"
    payload, offender = _payloads(marker)["system"]

    class Storage:
        pass

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", payload, "0", "cpu", 4) if isinstance(obj, Storage) else None

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump({"model": {"blocks.0.norm1.weight": Storage()}})
    path = tmp_path / "pid.pt"
    torch.save({"model": {"blocks.0.norm1.weight": torch.ones(4)}}, path)
    _replace_pickle(path, buf.getvalue(), zip_format=True)
    with pytest.raises(CheckpointError, match=rf"pid\.pt: refusing to load: .*{offender}"):
        safe_torch_load(path)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"\x80\x02abc", b"hello world" * 10, b"PK\x03\x04" + b"\x00" * 60,
                                     os.urandom(1000)], ids=["empty", "short-pickle", "text", "bad-zip", "random"])
def test_damaged_files_raise_checkpoint_errors(tmp_path, content):
    path = tmp_path / "damaged.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="damaged.pt"):
        load_encoder(path)
    with pytest.raises(CheckpointError, match="damaged.pt"):
        safe_torch_load(path)


def test_truncated_legacy_file_and_folders(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save(load_golden("tiny_ckpt.pt"), path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="legacy.pt"):
        load_encoder(path)
    with pytest.raises(CheckpointError, match="is a folder"):
        safe_torch_load(tmp_path)
    with pytest.raises(CheckpointError, match=r"folder without model.safetensors, pytorch_model.bin or a training "
                                              r"checkpoint \(checkpoint_<step>.pt, or fairseq's checkpoint_last.pt or checkpoint_best.pt\)"):
        load_encoder(tmp_path)


def test_a_fairseq_save_dir_loads_as_its_last_checkpoint(tmp_path):
    """Official releases and fairseq runs keep ``checkpoint_last.pt`` beside ``checkpoint_best.pt``
    and epoch files: the folder names its last one, as a run folder of ours names its newest,
    or its best one when that is all it holds."""
    ckpt = load_golden("tiny_ckpt.pt")
    torch.save(ckpt, tmp_path / "checkpoint_last.pt")
    best = {**ckpt, "model": {k: v + 1 if torch.is_tensor(v) and v.is_floating_point() else v
                              for k, v in ckpt["model"].items()}}
    torch.save(best, tmp_path / "checkpoint_best.pt")
    torch.save(best, tmp_path / "checkpoint3.pt")
    assert_same_encoder(load_encoder(tmp_path), load_encoder(TINY))
    assert resolve_init(str(tmp_path)) == str((tmp_path / "checkpoint_last.pt").resolve())  # --init
    # OWNER/NAME, as from_pretrained takes a Hub name elsewhere: how to name one here is said.
    with pytest.raises(CheckpointError, match=r"ta012/SSLAM_pretrain: no such file or folder \(a Hugging Face "
                                              r"model\? name it hf-hub:ta012/SSLAM_pretrain\)"):
        Encoder.from_pretrained("ta012/SSLAM_pretrain")
    # The fine-tuned releases ship checkpoint_best.pt alone.
    (tmp_path / "checkpoint_last.pt").unlink()
    assert_same_encoder(load_encoder(tmp_path), load_encoder(tmp_path / "checkpoint_best.pt"))
    (tmp_path / "odd" / "checkpoint_last.pt").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"odd/checkpoint_last\.pt: is a folder, not a checkpoint"):
        load_encoder(tmp_path / "odd")


def test_legacy_format_fairseq_checkpoint_with_pickled_extras(tmp_path):
    """torch.save(..., _use_new_zipfile_serialization=False) of an official file with an
    argparse.Namespace and numpy values: inert stand-ins, as for zip files."""
    ckpt = load_golden("tiny_ckpt.pt")
    ckpt["args"] = argparse.Namespace(arch="data2vec_multi", lr=[5e-5])
    ckpt["extra_state"] = {"np": np.float64(2.5), "array": np.arange(6, dtype=np.float32).reshape(2, 3)}
    torch.save(ckpt, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    raw = safe_torch_load(tmp_path / "legacy.pt")
    assert type(raw["args"]).__name__ == "Namespace"
    model = load_encoder(tmp_path / "legacy.pt")
    assert_same_encoder(model, load_encoder(TINY))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pickled_omegaconf_config_is_read(tmp_path, monkeypatch, zip_format):
    """A cfg pickled as an omegaconf DictConfig (content in ``_content``, values in nodes'
    ``_val``, children pointing back at their parent, metadata naming the plain types dict, list,
    int and typing.Any) still gives heads and clip length."""
    dictconfig, nodes = types.ModuleType("omegaconf.dictconfig"), types.ModuleType("omegaconf.nodes")
    for name, module in (("omegaconf", types.ModuleType("omegaconf")), ("omegaconf.dictconfig", dictconfig),
                         ("omegaconf.nodes", nodes)):
        monkeypatch.setitem(sys.modules, name, module)

    class DictConfig:
        def __init__(self, content, parent=None):
            self._metadata, self._parent = {"key": None, "object_type": dict, "key_type": typing.Any}, parent
            self._content = {k: v if isinstance(v, DictConfig) else AnyNode(v, self) for k, v in content.items()}
            for v in self._content.values():
                v._parent = self

    class AnyNode:
        def __init__(self, value, parent):
            self._val, self._parent, self._metadata = value, parent, {"object_type": list, "element_type": int}

    for cls, module in ((DictConfig, dictconfig), (AnyNode, nodes)):
        cls.__module__, cls.__qualname__ = module.__name__, cls.__name__
        setattr(module, cls.__name__, cls)
    ckpt = load_golden("tiny_ckpt.pt")
    image = DictConfig({"target_length": 512, "patch_size": 16})
    model = DictConfig({"_name": "data2vec_multi", "embed_dim": 64, "depth": 2, "num_heads": 2,
                        "modalities": DictConfig({"image": image})})
    ckpt["cfg"] = DictConfig({"model": model})
    torch.save(ckpt, tmp_path / "omega.pt", _use_new_zipfile_serialization=zip_format)
    monkeypatch.delitem(sys.modules, "omegaconf.dictconfig")  # loading must not import it
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # heads come from the config: no guess
        found = read_checkpoint(tmp_path / "omega.pt")
    assert found.config == VARIANTS["tiny"]
    assert found.preprocessing["target_length"] == 512


@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")  # the sparse case below
def test_safetensors_dtypes_and_shapes(tmp_path):
    source = random_encoder(VARIANTS["tiny"])
    hf_folder(source, tmp_path / "hf")
    state = {HF.get(k, "model." + k): v for k, v in source.state_dict().items()}
    for dtype in (torch.float16, torch.bfloat16):
        save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, tmp_path / "hf" / "model.safetensors")
        loaded = load_encoder(tmp_path / "hf")
        assert loaded.blocks[0].attn.qkv.weight.dtype == torch.float32  # cast on load
        # Every weight is the file's, exactly (an output tolerance wide enough for the rounding
        # also passed a model with a weight left unloaded).
        rounded = {k: v.to(dtype).float() for k, v in source.state_dict().items()}
        assert loaded.state_dict().keys() == rounded.keys()
        for key, value in loaded.state_dict().items():
            assert torch.equal(value, rounded[key]), key
    bad = dict(state, **{"model.blocks.1.attn.proj.weight": torch.zeros(64, 32)})
    save_file(bad, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.blocks.1.attn.proj.weight \(sslam: blocks.1.attn.proj.weight\): file \(64, 32\) vs model \(64, 64\)"):
        load_encoder(tmp_path / "hf")
    bad = dict(state, **{"model.blocks.1.norm2.bias": torch.zeros(64, dtype=torch.int32)})
    save_file(bad, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.blocks.1.norm2.bias \\(sslam: blocks.1.norm2.bias\\) is not a finite floating-point"):
        load_encoder(tmp_path / "hf")
    # float8, sparse or meta tensors: no finiteness check exists for them, and an error from
    # inside torch would not name the file.
    for odd, kind in ((torch.zeros(64, dtype=torch.float8_e4m3fn), "float8_e4m3fn"),
                      (torch.zeros(64).to_sparse(), "sparse_coo"), (torch.zeros(64, device="meta"), "meta")):
        ckpt = fairseq_finetuned(random_encoder(VARIANTS["tiny"].replace(num_classes=2)))
        ckpt["model"]["model.blocks.1.norm2.bias"] = odd
        torch.save(ckpt, tmp_path / "odd.pt")
        with pytest.raises(CheckpointError, match=rf"odd.pt: model.blocks.1.norm2.bias \(sslam: blocks.1.norm2.bias\) is not a finite .*{kind}"):
            load_encoder(tmp_path / "odd.pt")
    for value in (float("nan"), float("inf")):
        bad = dict(state, **{"model.blocks.0.norm1.weight": torch.full((64,), value)})
        save_file(bad, tmp_path / "hf" / "model.safetensors")
        with pytest.raises(CheckpointError, match=r"model.blocks.0.norm1.weight \(sslam: blocks.0.norm1.weight\) is not a finite"):
            load_encoder(tmp_path / "hf")


@pytest.mark.parametrize("config,pattern", [
    ({"num_heads": 3}, "not divisible by num_heads=3"),
    ({"depth": -1}, "depth=-1 must be positive"),
    ({"num_heads": "two"}, "num_heads='two' must be an integer"),
    ({"layer_norm_first": True}, "layer_norm_first"),
    ({"fixed_positions": False}, "fixed_positions"),
    ({"stride": 10}, "stride=10"),
    ({"img_size": [0, 128]}, "target_length"),
    ({"mel_bins": "128"}, "mel_bins='128' must be an integer"),
    ({"mel_bins": None, "img_size": [1024, "128"]}, "mel_bins='128' must be an integer"),
    ({"stride": [[16], [16]]}, r"stride=\[\[16\], \[16\]\]"),
    ({"patch_size": 8, "stride": 8}, "patch_size: config 8, weights 16"),
    ({"mlp_ratio": 1e308}, "mlp_ratio=1e.308 gives no finite MLP width"),
    ({"embed_dim": 4 * 10**400}, "embed_dim: a 1331-bit integer, over the 2\\*\\*31 - 1 supported"),
])
def test_hugging_face_config_problems(tmp_path, config, pattern):
    """Each is named against config.json (they named model.safetensors)."""
    folder = hf_folder(random_encoder(VARIANTS["tiny"]), tmp_path / "hf", **config)
    with pytest.raises(CheckpointError, match=rf"hf/config\.json: .*{pattern}"):
        load_encoder(folder)


def test_hugging_face_label_names(tmp_path):
    source = random_encoder(VARIANTS["tiny"].replace(num_classes=3))
    folder = hf_folder(source, tmp_path / "ok", id2label={"0": "Speech", "1": "Music", "2": "Dog"})
    assert load_encoder(folder).label_names == ["Speech", "Music", "Dog"]
    for labels in ({"0": "Speech", "2": "Dog", "5": "Cat"}, {"0": "Speech", "1": "Music"}):
        folder = hf_folder(source, tmp_path / "bad", id2label=labels)
        with pytest.warns(UserWarning, match="ignoring id2label"):
            assert load_encoder(folder).label_names is None


def test_fairseq_configs_the_encoder_does_not_compute_are_refused(tmp_path):
    tiny = load_golden("tiny_ckpt.pt")
    model = {k: v for k, v in tiny["model"].items() if "fixed_positional_encoder" not in k}
    image = {**tiny["cfg"]["model"]["modalities"]["image"], "fixed_positions": False}
    ckpt = dict(tiny, model=model, cfg={"model": {**tiny["cfg"]["model"], "modalities": {"image": image}}})
    torch.save(ckpt, tmp_path / "nopos.pt")
    with pytest.raises(CheckpointError, match="nopos.pt: unsupported encoder configuration: fixed_positions=False"):
        load_encoder(tmp_path / "nopos.pt")


def test_malformed_entries_are_named(tmp_path):
    tiny = load_golden("tiny_ckpt.pt")
    pos = "modality_encoders.IMAGE.fixed_positional_encoder.positions"
    for name, value, pattern in [("wide_pos", torch.zeros(1, 6144, 32), r"positions \(sslam: pos_embed\): file \(1, 6144, 32\)"),
                                 ("flat_pos", torch.zeros(6144, 64), r"positions \(sslam: pos_embed\): file \(6144, 64\)"),
                                 ("list_value", [1.0, 2.0], r"non-tensor values.*blocks.0.norm1.weight")]:
        key = pos if "pos" in name else "blocks.0.norm1.weight"
        torch.save(dict(tiny, model={**tiny["model"], key: value}), tmp_path / f"{name}.pt")
        with pytest.raises(CheckpointError, match=rf"(?s){name}\.pt: .*{pattern}"):
            load_encoder(tmp_path / f"{name}.pt")
    source = random_encoder(VARIANTS["tiny"].replace(num_classes=2))
    torch.save(fairseq_finetuned(source), tmp_path / "ft.pt")
    (tmp_path / "labels.csv").write_text("index,mid,display_name\nzero,/m/a,Speech\n1,/m/b\n")
    with pytest.raises(CheckpointError, match="labels.csv:2: index 'zero' is not an integer"):
        convert(tmp_path / "ft.pt", tmp_path / "out", labels=tmp_path / "labels.csv")


def test_fine_tuned_recipe_preprocessing_and_unknown_keys(tmp_path):
    """ESC-50 fine-tuning: 512-frame clips and ESC-50 statistics; unknown keys are errors."""
    source = random_encoder(VARIANTS["tiny"].replace(num_classes=50))
    torch.save(fairseq_finetuned(source, target_length=512, esc50_eval=True), tmp_path / "esc.pt")
    esc50 = {"sample_rate": 16000, "target_length": 512, "norm": "esc50"}
    assert load_encoder(tmp_path / "esc.pt").preprocessing == esc50
    # Also when the weights go into a model built first (it used to keep 1024 frames and the
    # AudioSet statistics: other embeddings from the same weights).
    from sslam.model import create_model

    built = create_model(source.cfg, checkpoint=tmp_path / "esc.pt")
    assert built.preprocessing == esc50 and built.label_names is None
    named = load_encoder(tmp_path / "esc.pt")
    named.label_names = [f"class {i}" for i in range(50)]
    save_encoder(named, tmp_path / "named")
    assert create_model(source.cfg, checkpoint=tmp_path / "named").label_names == named.label_names
    # Loading weights into a model of one's own keeps its metadata, as load_state_dict does.
    own = create_model(source.cfg)
    own.preprocessing, own.label_names = {"sample_rate": 16000, "target_length": 1024, "norm": "audioset"}, ["a"] * 50
    assert load_weights_into(own, tmp_path / "named") is own
    assert own.preprocessing["target_length"] == 1024 and own.label_names == ["a"] * 50
    assert torch.equal(own.patch_embed.weight, named.patch_embed.weight)
    ckpt = fairseq_finetuned(source)
    ckpt["model"]["model.norm.weight"] = torch.ones(64)  # a final norm this encoder does not have
    torch.save(ckpt, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match=r"unexpected keys.*model\.norm\.weight"):
        load_encoder(tmp_path / "extra.pt")
    # The official fine-tuning drops the reconstruction head and the shared decoder but keeps
    # the utterance-level (DINO) loss's projection and centre: not read by the encoder either.
    ckpt = fairseq_finetuned(source)
    ckpt["model"].update({"model.cls_proj.weight": torch.ones(64, 64), "model.cls_proj.bias": torch.ones(64),
                          "model.center": torch.ones(1, 1, 64)})
    torch.save(ckpt, tmp_path / "dino.pt")
    assert_same_encoder(load_encoder(tmp_path / "dino.pt"), source)


def test_a_head_trained_on_another_pooling_is_not_loaded(tmp_path):
    """A MEAN_POOLING head applied to the CLS token would give wrong logits: the encoder loads
    without it, with a warning, and a converted copy has no head either."""
    source = random_encoder(VARIANTS["tiny"].replace(num_classes=3))
    torch.save(fairseq_finetuned(source, prediction_mode="PredictionMode.MEAN_POOLING"), tmp_path / "mean.pt")
    with pytest.warns(UserWarning, match="MEAN_POOLING.*without it"):
        loaded = load_encoder(tmp_path / "mean.pt")
    assert loaded.cfg.num_classes == 0 and not hasattr(loaded, "head")
    encoder_only = random_encoder(VARIANTS["tiny"])
    encoder_only.load_state_dict(source.state_dict(), strict=False)
    assert_same_encoder(loaded, encoder_only)


def test_own_finetune_checkpoint_and_pytorch_model_bin(tmp_path):
    source = random_encoder(VARIANTS["tiny"].replace(num_classes=2))
    torch.save({"format": "sslam-finetune", "encoder_config": source.cfg.to_dict(), "model": source.state_dict(),
                "class_names": ["dog", "cat"], "step": 10}, tmp_path / "checkpoint_00000010.pt")
    loaded = load_encoder(tmp_path / "checkpoint_00000010.pt")
    assert loaded.label_names == ["dog", "cat"]
    assert_same_encoder(loaded, source)
    # Names that do not fit the head are refused, as in an export (they were dropped silently).
    torch.save({"format": "sslam-finetune", "encoder_config": source.cfg.to_dict(), "model": source.state_dict(),
                "class_names": ["dog"], "step": 10}, tmp_path / "checkpoint_00000011.pt")
    with pytest.raises(CheckpointError, match=r"checkpoint_00000011.pt: label names \(1\) must be 2 strings"):
        load_encoder(tmp_path / "checkpoint_00000011.pt")
    hf_folder(source, tmp_path / "bin")
    tensors = {HF.get(k, "model." + k): v for k, v in source.state_dict().items()}
    (tmp_path / "bin" / "model.safetensors").unlink()
    torch.save(tensors, tmp_path / "bin" / "pytorch_model.bin")
    assert_same_encoder(load_encoder(tmp_path / "bin"), source)


# ---- convert / info ---------------------------------------------------------------------------
def _sources(tmp_path) -> dict:
    cfg = EncoderConfig(embed_dim=96, depth=2, num_heads=4, num_classes=3, max_length=32)
    ft = random_encoder(cfg, seed=11)
    torch.save(fairseq_finetuned(ft), tmp_path / "ft.pt")
    hf = hf_folder(random_encoder(VARIANTS["tiny"].replace(num_classes=2), seed=12), tmp_path / "hf",
                   id2label={"0": "Speech", "1": "Music"})
    return {"fairseq-pretrain": (TINY, "student"), "fairseq-teacher": (TINY, "teacher"),
            "fairseq-finetune": (tmp_path / "ft.pt", "student"), "hf": (hf, "student")}


def test_convert_round_trip_every_format(tmp_path):
    from sslam.cli import main

    for name, (src, weights) in _sources(tmp_path).items():
        out = tmp_path / "out" / name
        assert main(["convert", str(src), str(out), "--weights", weights]) == 0
        original, converted = load_encoder(src, weights=weights), load_encoder(out)
        assert converted.cfg == original.cfg
        assert converted.preprocessing == original.preprocessing
        assert converted.label_names == original.label_names
        assert_same_encoder(converted, original)
        assert main(["info", str(out)]) == 0
        assert main(["info", str(src), "--weights", weights]) == 0
    assert load_encoder(tmp_path / "out" / "hf").label_names == ["Speech", "Music"]


def test_convert_writes_nothing_when_it_fails(tmp_path, monkeypatch):
    import safetensors.torch

    def broken_save(state, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        convert(TINY, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("keep me")
    with pytest.raises(OSError, match="disk full"):
        convert(TINY, existing)
    assert sorted(p.name for p in existing.iterdir()) == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]  # no temporary leftovers


def test_an_edited_config_json_of_an_export_is_named_not_silently_ignored(tmp_path):
    """An export's weights file carries its own config, which is what loads: a config.json
    edited beside it (other label names, say) changed nothing, without a word."""
    model = random_encoder(VARIANTS["tiny"].replace(num_classes=2))
    model.label_names = ["a", "b"]
    out = save_encoder(model, tmp_path / "export")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_encoder(out).label_names == ["a", "b"]  # as written: no warning
    config = json.loads((out / "config.json").read_text())
    config["label_names"] = ["speech", "music"]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match=r"export/config.json differs from the config inside model.safetensors"):
        assert load_encoder(out).label_names == ["a", "b"]


def test_save_encoder_refuses_what_loading_would_refuse(tmp_path):
    """Regression: ``preprocessing`` and ``label_names`` are attributes a user may set; saved
    unchecked, an encoder was written that load_encoder then refused."""
    model = Encoder(EncoderConfig(embed_dim=32, depth=1, num_heads=2, num_classes=5))
    cases = [({"preprocessing": {**model.preprocessing, "target_length": 1000}}, "target_length=1000 frames must be"),
             ({"preprocessing": {**model.preprocessing, "norm": (0.0, 0.0)}}, r"norm=\(0.0, 0.0\) is not usable"),
             ({"label_names": ["a", "b", "c"]}, r"label names \(3\) must be 5 strings"),
             ({"label_names": ("a", "b", "c", "d", 5)}, r"label names \(5\) must be 5 strings"),
             ({"label_names": "abcde"}, "label names must be a list of strings, got str"),
             ({"label_names": (n for n in "abcde")}, "label names must be a list of strings, got generator")]
    for change, message in cases:
        changed = Encoder(model.cfg)
        for name, value in change.items():
            setattr(changed, name, value)
        with pytest.raises(CheckpointError, match=message):
            save_encoder(changed, tmp_path / "out")
        assert not (tmp_path / "out").exists()
    model.label_names = ("a", "b", "c", "d", "e")  # any sequence of names, saved as a list
    assert load_encoder(save_encoder(model, tmp_path / "tuple")).label_names == ["a", "b", "c", "d", "e"]


def test_an_encoder_with_a_short_position_table_embeds_and_round_trips(tmp_path):
    """Regression: an Encoder built with a table shorter than AudioSet's 1024 frames kept a
    1024-frame window, so embed refused every clip and save_encoder wrote an unloadable file.
    Its default window is what the table covers, as loading gives."""
    model = Encoder(EncoderConfig(embed_dim=32, depth=1, num_heads=2, max_length=32)).eval()
    assert model.preprocessing["target_length"] == 512
    clip = torch.randn(16000 * 3) * 0.1
    emb = model.embed(clip, 16000)
    loaded = load_encoder(save_encoder(model, tmp_path / "short"))
    assert loaded.preprocessing == model.preprocessing
    assert torch.equal(loaded.embed(clip, 16000).utterance, emb.utterance)


def test_cli_reports_output_and_input_problems_in_one_line(tmp_path, capsys):
    from sslam.cli import main

    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    assert main(["convert", str(TINY), str(blocker / "out")]) == 2
    assert "sslam: error:" in capsys.readouterr().err
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "x": _payloads(tmp_path / "pwned")["system"][0]}, evil)
    assert main(["convert", str(evil), str(tmp_path / "o")]) == 2
    assert "refusing to load" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "pwned").exists()
    assert main(["info", str(evil)]) == 2


def test_info_checks_keys_like_loading_does(tmp_path):
    tiny = load_golden("tiny_ckpt.pt")
    model = dict(tiny["model"])
    del model["blocks.1.mlp.fc1.bias"]
    torch.save(dict(tiny, model=model), tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): \['blocks.1.mlp.fc1.bias'\]"):
        describe(tmp_path / "broken.pt")


# ---- encoder forward on odd inputs ------------------------------------------------------------
def test_keep_rows_must_match_clips_times_clones():
    model = random_encoder(VARIANTS["tiny"])
    spec = torch.randn(2, 1, FRAMES, 128)
    with pytest.raises(ValueError, match="keep has 4 rows; expected B \\* clones = 2 \\* 3 = 6"):
        model(spec, keep=torch.zeros(4, 5, dtype=torch.long), clones=3)  # used to drop clip 1 silently
    with pytest.raises(ValueError, match="int64 or int32 patch indices"):
        model(spec, keep=torch.zeros(6, 5), clones=3)
    # Out of range: an IndexError from torch, and a negative index silently kept another patch.
    for bad in (torch.tensor([[0, 32]] * 2), torch.tensor([[-1, 2]] * 2), torch.tensor([0, 99])):
        with pytest.raises(ValueError, match=r"keep: patch indices must lie in \[0, 32\)"):
            model(spec, keep=bad)


def test_padding_mask_validation():
    model = random_encoder(VARIANTS["tiny"])
    spec = torch.randn(2, 1, FRAMES, 128)
    with pytest.raises(ValueError, match="must be a bool tensor"):
        model(spec, key_padding_mask=torch.zeros(2, 32))
    with pytest.raises(ValueError, match=r"expected \(2, 5\)"):
        model(spec, keep=torch.zeros(2, 5, dtype=torch.long), key_padding_mask=torch.zeros(2, 32, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least 16 frames"):
        model(torch.randn(1, 1, 0, 128))
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        model(torch.randn(1, 1, 998, 128))  # documented: pad or crop to a multiple of 16 first


@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_all_but_one_padded_token_and_batch_of_one(impl):
    model = random_encoder(VARIANTS["tiny"]).set_attention(impl)
    tokens = model.patchify_embed(torch.randn(1, 1, FRAMES, 128))
    pad = torch.ones(1, 32, dtype=torch.bool)
    pad[0, 7] = False
    with torch.no_grad():
        out = model.forward_tokens(tokens, key_padding_mask=pad).x
        alone = model.forward_tokens(tokens[:, 7:8]).x
    assert torch.isfinite(out).all()
    assert torch.allclose(out[0, [0, 8]], alone[0], atol=1e-5)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_width_sdpa_math_and_kept_tokens(name):
    """Widths and heads of every variant (depth cut to 2 to stay fast): SDPA equals the explicit
    softmax; 2-D per-row and 1-D shared keep equal running the kept tokens alone."""
    model = random_encoder(VARIANTS[name].replace(depth=2, max_length=8))
    spec = torch.randn(2, 1, FRAMES, 128)
    with torch.no_grad():
        a = model.set_attention("sdpa")(spec, layer_results=True, block_outputs=True)
        b = model.set_attention("math")(spec, layer_results=True, block_outputs=True)
        assert len(a.layer_results) == len(a.block_outputs) == model.cfg.depth
        assert (a.x - b.x).abs().max() < 1e-5  # post-LN outputs: O(1)
        for la, lb in zip(a.layer_results, b.layer_results):  # raw FFN outputs: relative to their size
            assert (la - lb).abs().max() < 1e-5 * max(1.0, la.abs().max().item())
        tokens = model.patchify_embed(spec)
        keep = torch.stack([torch.randperm(32)[:5] for _ in range(4)])
        per_row = model(spec, keep=keep, clones=2).x
        shared = model(spec, keep=keep[0]).x
        for r in range(4):
            assert torch.allclose(per_row[r], model.forward_tokens(tokens[r // 2 : r // 2 + 1, keep[r]]).x[0], atol=1e-5)
        assert torch.allclose(shared, model.forward_tokens(tokens[:, keep[0]]).x, atol=1e-5)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_get_the_permissions_the_umask_gives(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "state.pt", lambda tmp: torch.save({"a": torch.zeros(1)}, tmp))
        out = save_encoder(Encoder(VARIANTS["tiny"]), tmp_path / "export")
    finally:
        os.umask(old)
    assert (tmp_path / "state.pt").stat().st_mode & 0o777 == 0o666 & ~umask
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    for name in ("model.safetensors", "config.json"):
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_atomic_write_syncs_the_file_then_its_folder(tmp_path, monkeypatch):
    """A rename is durable only once its folder is synced: without that a power loss after the
    write could leave the old file (or none) although the run went on as if it were saved."""
    synced, real_fsync = [], os.fsync

    def fsync(fd):
        synced.append("folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    atomic_write(tmp_path / "sub" / "state.pt", lambda tmp: torch.save({"a": torch.ones(1)}, tmp))
    assert synced == ["file", "folder"]


class _FullDisk(io.RawIOBase):
    """A file that takes ``room`` bytes, then fails as a full disk does."""

    def __init__(self, path, room: int):
        self.file, self.room = open(path, "wb"), room

    def writable(self):
        return True

    def write(self, data):
        if len(data) > self.room:
            raise OSError(28, "No space left on device")
        self.room -= len(data)
        return self.file.write(data)

    def close(self):
        self.file.close()
        super().close()


def test_a_full_disk_while_saving_is_one_error_naming_the_file(tmp_path):
    """torch.save on a full disk raised a RuntimeError about 'inline_container.cc' positions,
    and a run ended in its traceback: now an OSError (the CLI's one-line error) names the file
    and the free space; the checkpoint written before is intact and no temporary file is left."""
    atomic_write(tmp_path / "state.pt", lambda tmp: torch.save({"a": torch.ones(4)}, tmp))
    with pytest.raises(OSError, match=r"state.pt: could not write it \(.*MiB free on its disk\); the earlier"):
        atomic_write(tmp_path / "state.pt", lambda tmp: torch.save({"a": torch.zeros(10_000)}, _FullDisk(tmp, 1000)))
    assert torch.equal(safe_torch_load(tmp_path / "state.pt")["a"], torch.ones(4))
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_a_full_disk_is_reported_as_one(tmp_path, monkeypatch):
    """The CLI printed "[Errno None] ... ([enforce fail at inline_container.cc:672] . unexpected
    pos ...)" for a checkpoint written to a full disk: torch's zip writer hides the cause."""
    import shutil

    atomic_write(tmp_path / "state.pt", lambda tmp: torch.save({"a": torch.ones(4)}, tmp))
    save = lambda tmp: torch.save({"a": torch.zeros(10_000)}, _FullDisk(tmp, 1000))  # noqa: E731
    with pytest.raises(OSError) as excinfo:
        atomic_write(tmp_path / "state.pt", save)
    assert "a write stopped short" in str(excinfo.value) and excinfo.value.errno is None
    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 10**9, 0))
    with pytest.raises(OSError) as excinfo:
        atomic_write(tmp_path / "state.pt", save)
    assert excinfo.value.errno == errno.ENOSPC
    assert str(excinfo.value).endswith("state.pt: could not write it (No space left on device; 0 MiB free on its "
                                       "disk); the earlier file of that name is kept")


def _tiny_state_file(tmp_path, **replace) -> Path:
    state = {**Encoder(VARIANTS["tiny"]).state_dict(), **replace}
    path = tmp_path / "state.pt"
    torch.save(state, path)
    return path


def test_tensors_declaring_more_elements_than_the_file_holds_are_refused_before_allocation(tmp_path):
    # One stored value expanded to 2**34 elements: 64 GB for anything that copies or checks it.
    huge = torch.zeros(1, 1).expand(1 << 17, 1 << 17)
    path = _tiny_state_file(tmp_path, **{"blocks.0.mlp.fc1.weight": huge})
    assert path.stat().st_size < 4 << 20
    for load in (read_checkpoint, load_encoder, describe, safe_torch_load):
        with pytest.raises(CheckpointError, match=r"state\.pt: its tensors declare over .* elements"):
            load(path)


def test_a_truncated_archive_is_named_as_such(tmp_path):
    path = _tiny_state_file(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"state\.pt: truncated or damaged zip archive"):
        read_checkpoint(path)


def test_a_record_with_flipped_bits_fails_its_crc_instead_of_loading_wrong_weights(tmp_path):
    path = _tiny_state_file(tmp_path)
    with zipfile.ZipFile(path) as archive:
        record = next(i for i in archive.infolist() if "/data/" in i.filename and i.file_size >= 64)
    # The record's bytes follow its 30-byte local header, its name and its extra field.
    with open(path, "r+b") as f:
        f.seek(record.header_offset + 26)
        name_length, extra_length = np.frombuffer(f.read(4), dtype="<u2")
        f.seek(record.header_offset + 30 + int(name_length) + int(extra_length) + 8)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CheckpointError, match=rf"state\.pt: damaged archive: record '{record.filename}' fails"):
        read_checkpoint(path)


def test_unusable_preprocessing_in_an_sslam_folder_is_refused_when_read(tmp_path):
    convert(TINY, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    state = load_encoder(TINY).state_dict()
    covered = load_encoder(TINY).cfg.max_length * 16
    for changes, pattern in [({"norm": "librispeech"}, r"norm='librispeech' is not usable.*unknown preset"),
                             ({"norm": [0.0, -1.0]}, r"norm=\[0.0, -1.0\] is not usable"),
                             ({"norm": 7}, r"norm=7 is not usable"),
                             ({"sample_rate": 2**31 - 1}, r"sample_rate=2147483647 is outside 1000..384000"),
                             ({"target_length": 1000}, r"target_length=1000 frames must be a multiple of"),
                             ({"target_length": covered + 16}, rf"at most the {covered} frames")]:
        bad = {**meta, "preprocessing": {**meta["preprocessing"], **changes}}
        save_file(state, tmp_path / "m" / "model.safetensors", metadata={"format": "sslam", "sslam": json.dumps(bad)})
        (tmp_path / "m" / "config.json").write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=pattern):
            read_checkpoint(tmp_path / "m")
    # A custom (mean, std) pair and no normalisation are usable.
    for norm in ([-4.0, 4.5], None):
        good = {**meta, "preprocessing": {**meta["preprocessing"], "norm": norm}}
        save_file(state, tmp_path / "m" / "model.safetensors", metadata={"format": "sslam", "sslam": json.dumps(good)})
        (tmp_path / "m" / "config.json").write_text(json.dumps(good))
        assert read_checkpoint(tmp_path / "m").preprocessing["norm"] == norm


def test_configs_nested_too_deeply_are_refused_naming_the_file(tmp_path):
    """A small file whose config nests 100 000 levels (JSON or pickle) exhausted the recursion
    limit: a bare RecursionError, no file named."""
    source = random_encoder(VARIANTS["tiny"])
    folder = hf_folder(source, tmp_path / "hf")
    (folder / "config.json").write_text('{"x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, tmp_path / "own.safetensors", metadata={"format": "sslam", "sslam": "[" * 100_000 + "]" * 100_000})
    deep = tmp_path / "deep.pt"  # {"cfg": [[[...]]], "model": {}} written as pickle opcodes
    torch.save({"x": 1}, deep)
    with zipfile.ZipFile(deep) as archive:
        records = {name: archive.read(name) for name in archive.namelist()}
    body = b"\x80\x02}q\x00(X\x03\x00\x00\x00cfg" + b"]" * 50_000 + b"a" * 49_999 + b"X\x05\x00\x00\x00model}u."
    with zipfile.ZipFile(deep, "w") as archive:
        for name, data in records.items():
            archive.writestr(name, body if name.endswith("/data.pkl") else data)
    with pytest.raises(CheckpointError, match=r"config\.json: unreadable JSON config \(maximum recursion depth"):
        load_encoder(folder)
    for path in (tmp_path / "own.safetensors", deep):
        with pytest.raises(CheckpointError, match=f"{path.name}: nested too deeply to read"):
            load_encoder(path)


def test_labels_that_are_not_utf8_name_their_file(tmp_path):
    from sslam.checkpoint import read_label_names

    (tmp_path / "labels.txt").write_bytes(b"\xff\xfeSpeech\n")
    with pytest.raises(CheckpointError, match=r"labels.txt: not UTF-8 text \(byte 0xff at offset 0\)"):
        read_label_names(tmp_path / "labels.txt")


def test_label_csv_is_read_as_the_evaluation_reads_descriptors(tmp_path):
    """class_labels_indices.csv as a spreadsheet saves it (a byte-order mark, CRLF line ends)
    or with a display name's comma unquoted: the same names as the plain file."""
    from sslam.checkpoint import read_label_names

    names = ["Speech", "Male speech, man speaking", "Music"]
    plain = 'index,mid,display_name\n0,/m/a,Speech\n1,/m/b,"Male speech, man speaking"\n2,/m/c,Music\n'
    for name, data in [("plain", plain.encode()), ("bom_crlf", b"\xef\xbb\xbf" + plain.replace("\n", "\r\n").encode()),
                       ("unquoted", plain.replace('"', "").encode()),
                       ("quoted", b'"index","mid","display_name"\n"0","/m/a","Speech"\n'
                                  b'"1","/m/b","Male speech, man speaking"\n"2","/m/c","Music"\n'),
                       ("lines", b"\xef\xbb\xbf" + "\r\n".join(names).encode() + b"\r\n")]:
        (tmp_path / f"{name}.csv").write_bytes(data)
        assert read_label_names(tmp_path / f"{name}.csv") == names, name
    (tmp_path / "dup.csv").write_text("index,mid,display_name\n0,/m/a,A\n0,/m/b,B\n")
    with pytest.raises(CheckpointError, match=r"dup.csv:3: duplicate index 0"):
        read_label_names(tmp_path / "dup.csv")
    # Without the header, as the official SPASS descriptors (evaluation reads them so too).
    (tmp_path / "spass.csv").write_text("0,music,Music\n1,speech,Speech\n")
    assert read_label_names(tmp_path / "spass.csv") == ["Music", "Speech"]
    # A name per line that starts with a number and a comma is still a name.
    (tmp_path / "names.txt").write_text("1,000 Hz tone\nSpeech\n")
    assert read_label_names(tmp_path / "names.txt") == ["1,000 Hz tone", "Speech"]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 3")  # torch's, for the protocol-3 file below
def test_a_record_shorter_than_its_tensor_is_refused(tmp_path):
    """A storage record cut short in an archive rewritten with valid CRCs: a memory-mapped load
    read the next records' bytes into the weight (finite garbage, no error); torch's own read
    refuses it. The pickle scan (used for legacy files) reads what torch.save declares."""
    from sslam.safe_load import _declared_storages

    # What the pickle declares is what torch.save wrote, for every kind of storage.
    torch.save({"half": torch.randn(3, 4).half(), "long": torch.arange(5), "shared": [torch.randn(2)] * 2,
                "view": torch.randn(10)[2:5], "bool": torch.zeros(3, dtype=torch.bool),
                "bf16": torch.randn(4).bfloat16(), "raw": torch.UntypedStorage(7)}, tmp_path / "kinds.pt")
    for path in (TINY, tmp_path / "kinds.pt"):
        with zipfile.ZipFile(path) as archive:
            pickled = next(name for name in archive.namelist() if name.endswith("/data.pkl"))
            prefix = pickled[: -len("data.pkl")] + "data/"
            records = {i.filename[len(prefix):]: i.file_size for i in archive.infolist() if i.filename.startswith(prefix)}
            assert _declared_storages(archive.read(pickled)) == records, path
    with zipfile.ZipFile(TINY) as archive:
        records = {name: archive.read(name) for name in archive.namelist()}
    weight = load_golden("tiny_ckpt.pt")["model"]["blocks.0.mlp.fc1.weight"].numpy().tobytes()
    cut = next(name for name, data in records.items() if "/data/" in name and data == weight)
    with zipfile.ZipFile(tmp_path / "short.pt", "w") as archive:
        for name, data in records.items():
            archive.writestr(name, data[: len(data) // 2] if name == cut else data)
    with pytest.raises(CheckpointError, match=rf"short.pt: not a readable PyTorch checkpoint \(record size "
                                              rf"\({len(weight) // 2} bytes\) does not match expected size"):
        load_encoder(tmp_path / "short.pt")
    # Protocol 3, which torch.load also reads.
    torch.save({"w": torch.arange(500.0)}, tmp_path / "p3.pt", pickle_protocol=3)
    with zipfile.ZipFile(tmp_path / "p3.pt") as archive:
        records = {name: archive.read(name) for name in archive.namelist()}
    with zipfile.ZipFile(tmp_path / "p3.pt", "w") as archive:
        for name, data in records.items():
            archive.writestr(name, data[:1000] if name.endswith("/data/0") else data)
    with pytest.raises(CheckpointError, match=r"p3.pt: not a readable PyTorch checkpoint \(record size \(1000 bytes\)"):
        safe_torch_load(tmp_path / "p3.pt")


def test_a_legacy_file_declaring_more_storage_than_it_holds_is_refused_unread(tmp_path, monkeypatch):
    """A legacy (non-zip) file's storages are allocated at their declared size before their bytes
    are read: a few hundred bytes could claim gigabytes. The claim is checked against the file."""
    from sslam.safe_load import _scan_legacy

    tensors = {"half": torch.randn(3, 4).half(), "long": torch.arange(5), "shared": [torch.randn(2)] * 2,
               "view": torch.randn(10)[2:5], "bool": torch.zeros(3, dtype=torch.bool)}
    torch.save(tensors, tmp_path / "kinds.pt", _use_new_zipfile_serialization=False)
    # Every storage the pickle declares, counted once: what torch.save wrote.
    expected = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for t in [tensors["half"], tensors["long"], tensors["shared"][0], tensors["view"],
                              tensors["bool"]]}.values())
    assert _scan_legacy(tmp_path / "kinds.pt")[2] == expected

    class Storage:
        def __init__(self, numel=2**35):
            self.numel = numel

    class Pickler(pickle.Pickler):  # the persistent id legacy torch.save writes, with a huge numel
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "1", "cpu", obj.numel, None) if isinstance(obj, Storage) else None

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump({"w": Storage()})
    claim = buf.getvalue()
    buf = io.BytesIO()  # the same key declared again, smaller: torch allocates the first
    Pickler(buf, protocol=2).dump({"w": Storage(), "x": Storage(1)})
    again = buf.getvalue()
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load ran on the file"))
    for name, pickled in [("claims", claim), ("twice", again),
                          ("proto4", b"\x80\x04" + claim[2:]),  # torch.load only warns of the header
                          ("binstring", claim.replace(b"X\x07\x00\x00\x00storage", b"U\x07storage", 1))]:
        path = tmp_path / f"{name}.pt"
        torch.save({"w": torch.ones(4)}, path, _use_new_zipfile_serialization=False)
        _replace_pickle(path, pickled, zip_format=False)
        with pytest.raises(CheckpointError, match=rf"{name}.pt: damaged or hostile file: its tensors declare "
                                                  rf"{2**37} bytes of storage; the file holds {path.stat().st_size}"):
            safe_torch_load(path)
    # A persistent id the scan cannot read (built by a call) is not taken to declare nothing.
    path = tmp_path / "opaque.pt"
    torch.save({"w": torch.ones(4)}, path, _use_new_zipfile_serialization=False)
    _replace_pickle(path, claim.replace(b"X\x07\x00\x00\x00storage", b"c__builtin__\nstr\nX\x07\x00\x00\x00storage\x85R", 1),
                    zip_format=False)
    with pytest.raises(CheckpointError, match="opaque.pt: damaged or hostile file: the storages its tensors declare "
                                              "cannot be read without unpickling it"):
        safe_torch_load(path)


class _Storage:
    def __init__(self, pid):
        self.pid = pid


class _Tensor:  # pickles as torch.save pickles a float tensor over a _Storage
    def __init__(self, storage, numel):
        self.storage, self.numel = storage, numel

    def __reduce__(self):
        from collections import OrderedDict

        return torch._utils._rebuild_tensor_v2, (self.storage, 0, (self.numel,), (1,), False, OrderedDict())


class _PidPickler(pickle.Pickler):
    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, _Storage) else None


def _crafted_archive(path: Path, key, records: dict, compressed=(), kind=None) -> None:
    """A torch.save zip whose tensor ``w`` (8 floats) names storage ``key``, beside ``v`` (4
    floats in record '1'); ``records`` are the storage records written, by name."""
    buf = io.BytesIO()
    pid = ("storage", kind or torch.FloatStorage, key, "cpu", 8)
    _PidPickler(buf, protocol=2).dump({"w": _Tensor(_Storage(pid), 8),
                                       "v": _Tensor(_Storage(("storage", torch.FloatStorage, "1", "cpu", 4)), 4)})
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", buf.getvalue())
        archive.writestr("archive/version", "3\n")
        for name, data in [*records.items(), ("1", bytes(16))]:
            archive.writestr(f"archive/data/{name}", data,
                             compress_type=zipfile.ZIP_DEFLATED if name in compressed else zipfile.ZIP_STORED)


def test_a_tensor_never_takes_bytes_from_outside_its_own_record(tmp_path):
    """Crafted archives whose storage ids or records disagree (a short record under an int or
    GLOBAL key, a key matching a record only ignoring case, a missing or repeated record, a
    compressed one, a second data.pkl, quantized and CUDA storage classes): a memory-mapped load
    lent such a tensor the bytes after its record. Each file is now refused, or its tensor holds
    exactly the bytes of a record of its size."""
    full, short = torch.arange(8.0).numpy().tobytes(), torch.arange(4.0).numpy().tobytes()
    cases = {"int_key": dict(key=0, records={"0": full}), "global_key": dict(key=torch.float32, records={"torch.float32": short}),
             "case": dict(key="A", records={"a": short}), "missing": dict(key="x/../0", records={"0": full}),
             "compressed": dict(key="0", records={"0": full}, compressed=("0",)),
             "quantized": dict(key="0", records={"0": short}, kind=torch.QInt32Storage),
             "cuda": dict(key="0", records={"0": short}, kind=torch.cuda.FloatStorage)}
    for name, case in cases.items():
        _crafted_archive(tmp_path / f"{name}.pt", **case)
    _crafted_archive(tmp_path / "twice.pt", "0", {"0": short})
    with zipfile.ZipFile(tmp_path / "twice.pt", "a") as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Duplicate name": what is being made
        archive.writestr("archive/data/0", full)
    _crafted_archive(tmp_path / "second.pt", "0", {"0": short})
    with zipfile.ZipFile(tmp_path / "second.pt", "a") as archive:
        archive.writestr("archive/x/data.pkl", b"\x80\x02}q\x00.")
    for path in sorted(tmp_path.glob("*.pt")):
        try:
            loaded = safe_torch_load(path)
        except CheckpointError as exc:
            assert str(exc).startswith(str(path)), exc
            continue
        assert torch.equal(loaded["w"], torch.arange(8.0)), path.name  # a whole record of 8 floats


def test_an_inert_object_built_without_init_has_its_fields(tmp_path):
    """NEWOBJ calls __new__ alone: an empty argparse.Namespace (no state to set) had no
    ``state`` attribute, and reading the file's config raised AttributeError."""
    from sslam.safe_load import to_plain

    for zip_format in (True, False):
        torch.save({"args": argparse.Namespace(), "cfg": {"x": 1}}, tmp_path / "ns.pt",
                   _use_new_zipfile_serialization=zip_format)
        assert to_plain(safe_torch_load(tmp_path / "ns.pt"), "ns.pt")["cfg"] == {"x": 1}


@pytest.mark.parametrize("body", [
    # a persistent id whose storage class is a tuple nested 10**6 deep: hashing it overflowed the C stack
    b"\x80\x02(X\x07\x00\x00\x00storage)" + b"\x85" * 1_000_000
    + b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQ.",
    b"\x80\x02" + b"N" * 30_000 + b"t" * 30_000 + b".",  # TUPLE without MARK: quadratic in the scan
    b"\x80\x02" + b"(" * 30_000 + b"N" * 30_000 + b"e" * 30_000 + b".",  # unbalanced MARKs
], ids=["deep", "unmarked", "marks"])
def test_crafted_pickles_are_refused_quickly(tmp_path, body):
    """Pickles built to crash, stall or exhaust the storage scan are refused as unreadable (the
    scan is linear in the pickle and builds only tuples of scalars), in zip and legacy files."""
    torch.save({"x": torch.zeros(1)}, tmp_path / "plain.pt")
    with zipfile.ZipFile(tmp_path / "plain.pt") as archive:
        records = {name: archive.read(name) for name in archive.namelist()}
    with zipfile.ZipFile(tmp_path / "crafted.pt", "w") as archive:
        for name, data in records.items():
            archive.writestr(name, body if name.endswith("/data.pkl") else data)
    with pytest.raises(CheckpointError, match="crafted.pt: (not a readable PyTorch checkpoint|damaged or hostile file)"):
        safe_torch_load(tmp_path / "crafted.pt")
    torch.save({"x": torch.zeros(1)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    _replace_pickle(tmp_path / "legacy.pt", body, zip_format=False)
    with pytest.raises(CheckpointError, match="legacy.pt: (not a readable PyTorch checkpoint|damaged or hostile file)"):
        safe_torch_load(tmp_path / "legacy.pt")


def test_what_is_not_a_file_or_folder_is_named_before_reading(tmp_path):
    """A pipe would block the first read forever and /dev/zero never end it: both are refused
    by what they are. A link loop is one, not a missing file; a weights file that is a folder
    or a loop is named as such; a file name that is not UTF-8 (torch and safetensors open files
    by UTF-8 names) is named as the reason instead of calling a good file unreadable."""
    pipe = tmp_path / "pipe.pt"
    os.mkfifo(pipe)
    (tmp_path / "zero.pt").symlink_to("/dev/zero")
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    for name, pattern in [("pipe.pt", "not a regular file or folder"), ("zero.pt", "not a regular file or folder"),
                          ("a", "cannot be opened .*symbolic links")]:
        for load in (read_checkpoint, describe, safe_torch_load):
            with pytest.raises(CheckpointError, match=f"{name}: {pattern}"):
                load(tmp_path / name)
    convert(TINY, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    (tmp_path / "m" / "model.safetensors").mkdir()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: is a folder, not a weights file"):
        read_checkpoint(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").rmdir()
    (tmp_path / "m" / "model.safetensors").symlink_to(tmp_path / "a")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot be opened .*symbolic links"):
        read_checkpoint(tmp_path / "m")
    latin1 = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9.pt"))
    latin1.write_bytes(Path(TINY).read_bytes())
    with pytest.raises(CheckpointError, match=re.escape("caf\udce9.pt: the file name is not UTF-8")):
        read_checkpoint(latin1)


def test_a_config_json_that_is_not_a_file_is_named_not_skipped(tmp_path):
    """config.json beside the weights gets the weights file's checks: a device or pipe would
    be read forever, a link to nothing is an error rather than a config silently missing (the
    number of heads guessed, the label names dropped), a folder is named as one. So for a
    folder being loaded, a file beside its config, and a folder being converted into."""
    hf_folder(random_encoder(VARIANTS["tiny"]), tmp_path / "hf")
    config = tmp_path / "hf" / "config.json"
    config.unlink()
    cases = [(lambda: config.symlink_to("/dev/null"), "not a regular file or folder"),
             (lambda: config.symlink_to(tmp_path / "gone.json"), "a link to nothing"),
             (config.mkdir, "is a folder, not a JSON config")]
    for make, pattern in cases:
        make()
        for load in (lambda: read_checkpoint(tmp_path / "hf"), lambda: read_checkpoint(tmp_path / "hf" / "model.safetensors"),
                     lambda: convert(TINY, tmp_path / "hf", overwrite=True)):
            with pytest.raises(CheckpointError, match=f"config.json: {pattern}"):
                load()
        config.rmdir() if config.is_dir() and not config.is_symlink() else config.unlink()


def test_an_export_folder_that_cannot_be_made_is_refused_before_reading(tmp_path, monkeypatch):
    """An empty name (Path("") is the current folder), a file, or a path under a file: named as
    such before the checkpoint is read, by convert and save_encoder alike."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("kept")
    for out, pattern in [("", "output folder is empty"), ("afile", "output folder afile: it is not a folder"),
                         ("afile/sub", "output folder afile/sub: afile is not a folder")]:
        with pytest.raises(ValueError, match=pattern):
            convert(tmp_path / "nothing-read.pt", out)
        with pytest.raises(ValueError, match=pattern):
            save_encoder(Encoder(VARIANTS["tiny"]), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
    assert (tmp_path / "afile").read_text() == "kept"


def test_a_config_no_weight_shows_is_checked_before_the_model_is_built(tmp_path, monkeypatch):
    """An sslam file without weights whose config claims a ViT of width 16384: refused without
    building that model (about 13 GB in fp32)."""
    convert(TINY, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    meta["encoder"].update(embed_dim=16384, num_heads=1, depth=4)
    save_file({}, tmp_path / "m" / "model.safetensors", metadata={"format": "sslam", "sslam": json.dumps(meta)})
    (tmp_path / "m" / "config.json").unlink()
    real_init = Encoder.__init__

    def init(self, cfg, *args, **kwargs):
        device = torch.empty(0).device.type  # the default device the model is built on
        assert device == "meta", f"a {cfg.embed_dim}-wide encoder built on {device} before checking"
        real_init(self, cfg, *args, **kwargs)

    monkeypatch.setattr(Encoder, "__init__", init)
    with pytest.raises(CheckpointError, match="depth: config 4, weights 0"):
        load_encoder(tmp_path / "m")


def test_unreadable_json_configs_are_named(tmp_path):
    """json refuses integers of over 4300 digits with a plain ValueError: the file is named; so
    is a config that is another JSON value."""
    convert(TINY, tmp_path / "m")
    state = load_file(tmp_path / "m" / "model.safetensors")
    meta = '{"format": "sslam", "encoder": {"embed_dim": ' + "4" * 4400 + "}}"
    save_file(state, tmp_path / "m" / "model.safetensors", metadata={"format": "sslam", "sslam": meta})
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unreadable sslam metadata .*4300"):
        load_encoder(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    hf = hf_folder(random_encoder(VARIANTS["tiny"]), tmp_path / "hf")
    (hf / "config.json").write_text('{"embed_dim": ' + "9" * 5000 + "}")
    with pytest.raises(CheckpointError, match=r"config\.json: unreadable JSON config .*4300"):
        load_encoder(hf)
    (hf / "config.json").write_text("[1]")
    with pytest.raises(CheckpointError, match=r"config\.json: unreadable JSON config \(not a JSON object but list\)"):
        load_encoder(hf)


def test_two_names_for_one_weight_are_reported_not_one_dropped(tmp_path):
    """An official file holding pre_norm.weight besides its official name for that weight, or a
    block under both its names, or a head under both of Hugging Face's: the second is an
    unexpected key (one of the two used to win silently)."""
    tiny = load_golden("tiny_ckpt.pt")
    assert "pre_norm.weight" not in tiny["model"] and "blocks.0.norm1.bias" in tiny["model"]
    for name in ("pre_norm.weight", "modality_encoders.IMAGE.blocks.0.norm1.bias"):
        model = {**tiny["model"], name: torch.full((64,), 7.0)}
        torch.save(dict(tiny, model=model), tmp_path / "alias.pt")
        with pytest.raises(CheckpointError, match=rf"unexpected keys.*{re.escape(name)}"):
            load_encoder(tmp_path / "alias.pt")
    # The same in the EMA teacher: its second name wrote over the official weight.
    ema = {**tiny["model"]["_ema"], "pre_norm.weight": torch.full((64,), 7.0)}
    torch.save(dict(tiny, model={**tiny["model"], "_ema": ema}), tmp_path / "alias.pt")
    with pytest.raises(CheckpointError, match=r"alias\.pt: model\['_ema'\] holds \['pre_norm\.weight'\] under two names"):
        load_encoder(tmp_path / "alias.pt", weights="teacher")
    folder = hf_folder(random_encoder(VARIANTS["tiny"].replace(num_classes=3)), tmp_path / "hf")
    state = load_file(folder / "model.safetensors")
    save_file({**state, "head.weight": torch.zeros_like(state["model.head.weight"])}, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected keys .*'head\.weight'"):
        load_encoder(folder)


def test_a_tensor_in_an_official_config_is_named(tmp_path):
    """A tensor where the config holds a number made its comparisons ambiguous (a RuntimeError
    traceback); fine-tuned files read more of the config (target_length, esc50_eval)."""
    tiny = load_golden("tiny_ckpt.pt")
    cfg = {"model": {**tiny["cfg"]["model"], "modalities": {"image": {
        **tiny["cfg"]["model"]["modalities"]["image"], "num_extra_tokens": torch.tensor([1, 1])}}}}
    torch.save(dict(tiny, cfg=cfg), tmp_path / "t.pt")
    with pytest.raises(CheckpointError, match=r"t\.pt: the model config holds a tensor at model\.modalities\.image\.num_extra_tokens"):
        load_encoder(tmp_path / "t.pt")
    ckpt = fairseq_finetuned(random_encoder(VARIANTS["tiny"].replace(num_classes=2)), esc50_eval=torch.ones(2))
    torch.save(ckpt, tmp_path / "ft.pt")
    with pytest.raises(CheckpointError, match=r"ft\.pt: the model config holds a tensor at model\.esc50_eval"):
        load_encoder(tmp_path / "ft.pt")


def test_loading_checks_each_weight_s_values_once(tmp_path, monkeypatch):
    """The meta-device pass compares keys and shapes only; the values (finite) are checked
    once, on the weights loaded (twice cost a quarter of a ViT-B load)."""
    calls = []
    real = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: calls.append(t.shape) or real(t))
    model = load_encoder(TINY)
    assert len(calls) == len(model.state_dict())


@pytest.mark.filterwarnings("ignore:Sparse invariant checks", "ignore:Validating sparse tensor invariants")
def test_legitimate_files_that_were_refused_load(tmp_path):
    """Files torch.load(weights_only=True) reads: written without CRCs (a torch option), shared
    layers (twelve names for one storage, now counted once), a sparse tensor of a large dense
    shape, a meta skeleton. The CRC-less, sparse and meta files were called damaged or
    "expanded or crafted"."""
    block = torch.nn.Linear(64, 64).to(torch.bfloat16)
    shared = torch.nn.ModuleList([block] * 12).state_dict()
    sparse = torch.sparse_coo_tensor(torch.tensor([[0, 99_999], [5, 7]]), torch.tensor([1.0, 2.0]), (100_000, 100_000))
    meta = torch.empty(50_000, 4096, device="meta")
    torch.serialization.set_crc32_options(False)
    try:
        torch.save({"w": torch.arange(8.0)}, tmp_path / "nocrc.pt")
    finally:
        torch.serialization.set_crc32_options(True)
    assert torch.equal(safe_torch_load(tmp_path / "nocrc.pt")["w"], torch.arange(8.0))
    for zip_format in (True, False):
        torch.save({"shared": shared, "sparse": sparse, "meta": meta}, tmp_path / "ok.pt",
                   _use_new_zipfile_serialization=zip_format)
        loaded = safe_torch_load(tmp_path / "ok.pt")
        assert all(torch.equal(loaded["shared"][k], v) for k, v in shared.items())
        assert torch.equal(loaded["sparse"].coalesce().values(), torch.tensor([1.0, 2.0]))
        assert loaded["meta"].shape == meta.shape
    # What they still cannot do: one stored value expanded to 2**34 elements, or many views of
    # one storage at other offsets (each may be copied).
    torch.save({"w": torch.zeros(1).expand(2**34)}, tmp_path / "expanded.pt")
    base = torch.zeros(1 << 20)
    torch.save({"views": [base[i:] for i in range(20)]}, tmp_path / "views.pt")
    for name in ("expanded", "views"):
        with pytest.raises(CheckpointError, match=f"{name}.pt: its tensors declare over"):
            safe_torch_load(tmp_path / f"{name}.pt")


def test_a_compressed_record_that_unpacks_far_beyond_the_file_is_refused_unread(tmp_path, monkeypatch):
    """torch.load inflates a record whole: 64 MB of zeros deflate to about 64 kB."""
    _crafted_archive(tmp_path / "bomb.pt", "0", {"0": bytes(64 << 20)}, compressed=("0",))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load ran on the file"))
    with pytest.raises(CheckpointError, match=r"bomb.pt: damaged or hostile archive: its records unpack to "
                                              r"67,1\d\d,\d\d\d bytes, over 4x the file's"):
        safe_torch_load(tmp_path / "bomb.pt")


def test_loaded_tensors_do_not_change_when_the_file_is_rewritten(tmp_path):
    """Loaded with mmap, the tensors read the file on disk: saving over it in place (a script
    dropping the optimizer state, say) changed them, or killed the process with SIGBUS."""
    path = tmp_path / "ck.pt"
    torch.save({"w": torch.ones(1 << 16), "optimizer": torch.zeros(1 << 16)}, path)
    ckpt = safe_torch_load(path)
    torch.save({"w": torch.full((1 << 16,), 7.0)}, path)
    assert torch.equal(ckpt["w"], torch.ones(1 << 16))


@pytest.mark.parametrize("time_patches", [16, 48])
def test_a_position_table_of_another_length_keeps_the_files_rows(tmp_path, time_patches):
    """A file whose table has more or fewer rows than the model's: the rows both have are the
    file's (its own rounding of the sin-cos table, here perturbed to tell them apart), the rest
    the model's own table."""
    from sslam.model import sincos_positions

    tiny = VARIANTS["tiny"]
    saved = Encoder(tiny.replace(max_length=32))
    with torch.no_grad():
        saved.pos_embed.add_(1e-3 * torch.randn_like(saved.pos_embed))
    saved.save_pretrained(tmp_path / "model")
    model = load_weights_into(Encoder(tiny.replace(max_length=time_patches)), tmp_path / "model")
    shared = min(32, time_patches) * tiny.freq_patches
    assert torch.equal(model.pos_embed[:, :shared], saved.pos_embed[:, :shared])
    own = sincos_positions(tiny.embed_dim, time_patches, tiny.freq_patches)[None]
    assert torch.equal(model.pos_embed[:, shared:], own[:, shared:])
