"""Checkpoint import: official fairseq (pretrain / fine-tuned), Hugging Face, ours; parity with
the official outputs; key/shape checks; safe loading of hostile files."""

import argparse
import json
import os
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import GOLDEN, load_golden
from safetensors.torch import save_file

from sslam.checkpoint import (
    CheckpointError,
    convert,
    describe,
    load_encoder,
    read_checkpoint,
    safe_torch_load,
    save_encoder,
)
from sslam.features import preprocess
from sslam.model import VARIANTS, Encoder

TINY = GOLDEN / "tiny_ckpt.pt"


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def tiny():
    return load_golden("tiny_ckpt.pt")


@pytest.fixture(scope="module")
def tiny_model():
    return load_encoder(TINY)


def test_parity_with_official_outputs_from_model_input(tiny_model, golden_fbank, golden_tiny_out):
    for name, ref in golden_tiny_out["items"].items():
        x = golden_fbank["items"][name]["model_input"]
        with torch.no_grad():
            out = tiny_model(x, layer_results=True, block_outputs=True)
        assert rel_err(out.x[0], ref["all"]) < 1e-4
        assert rel_err(out.x[0, 0], ref["utterance"]) < 1e-4
        assert rel_err(out.x[0, 1:], ref["frame"]) < 1e-4
        for ours, theirs in zip(out.layer_results, ref["layer_results"]):
            assert rel_err(ours[0], theirs) < 1e-4
        for ours, theirs in zip(out.block_outputs, ref["block_outputs"]):
            assert rel_err(ours[0], theirs) < 1e-4
        assert rel_err(tiny_model.patchify_embed(x)[0] - tiny_model.pos_embed[0, :512], ref["patch_embed"]) < 1e-4


def test_parity_from_raw_waveforms(tiny_model, golden_fbank, golden_tiny_out):
    for name, ref in golden_tiny_out["items"].items():
        item = golden_fbank["items"][name]
        with torch.no_grad():
            out = tiny_model(preprocess(item["waveform"], item["wav_file_sample_rate"]), layer_results=True)
        assert rel_err(out.x[0], ref["all"]) < 1e-4
        for ours, theirs in zip(out.layer_results, ref["layer_results"]):
            assert rel_err(ours[0], theirs) < 1e-4


def test_teacher_weights(tiny):
    teacher = load_encoder(TINY, weights="teacher")
    ema = tiny["model"]["_ema"]
    assert torch.equal(teacher.blocks[1].mlp.fc2.weight, ema["blocks.1.mlp.fc2.weight"])
    assert torch.equal(teacher.cls_token, ema["modality_encoders.IMAGE.extra_tokens"])
    student = load_encoder(TINY)
    assert not torch.equal(teacher.blocks[1].mlp.fc2.weight, student.blocks[1].mlp.fc2.weight)


def test_pretraining_checkpoint_parts(tiny):
    ckpt = read_checkpoint(TINY)
    assert ckpt.format == "fairseq-pretrain"
    assert ckpt.config == VARIANTS["tiny"]
    assert len(ckpt.state) == 30 and len(ckpt.teacher) == 30 and len(ckpt.decoder) == 14
    assert torch.equal(ckpt.decoder["proj.weight"], tiny["model"]["modality_encoders.IMAGE.decoder.proj.weight"])


