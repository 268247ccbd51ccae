"""`sslam extract`: files, folders, manifests, bad files, resume, atomic outputs."""

import os

import numpy as np
import pytest
import soundfile as sf
from conftest import GOLDEN

from sslam.cli import main
from sslam.extract import FileSink, collect_inputs, output_lock

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
    assert leftovers == [".emb.npz.lock"]  # the run's lock, kept; no temporary files


def test_extract_to_folder(audio_dir, tmp_path, capsys):
    out = tmp_path / "feats"
    assert main(["extract", str(audio_dir / "a.wav"), str(audio_dir / "sub" / "c.wav"), "--checkpoint", CKPT,
                 "--out", str(out), "--granularity", "timestamps", "--no-progress"]) == 0
    with np.load(out / "c.wav.npz") as data:
        assert data["timestamps"].shape == (64, 64) and data["times"].shape == (64,)
        assert "utterance" not in data
    assert "2 embedded" in capsys.readouterr().out


@pytest.mark.parametrize("out_name", ["emb.npz", "feats"])
def test_a_second_run_writing_the_same_output_is_refused(audio_dir, tmp_path, capsys, out_name):
    """Two runs writing one .npz each rewrote it from their own rows at every flush: both said
    "embedded", and the file kept only the rows of the one that flushed last."""
    out = tmp_path / out_name
    args = ["extract", str(audio_dir / "a.wav"), "--checkpoint", CKPT, "--out", str(out), "--no-progress"]
    with output_lock(out):  # another run holds it
        assert main(args) == 2
        assert "another sslam extract is writing to it" in capsys.readouterr().err
        assert not list(tmp_path.rglob("*.npz"))  # nothing written
    assert main(args) == 0  # once it has finished


def test_a_run_removes_what_a_killed_run_was_writing(audio_dir, tmp_path):
    stale = [tmp_path / ".emb.npz.k2j3.tmp", tmp_path / "feats" / "sub" / ".c.wav.npz.x8q.tmp"]
    kept = tmp_path / ".other.npz.k2j3.tmp"  # not this output's
    for path in [*stale, kept]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half a file")
    for out in ("emb.npz", "feats"):
        assert main(["extract", str(audio_dir / "a.wav"), "--checkpoint", CKPT, "--out", str(tmp_path / out),
                     "--no-progress"]) == 0
    assert not any(path.exists() for path in stale) and kept.exists()


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


def _write(path, seconds, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.random.default_rng(seed).standard_normal(int(16000 * seconds)) * 0.1, 16000)


@pytest.mark.parametrize("out_name", ["emb.npz", "feats"])
def test_resume_knows_each_output_by_the_file_it_came_from(tmp_path, capsys, out_name):
    """Keys of files with one name depend on the inputs given together: a/x.wav and b/x.wav
    together are 'x.wav' and b's full path, b/x.wav alone is 'x.wav'. A re-run with b alone was
    'already done' with a's embedding; it is refused now. A file changed since its embedding is
    embedded again; the same file moved or copied elsewhere is still done, and another file of
    the same size and time is not taken for it."""
    a, b = tmp_path / "a" / "x.wav", tmp_path / "b" / "x.wav"
    _write(a, 1.0, seed=1)
    _write(b, 1.5, seed=2)
    out = tmp_path / out_name
    run = lambda *inputs: main(["extract", *map(str, inputs), "--checkpoint", CKPT, "--out", str(out),  # noqa: E731
                                "--no-progress"])
    assert run(a, b) == 0 and "2 embedded" in capsys.readouterr().out
    assert run(b) == 2
    assert f"'x.wav' holds the embedding of {a}, not of {b}" in capsys.readouterr().err
    _write(a, 2.0, seed=3)  # changed in place
    assert run(a, b) == 0 and "1 embedded (1 changed since), 1 already done" in capsys.readouterr().out
    moved = tmp_path / "moved" / "x.wav"
    moved.parent.mkdir()
    a.rename(moved)  # same size and time
    assert run(moved, b) == 0 and "0 embedded, 2 already done" in capsys.readouterr().out
    copied = tmp_path / "copied" / "x.wav"
    copied.parent.mkdir()
    copied.write_bytes(moved.read_bytes())  # a new time
    assert run(copied, b) == 0 and "0 embedded, 2 already done" in capsys.readouterr().out
    other = tmp_path / "other" / "x.wav"
    _write(other, 2.0, seed=4)  # a's size
    os.utime(other, ns=(moved.stat().st_atime_ns, moved.stat().st_mtime_ns))
    assert run(other, b) == 2 and "holds the embedding of" in capsys.readouterr().err


