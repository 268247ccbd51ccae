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
errors = pytest.importorskip("huggingface_hub.errors")
if not hasattr(errors, "RemoteEntryNotFoundError"):  # the errors the tests raise are 2.x's
    pytest.skip("huggingface_hub older than 2.x", allow_module_level=True)
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
    assert parse_hub_name("hf-hub:a/b/folder/") == ("a/b", "folder", None)  # a folder may end with /
    for bad in ("hf-hub:ta012", "hf-hub:ta012/", "hf-hub:/x", "hf-hub:a//b", "hf-hub:a/b@", "hf-hub:a/b@c@d",
                "hf-hub: a/b", "hf-hub:a/b@ v1", "HF-HUB:a/b"):
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
    # (the config's commit is then asked for the weights: both from one commit)
    assert fake_hub == [("someone/models", "tiny_v2", None), ("someone/models", "tiny_v2/config.json", None),
                        ("someone/models", "tiny_v2/model.safetensors", "main")]
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
    broken = tmp_path / "repos" / "someone" / "broken"
    broken.mkdir(parents=True)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    # A file's fault names the Hub name given, then the cached file.
    cases["hf-hub:someone/broken"] = r"/\S*/snapshots/main/model.safetensors: "
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

    from sslam.train import Trainer
    from sslam.train_config import preset

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


def test_a_checkpoint_is_read_from_one_commit(tmp_path, monkeypatch):
    """Without @REVISION each download asks for main: a push between the config's download and
    the weights' put them in two snapshot folders, and the weights were read without it."""
    model = Encoder(VARIANTS["tiny"])
    save_encoder(model, tmp_path / "export")
    commits, asked = iter(["a" * 40, "b" * 40]), []

    def hf_hub_download(repo_id, filename, *, revision=None, **_):
        asked.append(revision)
        commit = revision or next(commits)  # main moves after the first request
        target = tmp_path / "cache" / "snapshots" / commit / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_path / "export" / filename, target)
        return str(target)

    monkeypatch.setattr(hub, "hf_hub_download", hf_hub_download)
    load_encoder("hf-hub:someone/moving")
    assert asked == [None, "a" * 40]


def _cache_repo(cache: Path, repo: str, files: dict, absent=()) -> None:
    """A repository in a Hugging Face cache as online downloads leave it: blobs, a snapshot of
    links to them, refs/main, and the files found missing recorded under .no_exist."""
    import hashlib
    import os

    commit = hashlib.sha1(repo.encode()).hexdigest()
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    for name, source in files.items():
        blob = root / "blobs" / hashlib.sha256(source.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, blob)
        link = root / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for name in absent:
        marker = root / ".no_exist" / commit / name
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()


def test_offline_the_cache_alone_is_read(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 with everything cached (the real download function, no network): a
    file the repository lacks is known from the cache's record of it, and of a repository's
    weights files the one cached is read; weights without a config load only where the cache
    records that there is none."""
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    model = Encoder(VARIANTS["tiny"].replace(num_heads=4)).eval()  # heads only its config.json tells
    save_encoder(model, tmp_path / "export")
    plain = Encoder(VARIANTS["tiny"]).eval()  # a bare state dict: its 2 heads are the default guess
    torch.save(plain.state_dict(), tmp_path / "pytorch_model.bin")
    config, weights = tmp_path / "export" / "config.json", tmp_path / "export" / "model.safetensors"
    cache = tmp_path / "cache"
    _cache_repo(cache, "someone/binonly", {"config.json": config, "pytorch_model.bin": tmp_path / "pytorch_model.bin"},
                absent=["model.safetensors"])
    _cache_repo(cache, "someone/noconfig", {"model.safetensors": weights}, absent=["config.json"])
    _cache_repo(cache, "someone/unknown", {"model.safetensors": weights})
    _cache_repo(cache, "someone/sub", {"tiny/config.json": config, "tiny/model.safetensors": weights})
    with pytest.warns(UserWarning, match="does not record num_heads"):
        assert torch.equal(load_encoder("hf-hub:someone/binonly").cls_token, plain.cls_token)
    for name in ("hf-hub:someone/noconfig", "hf-hub:someone/sub/tiny", "hf-hub:someone/sub/tiny/model.safetensors"):
        assert torch.equal(load_encoder(name).cls_token, model.cls_token), name
    # A weights file named alone is read with the config.json beside it: its 4 heads.
    assert load_encoder("hf-hub:someone/sub/tiny/model.safetensors").cfg.num_heads == 4
    with pytest.raises(CheckpointError, match="hf-hub:someone/unknown: config.json is not in the local Hub cache"):
        load_encoder("hf-hub:someone/unknown")
    # A whole repository as snapshot_download caches it, with no record of what it lacks: the
    # weights file cached is read (pytorch_model.bin was refused, model.safetensors unknown).
    _cache_repo(cache, "someone/snapshot", {"config.json": config, "pytorch_model.bin": tmp_path / "pytorch_model.bin"})
    _cache_repo(cache, "someone/configonly", {"config.json": config})
    with pytest.warns(UserWarning, match="does not record num_heads"):
        assert torch.equal(load_encoder("hf-hub:someone/snapshot").cls_token, plain.cls_token)
    with pytest.raises(CheckpointError, match=r"hf-hub:someone/configonly: neither model.safetensors nor "
                                              r"pytorch_model.bin is in the local Hub cache, and they cannot be "
                                              r"downloaded now \("):
        load_encoder("hf-hub:someone/configonly")
