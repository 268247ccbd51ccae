"""Checkpoints named on the Hugging Face Hub (sslam.hub). Nothing is downloaded here: the Hub's
download function is replaced by one that copies files of a local "repository" into a local
cache folder, as the real one does, raising the library's own errors."""

import shutil
from pathlib import Path

import pytest
import torch

from sslam.checkpoint import CheckpointError, convert, load_encoder, save_encoder
from sslam.cli import main
from sslam.hub import parse_hub_name
from sslam.model import VARIANTS, Encoder

hub = pytest.importorskip("huggingface_hub")
from huggingface_hub.errors import (  # noqa: E402
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
)

GOLDEN_TINY = Path(__file__).parent / "data" / "golden" / "tiny_ckpt.pt"


def test_hub_names_are_parsed_or_refused_by_name():
    assert parse_hub_name("hf-hub:ta012/SSLAM_pretrain") == ("ta012/SSLAM_pretrain", None, None)
    assert parse_hub_name("hf-hub:ta012/SSLAM/SSLAM_Pretrained/checkpoint_last.pt@v1") == (
        "ta012/SSLAM", "SSLAM_Pretrained/checkpoint_last.pt", "v1")
    for bad in ("hf-hub:ta012", "hf-hub:ta012/", "hf-hub:/x", "hf-hub:a//b", "hf-hub:a/b@", "hf-hub:a/b@c@d"):
        with pytest.raises(CheckpointError, match="named hf-hub:OWNER/NAME"):
            parse_hub_name(bad)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """Repositories under tmp_path/repos/OWNER/NAME; downloads land in tmp_path/cache as the
    Hub's snapshot folders. Returns the list of (repo, filename, revision) requested."""
    requests = []

    def hf_hub_download(repo_id, filename, *, revision=None, **_):
        requests.append((repo_id, filename, revision))
        if repo_id == "nobody/nothing":
            raise RepositoryNotFoundError("404 Client Error. Repository Not Found for url: ...", response=_response())
        if repo_id == "offline/cache":
            raise LocalEntryNotFoundError("Cannot find the requested files in the disk cache.")
        source = tmp_path / "repos" / repo_id / filename
        if not source.is_file():
            raise RemoteEntryNotFoundError(f"404 Client Error. Entry Not Found: {filename}", response=_response())
        target = tmp_path / "cache" / repo_id.replace("/", "--") / "snapshots" / (revision or "main") / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        return str(target)

    monkeypatch.setattr(hub, "hf_hub_download", hf_hub_download)
    return requests


def _response():
    import httpx2  # what huggingface_hub's HTTP errors carry

    return httpx2.Response(404, request=httpx2.Request("GET", "https://huggingface.co"))


def test_a_repository_and_a_file_in_one_load_as_local_ones(tmp_path, fake_hub):
    model = Encoder(VARIANTS["tiny"]).eval()
    model.label_names = None
    save_encoder(model, tmp_path / "repos" / "someone" / "tiny")
    loaded = load_encoder("hf-hub:someone/tiny@abc123")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert fake_hub == [("someone/tiny", "config.json", "abc123"), ("someone/tiny", "model.safetensors", "abc123")]
    # A model folder inside a repository.
    save_encoder(model, tmp_path / "repos" / "someone" / "models" / "tiny_v2")
    fake_hub.clear()
    assert torch.equal(load_encoder("hf-hub:someone/models/tiny_v2").cls_token, model.cls_token)
    assert fake_hub == [("someone/models", name, None) for name in
                        ("tiny_v2", "tiny_v2/config.json", "tiny_v2/model.safetensors")]
    # One file of a repository: an official fairseq checkpoint in a subfolder.
    official = tmp_path / "repos" / "ta012" / "SSLAM" / "SSLAM_Pretrained" / "checkpoint_last.pt"
    official.parent.mkdir(parents=True)
    shutil.copyfile(GOLDEN_TINY, official)
    teacher = load_encoder("hf-hub:ta012/SSLAM/SSLAM_Pretrained/checkpoint_last.pt", weights="teacher")
    expected = load_encoder(GOLDEN_TINY, weights="teacher")
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in expected.state_dict().items())
    # convert records the Hub name it read.
    out = convert("hf-hub:ta012/SSLAM/SSLAM_Pretrained/checkpoint_last.pt", tmp_path / "converted")
    import json

    assert json.loads((out / "config.json").read_text())["source"]["file"] == (
        "hf-hub:ta012/SSLAM/SSLAM_Pretrained/checkpoint_last.pt")


def test_hub_failures_are_named(tmp_path, fake_hub, capsys):
    (tmp_path / "repos" / "someone" / "empty").mkdir(parents=True)
    cases = {
        "hf-hub:someone/empty": "the repository someone/empty holds neither model.safetensors nor pytorch_model.bin",
        "hf-hub:someone/empty/missing.pt": "the repository someone/empty has no file missing.pt, nor "
                                           "missing.pt/model.safetensors nor missing.pt/pytorch_model.bin",
        "hf-hub:nobody/nothing": r"cannot download config.json from the Hugging Face Hub \(RepositoryNotFoundError",
        "hf-hub:offline/cache": "config.json is not in the local Hub cache and cannot be downloaded now",
    }
    for name, message in cases.items():
        with pytest.raises(CheckpointError, match=f"{name}: {message}"):
            load_encoder(name)
    assert main(["info", "hf-hub:someone/empty"]) == 2
    assert "hf-hub:someone/empty: the repository someone/empty holds neither" in capsys.readouterr().err


def test_without_huggingface_hub_the_missing_package_is_named(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    with pytest.raises(CheckpointError, match=r"hf-hub:a/b: reading from the Hugging Face Hub needs huggingface_hub"):
        load_encoder("hf-hub:a/b")


def test_extract_and_pretraining_take_hub_names(tmp_path, fake_hub):
    import numpy as np
    import soundfile as sf

    from sslam.train import Trainer, preset

    official = tmp_path / "repos" / "ta012" / "SSLAM" / "SSLAM_Pretrained" / "checkpoint_last.pt"
    official.parent.mkdir(parents=True)
    shutil.copyfile(GOLDEN_TINY, official)
    name = "hf-hub:ta012/SSLAM/SSLAM_Pretrained/checkpoint_last.pt"
    sf.write(tmp_path / "a.wav", np.random.default_rng(0).uniform(-0.1, 0.1, 16000), 16000)
    assert main(["extract", str(tmp_path / "a.wav"), "--checkpoint", name, "--out", str(tmp_path / "emb.npz"),
                 "--no-progress"]) == 0
    cfg = preset("tiny", 1)
    cfg.run.init, cfg.run.out, cfg.optim.max_steps = name, str(tmp_path / "run"), 1
    trainer = Trainer(cfg, log=lambda *a: None)
    expected = load_encoder(GOLDEN_TINY)
    assert all(torch.equal(trainer.model.student.state_dict()[k], v) for k, v in expected.state_dict().items())