def test_a_file_changed_in_place_beyond_its_digest_is_embedded_again(tmp_path, capsys):
    """Regression: a file changed in place between its first and last 64 KiB (the digest) kept
    its old embedding though its modification time had changed."""
    clip = tmp_path / "long.wav"
    _write(clip, 10.0, seed=1)  # 320 KB
    out = tmp_path / "emb.npz"
    run = lambda: main(["extract", str(clip), "--checkpoint", CKPT, "--out", str(out), "--no-progress"])  # noqa: E731
    assert run() == 0 and "1 embedded" in capsys.readouterr().out
    wave, rate = sf.read(clip, dtype="float32")
    wave[16000 * 4 : 16000 * 6] = 0.0  # the middle only: same size, same first and last 64 KiB
    sf.write(clip, wave, rate)
    os.utime(clip, ns=(clip.stat().st_atime_ns, clip.stat().st_mtime_ns + 10**9))
    assert run() == 0 and "1 embedded (1 changed since)" in capsys.readouterr().out


def test_output_names_are_unique_and_folder_outputs_do_not_share_files(tmp_path, capsys):
    """A renamed key could be another input's (A/B/x.wav is 'B/x.wav' in folder A, and B/x.wav's
    full path used to be 'B/x.wav' when given relative): one row was lost. In a folder output
    '..' was dropped from a manifest's paths, so '../x.wav' and 'x.wav' wrote one file."""
    from sslam.extract import FolderSink

    for path, seed in ((tmp_path / "A" / "x.wav", 1), (tmp_path / "A" / "B" / "x.wav", 2),
                       (tmp_path / "B" / "x.wav", 3), (tmp_path / "root" / "sub" / "x.wav", 4)):
        _write(path, 0.5, seed)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        keys = [item.key for item in collect_inputs(["A", "B/x.wav"])]
    finally:
        os.chdir(cwd)
    assert len(set(keys)) == 3 and keys[:2] == ["B/x.wav", "x.wav"]
    (tmp_path / "m.tsv").write_text(f"{tmp_path / 'root' / 'sub'}\n../../A/x.wav\t8000\nx.wav\t8000\n")
    sink = FolderSink(tmp_path / "feats")
    keys = ("../x.wav", "x.wav", "/x.wav", "__abs__/x.wav", "__up__/x.wav", "/__abs__/x.wav")
    assert len({sink.target(key) for key in keys}) == len(keys)
    assert sink.target("../x.wav") == tmp_path / "feats" / "__up__" / "x.wav.npz"
    assert main(["extract", str(tmp_path / "m.tsv"), "--checkpoint", CKPT, "--out", str(tmp_path / "feats"),
                 "--no-progress"]) == 0
    assert sorted(p.relative_to(tmp_path / "feats").as_posix() for p in (tmp_path / "feats").rglob("*.npz")) == [
        "__up__/__up__/A/x.wav.npz", "x.wav.npz"]