def test_official_vit_b_key_list_maps_onto_our_encoder():
    """The real ViT-B checkpoint's 314 entries (golden base_keys.txt): the architecture is read
    as ViT-B and every student and teacher key lands on our encoder with the right shape."""
    from sslam.checkpoint import _from_fairseq

    model, ema = {}, {}
    for line in (GOLDEN / "base_keys.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, _ = line.split("\t")
        size = [int(s) for s in shape.strip("()").split(",") if s.strip()]
        tensor = torch.zeros(()).expand(size)  # no memory: only keys and shapes matter here
        if key.startswith("_ema."):
            ema[key[len("_ema."):]] = tensor
        else:
            model[key] = tensor
    model["_ema"] = ema
    ckpt = _from_fairseq(Path("base.pt"), {"cfg": {"model": {"num_heads": 12}}, "model": model}, "student")
    assert ckpt.config == VARIANTS["base"]
    with torch.device("meta"):
        expected = {k: v.shape for k, v in Encoder(ckpt.config).state_dict().items()}
    assert {k: v.shape for k, v in ckpt.state.items()} == expected
    assert {k: v.shape for k, v in ckpt.teacher.items()} == expected
    assert len(ckpt.decoder) == 14


def _finetuned(tiny, classes=5):
    model = {"model." + k: v for k, v in tiny["model"].items() if k != "_ema" and ".decoder." not in k}
    model["fc_norm.weight"] = torch.rand(64) + 0.5
    model["fc_norm.bias"] = torch.randn(64)
    model["head.weight"] = torch.randn(classes, 64) * 0.02
    model["head.bias"] = torch.zeros(classes)
    cfg = {"model": {"_name": "mae_image_classification", "pretrained_model_args": {"model": {"num_heads": 2}}}}
    return {"args": None, "cfg": cfg, "model": model}


def test_finetuned_fairseq_checkpoint(tmp_path, tiny, tiny_model, golden_fbank):
    path = tmp_path / "ft.pt"
    torch.save(_finetuned(tiny), path)
    model = load_encoder(path)
    assert model.cfg.num_classes == 5 and model.cfg.num_heads == 2
    x = golden_fbank["items"]["noise_2p7s_16k"]["model_input"]
    with torch.no_grad():
        assert torch.allclose(model(x).x, tiny_model(x).x, atol=1e-6)
        cls = model(x).x[:, 0]
        ln = torch.nn.functional.layer_norm(cls, (64,), model.fc_norm.weight, model.fc_norm.bias, 1e-6)
        assert torch.allclose(model.classify(cls), ln @ model.head.weight.T + model.head.bias, atol=1e-6)
    with pytest.raises(CheckpointError, match="no EMA teacher"):
        load_encoder(path, weights="teacher")


def _hf_state(tiny):
    rename = {
        "modality_encoders.IMAGE.extra_tokens": "model.extra_tokens",
        "modality_encoders.IMAGE.local_encoder.proj.weight": "model.local_encoder.proj.weight",
        "modality_encoders.IMAGE.local_encoder.proj.bias": "model.local_encoder.proj.bias",
        "modality_encoders.IMAGE.fixed_positional_encoder.positions": "model.fixed_positional_encoder.positions",
        "modality_encoders.IMAGE.context_encoder.norm.weight": "model.pre_norm.weight",
        "modality_encoders.IMAGE.context_encoder.norm.bias": "model.pre_norm.bias",
    }
    out = {}
    for k, v in tiny["model"].items():
        if k in rename:
            out[rename[k]] = v.contiguous()
        elif k.startswith("blocks."):
            out["model." + k] = v.contiguous()
    return out


def test_hugging_face_folder_and_file(tmp_path, tiny, tiny_model, golden_fbank):
    folder = tmp_path / "SSLAM_pretrain"
    folder.mkdir()
    save_file(_hf_state(tiny), folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({
        "model_type": "eat", "model_variant": "pretrain", "embed_dim": 64, "depth": 2, "num_heads": 2,
        "mlp_ratio": 4.0, "norm_eps": 1e-6, "max_length": 768, "mel_bins": 128, "img_size": [1024, 128],
    }))
    x = golden_fbank["items"]["test_wav"]["model_input"]
    for path in (folder, folder / "model.safetensors"):
        model = load_encoder(path)
        assert read_checkpoint(path).format == "hf"
        with torch.no_grad():
            assert torch.equal(model(x).x, tiny_model(x).x)


def test_hugging_face_finetuned_with_labels_and_without_positions(tmp_path, tiny):
    state = _hf_state(tiny)
    del state["model.fixed_positional_encoder.positions"]  # recomputed when absent
    state["model.fc_norm.weight"], state["model.fc_norm.bias"] = torch.ones(64), torch.zeros(64)
    state["model.head.weight"], state["model.head.bias"] = torch.randn(3, 64), torch.zeros(3)
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "eat", "model_variant": "finetune", "embed_dim": 64, "depth": 2, "num_heads": 2,
        "num_classes": 3, "id2label": {"0": "Speech", "1": "Music", "2": "Dog"},
    }))
    model = load_encoder(tmp_path)
    assert model.label_names == ["Speech", "Music", "Dog"]
    assert model.cfg.head_norm_eps == 1e-5
    assert model.fc_norm.eps == 1e-5


def test_own_format_round_trip_and_info(tmp_path, tiny_model, golden_fbank, capsys):
    out = convert(TINY, tmp_path / "tiny")
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    meta = json.loads((out / "config.json").read_text())
    assert meta["format"] == "sslam" and meta["preprocessing"]["target_length"] == 1024
    x = golden_fbank["items"]["test_wav"]["model_input"]
    for path in (out, out / "model.safetensors"):
        with torch.no_grad():
            assert torch.equal(load_encoder(path)(x).x, tiny_model(x).x)
    teacher_dir = convert(TINY, tmp_path / "teacher", weights="teacher")
    assert torch.equal(load_encoder(teacher_dir).cls_token, load_encoder(TINY, weights="teacher").cls_token)
    text = describe(TINY)
    assert "fairseq-pretrain" in text and "116,608" in text and "EMA teacher also present" in text
    # An export says where its one set of weights came from (it said "student" for a teacher).
    text = describe(teacher_dir)
    assert "weights:      teacher (the EMA copy of tiny_ckpt.pt, converted)" in text
    assert 'source:       {"format": "fairseq-pretrain", "weights": "teacher", "file": "tiny_ckpt.pt"}' in text
    assert "weights:      student (of tiny_ckpt.pt, converted)" in describe(out)
    # Converted again, a teacher's export still holds the teacher (it was said to be a student).
    again = convert(teacher_dir, tmp_path / "again")
    assert "weights:      teacher (the EMA copy of teacher/model.safetensors, converted)" in describe(again)


