"""`sslam extract`: files, folders, manifests, bad files, resume, atomic outputs."""

import numpy as np
import pytest
import soundfile as sf
from conftest import GOLDEN

from sslam.cli import main
from sslam.extract import FileSink, collect_inputs

CKPT = str(GOLDEN / "tiny_ckpt.pt")


@pytest.fixture()
def audio_dir(tmp_path):
    root = tmp_path / "audio"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    sf.write(root / "a.wav", rng.standard_normal(16000) * 0.1, 16000)
    sf.write(root / "sub" / "b.flac", rng.standard_normal(30000) * 0.1, 22050)
    sf.write(root / "sub" / "c.wav", rng.standard_normal((8000, 2)) * 0.1, 8000)
    (root / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    return root


def test_decoding_runs_a_bounded_number_of_clips_ahead(monkeypatch):
    """The decoding threads stay at most ``ahead`` clips before the consumer (a pool given every
    input at once held all the decoded clips of a large folder in memory), keep the order, and
    start no more once the consumer stops."""
    import threading
    import time

    import sslam.extract as extract

    decoded, lock = [], threading.Lock()

    def fake_decode(item):
        with lock:
            decoded.append(item.key)
        return item, None, None

    monkeypatch.setattr(extract, "_decode", fake_decode)
    items = [extract.Item(str(i), None) for i in range(100)]
    clips = extract._prefetched(items, workers=2, ahead=4)
    assert next(clips)[0].key == "0"
    time.sleep(0.3)  # time for an unbounded pool to decode everything
    assert len(decoded) <= 5
    assert [item.key for item, _, _ in clips] == [str(i) for i in range(1, 100)]
    decoded.clear()
    clips = extract._prefetched(items, workers=2, ahead=4)
    next(clips)
    clips.close()
    time.sleep(0.3)
    assert len(decoded) <= 5


def test_collect_inputs(audio_dir, tmp_path):
    manifest = tmp_path / "train.tsv"
    manifest.write_text(f"{audio_dir}\na.wav\t16000\nsub/b.flac\t30000\n")
    keys = [i.key for i in collect_inputs([str(audio_dir)])]
    assert keys == ["a.wav", "broken.wav", "sub/b.flac", "sub/c.wav"]
    items = collect_inputs([str(manifest)])
    assert [i.key for i in items] == ["a.wav", "sub/b.flac"] and items[1].path == audio_dir / "sub" / "b.flac"
    assert collect_inputs([str(manifest)], manifest_root="/elsewhere")[0].path.as_posix() == "/elsewhere/a.wav"


def test_folders_list_every_suffix_libsndfile_decodes(tmp_path):
    rng = np.random.default_rng(1)
    sf.write(tmp_path / "speech.opus", rng.uniform(-0.5, 0.5, 4800), 48000, format="OGG", subtype="OPUS")
    sf.write(tmp_path / "tone.aifc", rng.uniform(-0.5, 0.5, 4800), 48000, format="AIFF", subtype="FLOAT")
    (tmp_path / "notes.txt").write_text("not audio")
    assert [i.key for i in collect_inputs([str(tmp_path)])] == ["speech.opus", "tone.aifc"]


def test_extract_to_one_file_reports_bad_files_and_resumes(audio_dir, tmp_path, capsys):
    out = tmp_path / "emb.npz"
    args = ["extract", str(audio_dir), "--checkpoint", CKPT, "--out", str(out), "--granularity", "all",
            "--batch-size", "2", "--no-progress"]
    assert main(args) == 1  # one bad file, no --skip-errors
    text = capsys.readouterr()
    assert "broken.wav" in text.out + text.err and "1 failed" in text.out
    with np.load(out) as data:
        assert sorted(data["keys"].tolist()) == ["a.wav", "sub/b.flac", "sub/c.wav"]
        assert data["utterance"].shape == (3, 64) and data["frames"].shape[2] == 64
        assert data["timestamps"].shape[:2] == data["timestamp_mask"].shape
        first = data["utterance"].copy()
    assert main(args + ["--skip-errors"]) == 0  # re-run: the three are skipped, the bad one fails again
    assert "3 already done" in capsys.readouterr().out
    with np.load(out) as data:
        np.testing.assert_array_equal(data["utterance"], first)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".emb.npz")]
    assert leftovers == []


def test_extract_to_folder(audio_dir, tmp_path, capsys):
    out = tmp_path / "feats"
    assert main(["extract", str(audio_dir / "a.wav"), str(audio_dir / "sub" / "c.wav"), "--checkpoint", CKPT,
                 "--out", str(out), "--granularity", "timestamps", "--no-progress"]) == 0
    with np.load(out / "c.wav.npz") as data:
        assert data["timestamps"].shape == (64, 64) and data["times"].shape == (64,)
        assert "utterance" not in data
    assert "2 embedded" in capsys.readouterr().out


def test_file_sink_round_trip(tmp_path):
    sink = FileSink(tmp_path / "x.npz")
    for key, rows in (("a", 3), ("b", 5)):
        sink.add(key, {"num_rows": np.int64(rows), "utterance": np.ones(4) * rows,
                       "frames": np.ones((rows * 2, 4)), "frame_mask": np.ones(rows * 2, bool),
                       "timestamps": np.ones((rows, 4)), "timestamp_mask": np.ones(rows, bool),
                       "times": np.arange(rows, dtype=np.float32)}, None)
    sink.flush()
    again = FileSink(tmp_path / "x.npz")
    assert again.items["a"]["frames"].shape == (6, 4) and again.items["b"]["times"].shape == (5,)


def test_bad_arguments(tmp_path, audio_dir, capsys):
    (tmp_path / "empty.wav").mkdir()
    assert main(["extract", str(tmp_path / "empty.wav"), "--checkpoint", CKPT, "--out", str(tmp_path / "o.npz")]) == 2
    assert "no audio files" in capsys.readouterr().err
    # A folder without audio among other inputs is named; it used to vanish from the run.
    assert main(["extract", str(tmp_path / "empty.wav"), str(audio_dir / "a.wav"), "--checkpoint", CKPT,
                 "--out", str(tmp_path / "o.npz")]) == 2
    assert "empty.wav: no audio files" in capsys.readouterr().err and not (tmp_path / "o.npz").exists()