def test_extract_arguments_and_names_that_are_not_utf8(tmp_path, audio_dir, capsys, monkeypatch):
    """batch_size is checked before any decoding (a bad one failed after decoding every file and
    holding them all); a failure whose file name is not UTF-8 is printed escaped (it aborted
    the run with a UnicodeEncodeError); '.NPZ' is a file output; a device sslam does not run on
    is a one-line error."""
    import sslam.extract as extract
    from sslam.checkpoint import load_encoder

    monkeypatch.setattr(extract, "_decode", lambda item: pytest.fail("decoded before checking batch_size"))
    with pytest.raises(ValueError, match=r"batch_size=0: must be a positive integer"):
        extract.run_extract(load_encoder(CKPT), [str(audio_dir)], str(tmp_path / "o.npz"), batch_size=0)
    monkeypatch.undo()
    summary = extract.Report(failed=[("caf\udce9.wav", "not audio")]).summary()
    assert "caf\\udce9.wav" in summary and summary.encode("utf-8")
    bad = os.fsencode(tmp_path) + b"/caf\xe9.wav"
    with open(bad, "wb") as f:
        f.write(b"not audio at all")
    out = tmp_path / "UPPER.NPZ"
    assert main(["extract", os.fsdecode(bad), str(audio_dir / "a.wav"), "--checkpoint", CKPT, "--out", str(out),
                 "--no-progress"]) == 1
    assert "1 embedded" in capsys.readouterr().out and out.is_file()
    assert main(["extract", str(audio_dir / "a.wav"), "--checkpoint", CKPT, "--out", str(tmp_path / "o.npz"),
                 "--device", "meta"]) == 2
    assert "device='meta': sslam runs on 'cpu' or 'cuda' devices" in capsys.readouterr().err


def test_a_long_file_is_not_embedded_beside_short_ones(tmp_path, capsys, monkeypatch):
    """Embeddings of one call are padded to its longest clip: a long file in a batch of short
    ones made each short one's frames as long as it (16 clips beside a 1-hour file: ~9 GB for
    ViT-B). Files of similar length share a call; the output keeps the input order."""
    from sslam.model import Encoder

    for i, seconds in enumerate([1.0, 30.0, 1.2, 0.9]):
        _write(tmp_path / "in" / f"{i}.wav", seconds, seed=i)
    calls, embed = [], Encoder.embed

    def recording(self, audio, *args, **kwargs):
        calls.append(sorted(round(len(wave) / 16000, 1) for wave in audio))
        return embed(self, audio, *args, **kwargs)

    monkeypatch.setattr(Encoder, "embed", recording)
    out = tmp_path / "emb.npz"
    assert main(["extract", str(tmp_path / "in"), "--checkpoint", CKPT, "--out", str(out), "--granularity", "all",
                 "--batch-size", "4", "--no-progress"]) == 0
    assert sorted(calls) == [[0.9, 1.0, 1.2], [30.0]]
    with np.load(out) as data:
        assert data["keys"].tolist() == ["0.wav", "1.wav", "2.wav", "3.wav"]
        alone = {}
        for key in ("0.wav", "1.wav"):
            single = tmp_path / f"{key}.npz"
            assert main(["extract", str(tmp_path / "in" / key), "--checkpoint", CKPT, "--out", str(single),
                         "--granularity", "all", "--no-progress"]) == 0
            with np.load(single) as one:
                alone[key] = one["utterance"][0]
        np.testing.assert_allclose(data["utterance"][0], alone["0.wav"], atol=1e-6)
        np.testing.assert_allclose(data["utterance"][1], alone["1.wav"], atol=1e-6)


def test_long_files_fill_a_call_by_their_windows(tmp_path, capsys, monkeypatch):
    """``--batch-size`` counts the encoder's windows, not files: a call whose files hold that
    many windows' samples is full, so long files are embedded alone (16 one-hour files in one
    call held 9 GB of token sums for ViT-B) while short ones still share a call."""
    from sslam.model import Encoder

    for i, seconds in enumerate([30.0, 30.0, 1.0, 1.0]):  # the tiny encoder's window: 10.26 s
        _write(tmp_path / "in" / f"{i}.wav", seconds, seed=i)
    calls, embed = [], Encoder.embed

    def recording(self, audio, *args, **kwargs):
        calls.append([round(len(wave) / 16000, 1) for wave in audio])
        return embed(self, audio, *args, **kwargs)

    monkeypatch.setattr(Encoder, "embed", recording)
    assert main(["extract", str(tmp_path / "in"), "--checkpoint", CKPT, "--out", str(tmp_path / "emb.npz"),
                 "--batch-size", "2", "--no-progress"]) == 0
    assert calls == [[30.0], [30.0], [1.0, 1.0]]
    calls.clear()  # cropped, a file is one window however long
    assert main(["extract", str(tmp_path / "in"), "--checkpoint", CKPT, "--out", str(tmp_path / "crop.npz"),
                 "--batch-size", "2", "--crop", "--no-progress"]) == 0
    assert calls == [[30.0, 30.0], [1.0, 1.0]]