def test_hugging_face_names_load_and_save(tmp_path, tiny_model, golden_fbank):
    """Encoder.from_pretrained / save_pretrained, the names Hugging Face and timm users reach
    for, are load_encoder and save_encoder."""
    model = Encoder.from_pretrained(TINY, weights="teacher")
    assert torch.equal(model.cls_token, load_encoder(TINY, weights="teacher").cls_token) and not model.training
    out = tiny_model.save_pretrained(tmp_path / "export")
    assert out == tmp_path / "export" and (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    x = golden_fbank["items"]["test_wav"]["model_input"]
    with torch.no_grad():
        assert torch.equal(Encoder.from_pretrained(out)(x).x, tiny_model(x).x)


def test_labels_for_converted_finetuned_model(tmp_path, tiny):
    torch.save(_finetuned(tiny, classes=3), tmp_path / "ft.pt")
    csv = tmp_path / "labels.csv"
    csv.write_text('index,mid,display_name\n0,/m/09x0r,"Speech"\n2,/m/0jbk,Animal\n1,/m/04rlf,Music\n')
    out = convert(tmp_path / "ft.pt", tmp_path / "out", labels=csv)
    assert load_encoder(out).label_names == ["Speech", "Music", "Animal"]
    csv.write_text("index,mid,display_name\n0,a,A\n")
    with pytest.raises(CheckpointError, match="1 label names for a head of 3 classes"):
        convert(tmp_path / "ft.pt", tmp_path / "out2", labels=csv)


def test_architecture_is_read_from_the_file(tmp_path):
    cfg = VARIANTS["tiny"].replace(embed_dim=96, depth=3, num_heads=3, mlp_ratio=2.0, max_length=100)
    model = Encoder(cfg)
    save_encoder(model, tmp_path / "m")
    loaded = load_encoder(tmp_path / "m")
    assert loaded.cfg == cfg
    x = torch.randn(1, 1, 64, 128)
    with torch.no_grad():
        assert torch.equal(loaded(x).x, model.eval()(x).x)


def _fairseq_with(tiny, mutate):
    model = {k: v for k, v in tiny["model"].items()}
    mutate(model)
    return {"cfg": {"model": {"num_heads": 2}}, "model": model}


def test_heads_of_the_official_optional_losses_are_left_out(tmp_path, tiny):
    """A run of the official code with a reconstruction loss, the utterance-level (DINO) loss or
    a shared decoder saves their heads beside the encoder (recon_proj, cls_proj, center,
    shared_decoder): the encoder's forward never reads them, so they are not loaded."""
    def heads(m):
        m["recon_proj.weight"], m["recon_proj.bias"] = torch.ones(21, 64), torch.ones(21)
        m["cls_proj.weight"], m["cls_proj.bias"] = torch.ones(64, 64), torch.ones(64)
        m["center"] = torch.ones(1, 1, 64)
        m["shared_decoder.blocks.0.0.weight"] = torch.ones(64, 4, 3)

    torch.save(_fairseq_with(tiny, lambda m: None), tmp_path / "plain.pt")
    torch.save(_fairseq_with(tiny, heads), tmp_path / "heads.pt")
    plain, with_heads = read_checkpoint(tmp_path / "plain.pt"), read_checkpoint(tmp_path / "heads.pt")
    assert with_heads.state.keys() == plain.state.keys() and with_heads.decoder.keys() == plain.decoder.keys()
    assert all(torch.equal(with_heads.state[k], v) for k, v in plain.state.items())

    def not_a_tensor(m):
        m["recon_proj.weight"] = "code"

    torch.save(_fairseq_with(tiny, not_a_tensor), tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match=r"unexpected keys \(or non-tensor values\).*recon_proj\.weight"):
        read_checkpoint(tmp_path / "odd.pt")


def test_missing_unexpected_and_misshapen_keys_are_listed(tmp_path, tiny):
    def drop(m):
        del m["blocks.1.mlp.fc1.bias"]

    torch.save(_fairseq_with(tiny, drop), tmp_path / "a.pt")
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): \['blocks.1.mlp.fc1.bias'\]"):
        load_encoder(tmp_path / "a.pt")

    def extra(m):
        m["modality_encoders.IMAGE.alibi_scale"] = torch.ones(1)

    torch.save(_fairseq_with(tiny, extra), tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match="unexpected keys.*alibi_scale"):
        load_encoder(tmp_path / "b.pt")

    def reshape(m):
        m["blocks.0.attn.proj.weight"] = torch.zeros(64, 32)

    torch.save(_fairseq_with(tiny, reshape), tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=r"shape mismatches.*blocks.0.attn.proj.weight: file \(64, 32\)"):
        load_encoder(tmp_path / "c.pt")

    def nan(m):
        m["blocks.0.norm1.weight"] = torch.full((64,), float("nan"))

    torch.save(_fairseq_with(tiny, nan), tmp_path / "d.pt")
    with pytest.raises(CheckpointError, match="not a finite"):
        load_encoder(tmp_path / "d.pt")