def test_a_header_claims_its_length_in_samples_at_a_rate(tmp_path):
    """What a header claims, read before a file is decoded, and 0 for what is not an audio
    file; a pipe is not opened (that waits for a writer: extract hung on one in a folder)."""
    from sslam.audio import claimed_samples

    sf.write(tmp_path / "a.flac", np.zeros((22050, 2)), 22050)
    (tmp_path / "text.wav").write_text("not audio")
    os.mkfifo(tmp_path / "pipe.wav")
    assert claimed_samples(tmp_path / "a.flac", 16000) == 16000
    for name in ("text.wav", "missing.wav", "pipe.wav", "."):
        assert claimed_samples(tmp_path / name, 16000) == 0


def test_decoding_ahead_stops_at_a_budget_of_samples(monkeypatch):
    """Long files are not decoded many at a time ahead of the consumer: no file is started
    while those waiting claim, with it, over ``max_samples`` samples (as their headers say), but
    one always is, so that the next file decodes while this one is encoded."""
    from concurrent.futures import ThreadPoolExecutor

    import sslam.extract as extract

    started = []

    class Recording(ThreadPoolExecutor):
        def submit(self, fn, item):
            started.append(item.key)
            return super().submit(fn, item)

    monkeypatch.setattr(extract, "ThreadPoolExecutor", Recording)
    monkeypatch.setattr(extract, "_decode", lambda item: (item, None, None))
    monkeypatch.setattr(extract, "claimed_samples", lambda path, rate: path)  # the test's paths are sizes
    sizes = [1000] * 8 + [10**9] * 3 + [1000] * 6
    items = [extract.Item(str(i), size) for i, size in enumerate(sizes)]
    ahead = [len(started) - int(item.key) - 1 for item, _, _ in extract._prefetched(items, 2, 10, max_samples=4500)]
    assert ahead == [3, 3, 3, 3, 3, 2, 1, 1, 1, 1, 1, 3, 3, 3, 2, 1, 0]  # files started beyond the one consumed


def test_a_file_in_the_output_folder_that_is_not_an_embedding_is_refused_and_kept(audio_dir, tmp_path, capsys):
    """A file of the user's where an output goes: an .npz without our arrays was taken for a
    finished embedding (the clip never embedded, yet reported done), and an unreadable one was
    overwritten. Both are refused by name, before any work, and left as they were."""
    deep = np.array("[" * 200_000 + "]" * 200_000)  # nested past the JSON parser's recursion
    for name, content in (("foreign", None), ("text", b"keep me"), ("deep", deep)):
        out = tmp_path / name
        out.mkdir()
        target = out / "a.wav.npz"
        if content is None:
            np.savez(target, precious=np.arange(3))
        elif name == "deep":
            np.savez(target, num_rows=np.array([1]), source=content)
        else:
            target.write_bytes(content)
        before = target.read_bytes()
        assert main(["extract", str(audio_dir / "a.wav"), "--checkpoint", CKPT, "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "a.wav.npz: exists but is not an sslam embedding" in err
        assert "allow_pickle" not in err  # numpy's advice to load an unknown file unsafely
        assert target.read_bytes() == before
    # One output file, the same.
    (tmp_path / "other.npz").write_bytes(b"keep me")
    assert main(["extract", str(audio_dir / "a.wav"), "--checkpoint", CKPT, "--out", str(tmp_path / "other.npz"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "other.npz: exists but is not an sslam embeddings file (not an .npz archive)" in err, err
    assert (tmp_path / "other.npz").read_bytes() == b"keep me"


def test_run_extract_refuses_an_empty_out(audio_dir, tmp_path, monkeypatch):
    """Path("") is the current folder: the API wrote one .npz per input there."""
    from sslam.checkpoint import load_encoder
    from sslam.extract import run_extract

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="--out is empty"):
        run_extract(load_encoder(CKPT), [str(audio_dir / "a.wav")], "", progress=False)
    assert not list(tmp_path.glob("*.npz"))


def test_hop_between_the_windows_of_long_files(tmp_path, capsys):
    """--hop sets the frames between the windows of long audio, as embed(hop=) does; it is
    checked before any work and recorded, so a resume with another hop is refused."""
    import sslam

    _write(tmp_path / "in" / "long.wav", 25.0)
    out = tmp_path / "emb.npz"
    argv = ["extract", str(tmp_path / "in"), "--checkpoint", CKPT, "--granularity", "all", "--no-progress"]
    assert main([*argv, "--out", str(out), "--hop", "256"]) == 0
    expected = sslam.load_encoder(CKPT).embed(str(tmp_path / "in" / "long.wav"), hop=256)
    with np.load(out) as data:
        np.testing.assert_array_equal(data["utterance"][0], expected.utterance[0].numpy())
        np.testing.assert_array_equal(data["frames"][0], expected.frames[0].numpy())
    capsys.readouterr()
    assert main([*argv, "--out", str(out), "--hop", "512"]) == 2
    assert "'hop': 256" in capsys.readouterr().err
    # An output of the default hop (so also one written before the hop was recorded) is not
    # resumed with another; a hop with --crop (one window: it would do nothing) is refused.
    assert main([*argv, "--out", str(tmp_path / "default.npz")]) == 0
    assert main([*argv, "--out", str(tmp_path / "default.npz"), "--hop", "256"]) == 2
    assert main([*argv, "--out", str(tmp_path / "crop.npz"), "--crop"]) == 0
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "crop.npz"), "--crop", "--hop", "256"]) == 2
    assert "hop=256: crop keeps only the first window, so no hop applies" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "bad.npz"), "--hop", "100"]) == 2
    assert "hop=100: must be a positive multiple of 16 frames, at most 1024" in capsys.readouterr().err
    assert not (tmp_path / "bad.npz").exists()


def test_target_length_and_norm_as_the_official_extraction_takes_them(tmp_path, capsys):
    """The official feature_extract.py takes --target_length (512 for 5-s clips, its readme
    says), --norm_mean and --norm_std: extract takes --target-length and --norm (a preset or
    MEAN,STD) and sets them as evaluate does; a resume with others is refused, as another
    encoder would be."""
    import sslam
    from sslam.embedding import with_preprocessing

    _write(tmp_path / "in" / "five.wav", 5.0)
    clip = str(tmp_path / "in" / "five.wav")
    out = tmp_path / "emb.npz"
    argv = ["extract", str(tmp_path / "in"), "--checkpoint", CKPT, "--granularity", "all", "--no-progress"]
    assert main([*argv, "--out", str(out), "--target-length", "512", "--norm=-4.268,4.569"]) == 0
    expected = with_preprocessing(sslam.load_encoder(CKPT), norm=(-4.268, 4.569), target_length=512).embed(clip)
    with np.load(out) as data:
        assert data["frames"][0].shape[0] == 512 // 16 * 8
        np.testing.assert_array_equal(data["utterance"][0], expected.utterance[0].numpy())
        assert not np.array_equal(data["utterance"][0], sslam.load_encoder(CKPT).embed(clip).utterance[0].numpy())
    capsys.readouterr()
    assert main([*argv, "--out", str(out)]) == 2  # the checkpoint's own window, named
    assert "'target_length': 512" in capsys.readouterr().err
    assert main([*argv, "--out", str(out), "--target-length", "512", "--norm", "audioset"]) == 2
    assert "'norm': [-4.268, 4.569]" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "spc.npz"), "--norm", "spcv2"]) == 0
    for option, message in ((["--norm", "nope"], "--norm=nope: expected a preset (audioset, esc50, spcv2, spass) or"),
                            (["--norm=1,2,3"], "--norm=1,2,3: expected a preset"),
                            (["--norm=-4,0"], "MEAN,STD with a positive STD"),
                            (["--target-length", "520"], "target_length=520: must be a positive multiple of 16")):
        assert main([*argv, "--out", str(tmp_path / "bad.npz"), *option]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad.npz").exists()