def test_unreadable_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_encoder(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_encoder(junk)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(TINY.read_bytes()[: 200_000])
    with pytest.raises(CheckpointError, match="truncated.pt"):
        load_encoder(truncated)
    torch.save({"weights": torch.ones(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="unknown checkpoint layout"):
        load_encoder(tmp_path / "other.pt")
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}" + os.urandom(100))
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        load_encoder(bad_st)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hostile_pickle_is_refused_and_runs_nothing(tmp_path, tiny):
    marker = tmp_path / "pwned"
    ckpt = dict(tiny)
    ckpt["extra_state"] = {"payload": _Evil(marker)}
    torch.save(ckpt, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"refusing to load.*(posix|os|nt)\.system"):
        load_encoder(tmp_path / "evil.pt")
    assert not marker.exists()

    class Sneaky:
        def __reduce__(self):
            return (eval, (f"__import__('os').system('touch {marker}')",))

    torch.save({"model": Sneaky()}, tmp_path / "sneaky.pt")
    with pytest.raises(CheckpointError, match="refusing to load.*builtins.eval"):
        safe_torch_load(tmp_path / "sneaky.pt")
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4])
def test_a_plain_pickle_that_would_run_code_is_refused_by_name(tmp_path, protocol):
    """A ``pickle.dump`` (not torch.save) of a payload was refused only as "pickle exhausted
    before seeing STOP": safe, but the message did not say that the file holds code."""
    marker = tmp_path / "pwned"
    (tmp_path / "plain.pt").write_bytes(pickle.dumps({"model": _Evil(marker)}, protocol=protocol))
    with pytest.raises(CheckpointError, match=r"plain\.pt: refusing to load.*(posix|os|nt)\.system"):
        safe_torch_load(tmp_path / "plain.pt")
    assert not marker.exists()
    (tmp_path / "harmless.pt").write_bytes(pickle.dumps({"a": [1, 2]}, protocol=protocol))
    with pytest.raises(CheckpointError, match=r"harmless\.pt: not a readable PyTorch checkpoint"):
        safe_torch_load(tmp_path / "harmless.pt")


def test_fairseq_extras_still_load(tmp_path, tiny, monkeypatch):
    """Official files pickle config objects and meters; they become inert stand-ins."""
    for name in ("fairseq", "fairseq.logging", "fairseq.logging.meters"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))

    class AverageMeter:
        def __init__(self):
            self.val, self.sum, self.count = 0.5, np.float64(3.0), 6

    AverageMeter.__module__, AverageMeter.__qualname__ = "fairseq.logging.meters", "AverageMeter"
    sys.modules["fairseq.logging.meters"].AverageMeter = AverageMeter
    ckpt = dict(tiny)
    ckpt["args"] = argparse.Namespace(arch="data2vec_multi", lr=[5e-5])
    ckpt["extra_state"] = {"metrics": {"train": [("loss", AverageMeter())]}, "np": np.float32(1.5)}
    torch.save(ckpt, tmp_path / "extras.pt")
    monkeypatch.delitem(sys.modules, "fairseq.logging.meters")  # loading must not need it
    raw = safe_torch_load(tmp_path / "extras.pt")
    assert type(raw["args"]).__name__ == "Namespace"
    assert type(raw["extra_state"]["metrics"]["train"][0][1]).__name__ == "AverageMeter"
    assert load_encoder(tmp_path / "extras.pt").cfg == VARIANTS["tiny"]


def test_sslam_info_and_convert_cli(tmp_path, capsys):
    from sslam.cli import main

    assert main(["info", str(TINY)]) == 0
    assert "fairseq-pretrain" in capsys.readouterr().out
    assert main(["convert", str(TINY), str(tmp_path / "o"), "--weights", "teacher"]) == 0
    assert (tmp_path / "o" / "model.safetensors").exists()
    assert main(["info", str(tmp_path / "nothing.pt")]) == 2
    assert "no such file" in capsys.readouterr().err
