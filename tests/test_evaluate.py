"""Evaluation: metrics against scikit-learn, label formats and their errors, augmentations,
a short linear probe and fine-tuning run, and the demo smoke run."""

import json
import re
import warnings
from dataclasses import asdict, replace

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import GOLDEN

from sslam.augment import mixup, roll_crop, spec_augment, spectrogram_noise
from sslam.embedding import with_preprocessing
from sslam.evaluate import (
    FinetuneConfig,
    Finetuner,
    ProbeConfig,
    apply_overrides,
    classification_loss,
    cosine,
    extract_cls,
    layer_decay_groups,
    linear_probe,
)
from sslam.labels import (
    LabelError,
    read_csv_split,
    read_fairseq_split,
    read_split,
    split_labels,
    synth_split,
)
from sslam.metrics import accuracy, average_precision, mean_average_precision
from sslam.model import Encoder, EncoderConfig

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def tiny_encoder(target_length=128) -> Encoder:
    torch.manual_seed(0)
    enc = Encoder(EncoderConfig(embed_dim=32, depth=2, num_heads=2, max_length=16)).eval()
    enc.preprocessing = {"sample_rate": 16000, "target_length": target_length, "norm": "audioset"}
    return enc


# ---- metrics --------------------------------------------------------------------------------


def test_a_single_label_head_scored_by_map_ranks_its_softmax():
    """Forced mAP on a single-label head ranks each class by its softmax probability: the
    sigmoid of a logit alone ranks clip 0 first for class 1 (sigmoid(5) > sigmoid(0)), though
    clip 1 is far likelier class 1 (its softmax 0.993 against 0.0067)."""
    from sslam.evaluate import score

    logits = torch.tensor([[10.0, 5.0], [-5.0, 0.0]])
    targets = torch.tensor([0, 1])
    assert score(logits, torch.nn.functional.one_hot(targets, 2).float(), multilabel=False, metric="mAP") == ("mAP", 1.0)
    assert score(logits, targets, multilabel=False) == ("accuracy", 1.0)


@pytest.mark.parametrize("ties", [False, True])
def test_average_precision_matches_sklearn(ties):
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(80, 7, generator=g)
    if ties:
        scores = torch.round(scores * 2) / 2
    targets = (torch.rand(80, 7, generator=g) < 0.3).float()
    targets[:, 6] = 0  # a class without positives: AP 0, as scikit-learn (since 1.1) scores it
    ours = average_precision(scores, targets)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "No positive class found in y_true"
        refs = [sklearn_metrics.average_precision_score(targets[:, k].numpy(), scores[:, k].numpy()) for k in range(7)]
    for k in range(7):
        assert ours[k].item() == pytest.approx(refs[k], abs=1e-12)
    assert ours[6].item() == 0.0
    # The official evaluation: the NaN-mean of those scores, the class without positives counted.
    assert mean_average_precision(scores, targets) == pytest.approx(float(np.nanmean(refs)), abs=1e-12)


def test_accuracy_by_hand():
    scores = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert accuracy(scores, torch.tensor([1, 0, 0])) == pytest.approx(2 / 3)
    assert accuracy(scores, torch.eye(2)[[1, 0, 0]]) == pytest.approx(2 / 3)
    scores[2, 0] = float("nan")  # argmax picked the NaN: a diverged model scored 2/3
    with pytest.raises(ValueError, match=r"scores contain NaN \(first in row 2\)"):
        accuracy(scores, torch.tensor([1, 0, 0]))


def test_losses():
    logits, targets = torch.randn(4, 3), torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 1, 1], [0, 0, 1]])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / 7
    assert classification_loss(logits, targets, multilabel=True).item() == pytest.approx(bce.item())
    onehot = torch.eye(3)[[0, 2, 1, 1]]
    ce = torch.nn.functional.cross_entropy(logits, onehot.argmax(1), label_smoothing=0.1)
    assert classification_loss(logits, onehot, multilabel=False).item() == pytest.approx(ce.item(), rel=1e-6)


def test_processes_share_the_bce_denominator():
    """Two processes with unequal label sums (3 and 1 here), each dividing its BCE by their
    mean label sum: the mean of their gradients (DDP's) is the gradient of the whole batch's
    BCE over all its labels, as fairseq's sample-size division gives. Their own sums would
    weight the second process's clips three times more."""
    logits = torch.randn(4, 3, requires_grad=True)
    targets = torch.tensor([[1.0, 0, 1], [0, 1, 0], [0, 0, 1], [0, 0, 0]])
    whole = classification_loss(logits, targets, multilabel=True)
    (expected,) = torch.autograd.grad(whole, logits)
    mean_sum = (targets[:2].sum() + targets[2:].sum()) / 2
    parts = [classification_loss(logits[i:i + 2], targets[i:i + 2], True, label_sum=mean_sum) for i in (0, 2)]
    (got,) = torch.autograd.grad(sum(parts) / 2, logits)
    torch.testing.assert_close(got, expected)


# ---- labels ---------------------------------------------------------------------------------


@pytest.fixture()
def fairseq_split(tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    for name in ("a", "b", "c"):
        sf.write(audio / f"{name}.wav", np.random.default_rng(0).standard_normal(8000) * 0.1, 16000)
    (tmp_path / "train.tsv").write_text(f"{audio}\na.wav\t32000\nb.wav\t32000\nc.wav\t32000\n")
    (tmp_path / "train.lbl").write_text("a\t/m/dog,/m/cat\nb\tBird\nc\t/m/cat\n")
    (tmp_path / "label_descriptors.csv").write_text('index,mid,display_name\n0,/m/dog,Dog\n1,/m/cat,"Cat"\n2,/m/bird,Bird\n')
    return tmp_path


def test_fairseq_labels(fairseq_split):
    split = read_fairseq_split(fairseq_split / "train.tsv", fairseq_split / "label_descriptors.csv")
    assert split.class_names == ["Dog", "Cat", "Bird"] and split.multilabel
    assert split.targets.tolist() == [[1, 1, 0], [0, 0, 1], [0, 1, 0]]
    assert split.items[1] == fairseq_split / "audio" / "b.wav"


def test_fairseq_label_errors(fairseq_split):
    d = fairseq_split
    (d / "train.lbl").write_text("a\t/m/dog\nb\t/m/unicorn\nc\t/m/cat\n")
    with pytest.raises(LabelError, match=r"train.lbl:2: unknown label '/m/unicorn'"):
        read_fairseq_split(d / "train.tsv", d / "label_descriptors.csv")
    # Labels pair with clips by line: ids of the manifest's clips in another order are refused.
    (d / "train.lbl").write_text("c\t/m/dog\na\t/m/dog\nb\t/m/cat\n")
    with pytest.raises(LabelError, match=r"train.lbl:1: labels of 'c' where the manifest .*train.tsv has a.wav"):
        read_fairseq_split(d / "train.tsv", d / "label_descriptors.csv")
    (d / "train.lbl").write_text("id1\t/m/dog\nid2\t/m/dog\nid3\t/m/cat\n")  # ids of their own: by line
    assert read_fairseq_split(d / "train.tsv", d / "label_descriptors.csv").targets[2].tolist() == [0, 1, 0]
    (d / "train.lbl").write_text("a\t/m/dog\n")
    with pytest.raises(LabelError, match="1 label lines for the 3 entries of"):
        read_fairseq_split(d / "train.tsv", d / "label_descriptors.csv")
    (d / "train.lbl").write_text("a\t/m/dog\nb\t/m/dog\nc\t/m/dog\n")
    (d / "audio" / "c.wav").unlink()
    with pytest.raises(LabelError, match="1 audio file\\(s\\) not found"):
        read_fairseq_split(d / "train.tsv", d / "label_descriptors.csv")
    (d / "empty.tsv").write_text(f"{d}\n")
    (d / "empty.lbl").write_text("")
    with pytest.raises(LabelError, match="empty split"):
        read_fairseq_split(d / "empty.tsv", d / "label_descriptors.csv")
    with pytest.raises(LabelError, match="needs --label-descriptors"):
        read_split(str(d / "train.tsv"), train=True)


def test_a_stray_quote_in_a_csv_is_named_by_file_and_line(tmp_path):
    """An unterminated quote swallowed the rest of a large file into one field, and Python's
    csv module then raised its own error (a traceback: field larger than field limit)."""
    text = 'path,labels\na.wav,"lo\n' + "".join(f"c{i}.wav,hi\n" for i in range(20_000))
    (tmp_path / "stray.csv").write_text(text)
    with pytest.raises(LabelError, match=r"stray\.csv:2: unreadable CSV \(field larger than field limit"):
        read_csv_split(tmp_path / "stray.csv")


def test_the_command_reads_labels_first_and_notes_test_clips_it_trains_on(tmp_path, capsys):
    """A typo in a label file is named before a (slow, perhaps downloaded) checkpoint is read,
    and a test split that shares clips with the training split is said to, since its score is
    then not a held-out one."""
    from sslam.checkpoint import save_encoder
    from sslam.cli import main

    for i in range(4):
        sf.write(tmp_path / f"{i}.wav", np.random.default_rng(i).standard_normal(16000) * 0.1, 16000)
    (tmp_path / "train.csv").write_text("path,labels\n0.wav,a\n1.wav,b\n2.wav,a\n3.wav,b\n")
    (tmp_path / "test.csv").write_text("path,labels\n3.wav,b\n2.wav,a\n")
    (tmp_path / "typo.csv").write_text('path,labels\n0.wav,"a\n')
    assert main(["evaluate", "linear", "--checkpoint", str(tmp_path / "missing.pt"), "--train",
                 str(tmp_path / "typo.csv"), "--test", str(tmp_path / "test.csv")]) == 2
    assert "typo.csv" in capsys.readouterr().err
    save_encoder(tiny_encoder(), tmp_path / "enc")
    assert main(["evaluate", "linear", "--checkpoint", str(tmp_path / "enc"), "--train", str(tmp_path / "train.csv"),
                 "--test", str(tmp_path / "test.csv"), "--epochs=1", "--batch_size=2", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "note: 2 test clip(s) are also training clips (e.g. " in err and "3.wav" in err, err
    # --select=best prints the epoch each seed's score comes from (2 clips a batch: 2 an epoch)
    assert main(["evaluate", "linear", "--checkpoint", str(tmp_path / "enc"), "--train", str(tmp_path / "train.csv"),
                 "--test", str(tmp_path / "test.csv"), "--epochs=2", "--batch_size=2", "--select=best",
                 "--seeds", "2", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out.splitlines()
    epochs = json.loads(printed[-1])["per_seed_epoch"]
    assert len(epochs) == 2 and set(epochs) <= {1, 2} and f"best epochs {epochs} on the test split" in printed[-2]


def test_label_file_messages_say_where_names_and_paths_come_from(tmp_path):
    sf.write(tmp_path / "x.wav", np.zeros(4000) + 0.1, 16000)
    (tmp_path / "train.csv").write_text("path,labels\nx.wav,dog\n")
    (tmp_path / "test.csv").write_text("path,labels\nx.wav,zzz\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "moved.csv").write_text("path,labels\nx.wav,dog\n")
    train = read_csv_split(tmp_path / "train.csv")
    with pytest.raises(LabelError, match=r"test\.csv:2: unknown label 'zzz' \(not among the training split's "
                                         r"classes; --label-descriptors names every class\)"):
        read_csv_split(tmp_path / "test.csv", class_names=train.class_names)
    with pytest.raises(LabelError, match=rf"not found, e\.g\. .*relative paths are read from the CSV's folder, "
                                         rf"{re.escape(str(tmp_path / 'sub'))}\)"):
        read_csv_split(tmp_path / "sub" / "moved.csv")


def test_csv_labels(tmp_path):
    for name in ("x", "y"):
        sf.write(tmp_path / f"{name}.wav", np.zeros(4000) + 0.1, 16000)
    (tmp_path / "train.csv").write_text('path,labels\nx.wav,"dog;cat"\ny.wav,bird\n')
    split = read_csv_split(tmp_path / "train.csv")
    assert split.class_names == ["bird", "cat", "dog"] and split.targets.tolist() == [[0, 1, 1], [1, 0, 0]]
    (tmp_path / "test.csv").write_text("path,labels\nx.wav,lion\n")
    with pytest.raises(LabelError, match="test.csv:2: unknown label 'lion'"):
        read_csv_split(tmp_path / "test.csv", class_names=split.class_names)
    (tmp_path / "bad.csv").write_text("file,label\n")
    with pytest.raises(LabelError, match="header 'path,labels'"):
        read_csv_split(tmp_path / "bad.csv")
    # Unquoted commas separate labels when the header has two columns; other columns are not
    # labels (an ESC-50 fold column made a multi-label task with classes '1' and '2').
    (tmp_path / "loose.csv").write_text("path,labels\nx.wav,dog,cat\ny.wav,bird\n")
    assert read_csv_split(tmp_path / "loose.csv").targets.tolist() == [[0, 1, 1], [1, 0, 0]]
    (tmp_path / "trailing.csv").write_text("path,labels,\nx.wav,dog,cat\ny.wav,bird,\n")  # a spreadsheet's comma
    assert read_csv_split(tmp_path / "trailing.csv").targets.tolist() == [[0, 1, 1], [1, 0, 0]]
    (tmp_path / "folds.csv").write_text("path,labels,fold\nx.wav,dog,1\ny.wav,cat,2\n")
    folds = read_csv_split(tmp_path / "folds.csv")
    assert folds.class_names == ["cat", "dog"] and not folds.multilabel
    for header, row in (("path,labels,fold", "x.wav,dog,cat,1"), ("path,labels,fold,", "x.wav,dog,cat,1"),
                        ("path,labels,fold", "x.wav,dog,cat,"), ("path,labels,fold", "x.wav,,dog,1")):
        # 'cat' read as the fold; 'dog' dropped
        (tmp_path / "long.csv").write_text(f"{header}\n{row}\n")
        with pytest.raises(LabelError, match=r"long.csv:2: 4 fields for the 3 columns of the header; quote"):
            read_csv_split(tmp_path / "long.csv")
    # A clip listed twice (here with other labels) is refused, naming both lines.
    (tmp_path / "twice.csv").write_text(f"path,labels\nx.wav,dog\ny.wav,cat\n{tmp_path / 'x.wav'},cat\n")
    with pytest.raises(LabelError, match=r"twice.csv:4: .*x.wav is listed again \(first at .*twice.csv:2\)"):
        read_csv_split(tmp_path / "twice.csv")


def test_display_names_with_commas_are_one_label(tmp_path):
    """AudioSet display names hold commas: with the descriptors, a CSV (labels by mid or name)
    and a .lbl file keep 'Male speech, man speaking' whole, and the classes are the
    descriptors' (a class no train clip has still gets its column)."""
    for name in ("x", "y", "z"):
        sf.write(tmp_path / f"{name}.wav", np.zeros(4000) + 0.1, 16000)
    (tmp_path / "desc.csv").write_text('index,mid,display_name\n0,/m/09x0r,Speech\n'
                                       '1,/m/05zppz,"Male speech, man speaking"\n2,/m/new,Bird\n')
    (tmp_path / "train.csv").write_text('path,labels\nx.wav,"Male speech, man speaking"\n'
                                        'y.wav,"Speech,Male speech, man speaking"\nz.wav,/m/09x0r;/m/new\n')
    split = read_split(str(tmp_path / "train.csv"), train=True, descriptors=str(tmp_path / "desc.csv"))
    assert split.class_names == ["Speech", "Male speech, man speaking", "Bird"]
    assert split.targets.tolist() == [[0, 1, 0], [1, 1, 0], [1, 0, 1]]
    (tmp_path / "x.tsv").write_text(f"{tmp_path}\nx.wav\t32000\n")
    (tmp_path / "x.lbl").write_text("x\tMale speech, man speaking,/m/new\n")
    assert read_fairseq_split(tmp_path / "x.tsv", tmp_path / "desc.csv").targets.tolist() == [[0, 1, 1]]
    # Without descriptors every comma separates.
    assert split_labels("a,b;c") == ["a", "b", "c"] and split_labels("Male speech, man speaking") == [
        "Male speech", "man speaking"]


def test_synth_splits():
    mono, poly = synth_split("mono", True, 24), synth_split("poly", False, 12)
    assert not mono.multilabel and poly.multilabel
    assert torch.all(mono.targets.sum(1) == 1) and torch.all(poly.targets.sum(1) >= 2)
    assert torch.equal(poly.targets[3], poly.items[3][1])
    with pytest.raises(LabelError, match="synth:mono or synth:poly"):
        read_split("synth:stereo", train=True)


# ---- augmentations --------------------------------------------------------------------------


@pytest.mark.parametrize("roll", [True, False])
def test_training_clips_are_rolled_whole_then_cropped(tmp_path, roll):
    """SPEC 1.1: a training clip is rolled over its whole length, then cropped to the window, so
    any part of a clip longer than the window can be heard. (The loader used to crop first, and
    the roll only ever shuffled the first window.) Without the roll, clips are cropped on load."""
    from sslam.data import samples_for_frames
    from sslam.evaluate import _augmented_spec
    from sslam.features import preprocess

    enc = tiny_encoder(target_length=128)
    train, test = synth_split("mono", True, 4, seconds=3.0), synth_split("mono", False, 2, seconds=1.0)
    cfg = FinetuneConfig(steps=1, warmup=0, batch_size=2, roll=roll, mixup=0.0, mask_ratio=0.0, out=str(tmp_path), workers=0)
    clips, targets = next(Finetuner(enc, train, test, cfg, log=lambda *a, **k: None)._batches())
    window = samples_for_frames(128)
    assert [clip.numel() for clip in clips] == [48000 if roll else window] * 2
    augment = ProbeConfig(mixup=0.0, mask_ratio=0.0, roll=roll)
    spec, _ = _augmented_spec(enc, clips, targets, augment, np.random.default_rng(5))
    if roll:  # the draws of roll_crop, applied to the whole clips with torch.roll
        rng = np.random.default_rng(5)
        draws = [(int(rng.integers(0, clip.numel())), float(rng.beta(10.0, 10.0)) + 0.5) for clip in clips]
        clips = [torch.roll(clip, shift) * gain for clip, (shift, gain) in zip(clips, draws)]
    expected = preprocess(torch.stack(clips)[:, :window], 16000, 128, "audioset")
    assert torch.equal(spec, expected)


def test_speech_commands_noise_comes_before_mixup_and_spec_augment():
    """The official loader adds the noise and its time roll to each clip's features; mixup and
    SpecAugment run later, in the model, so masked cells stay exactly 0 and the roll does not
    move the masks. (The noise used to be added after SpecAugment.)"""
    from sslam.evaluate import _augmented_spec
    from sslam.features import preprocess

    enc = tiny_encoder(target_length=128)
    clips = [torch.randn(20000) * 0.1 for _ in range(3)]
    targets = torch.eye(3)
    cfg = ProbeConfig(mixup=0.8, mixup_prob=1.0, mask_ratio=0.5, roll=False, noise=True)
    spec, mixed = _augmented_spec(enc, clips, targets, cfg, np.random.default_rng(7))
    rng = np.random.default_rng(7)
    expected = spectrogram_noise(preprocess(torch.stack(clips), 16000, 128, "audioset"), rng)
    expected, expected_targets = mixup(expected, targets, rng, 0.8, 1.0)
    expected = spec_augment(expected, 128 * 0.5, 128 * 0.5, rng)
    assert torch.equal(spec, expected) and torch.equal(mixed, expected_targets)
    assert (spec == 0).any()  # the masks, untouched by the noise


@pytest.mark.parametrize("window", [1, 7, 10, 64])
def test_roll_crop_is_the_whole_clip_rolled_then_cropped(window):
    """Exactly torch.roll of the whole clip times the gain, cut to the window, for clips shorter
    and longer than it (and an empty one); the batch is as wide as its widest kept part."""
    clips = [torch.randn(n) for n in (10, 1, 33, 0, 5)]
    waves, lengths = roll_crop(clips, np.random.default_rng(3), window)
    assert lengths.tolist() == [min(c.numel(), window) for c in clips]
    assert waves.shape == (5, int(lengths.max()))
    rng = np.random.default_rng(3)
    for clip, wave, n in zip(clips, waves, lengths.tolist()):
        shift, gain = int(rng.integers(0, max(1, clip.numel()))), float(rng.beta(10.0, 10.0)) + 0.5
        assert torch.equal(wave[:n], (torch.roll(clip, shift) * gain)[:window])
        assert not wave[n:].any()


def test_every_process_runs_the_same_steps_per_epoch(tmp_path):
    """11 clips over 2 processes in batches of 2: each process takes 2 whole steps of the epoch
    (rank 0 used to get 6 clips, 3 batches, one more than the steps an epoch counts, so its
    epochs drifted from the other's and from a resumed run's). Evaluating draws nothing from
    the global random stream that drop-path uses (it changed the training)."""
    from sslam.runs import Dist

    train, test = synth_split("poly", True, 11), synth_split("poly", False, 4)
    cfg = FinetuneConfig(steps=1, warmup=0, batch_size=2, out=str(tmp_path), workers=0)
    ft = Finetuner(tiny_encoder(), train, test, cfg, log=lambda *a: None)
    shares = []
    for rank in (0, 1):
        ft.dist = Dist(rank, 2, 0)
        assert ft._steps_per_epoch() == 2
        shares.append(ft._epoch_indices(3).tolist())
    assert [len(share) for share in shares] == [4, 4] and not set(shares[0]) & set(shares[1])
    ft.dist = Dist(0, 1, 0)
    before = torch.get_rng_state()
    ft.evaluate()
    assert torch.equal(torch.get_rng_state(), before)


def test_speech_commands_noise_and_bce(tmp_path, monkeypatch):
    """SPEC 6.2 (Speech Commands): noise of at most 1/10 added to the normalised spectrogram,
    then a roll of -10..9 frames; SPEC 6.1: BCE on the (mixed) soft labels of a single-label
    task with --loss=bce, cross-entropy by default."""
    import sslam.evaluate as ev

    spec = torch.randn(3, 1, 40, 8)
    noisy = spectrogram_noise(spec, np.random.default_rng(4))
    rng = np.random.default_rng(4)
    for i in range(3):
        noise = torch.from_numpy(rng.random((40, 8), dtype=np.float32)) * (float(rng.random()) / 10)
        shift = int(rng.integers(-10, 10))
        assert -10 <= shift < 10
        assert torch.equal(noisy[i, 0], torch.roll(spec[i, 0] + noise, shift, dims=0))
        added = noisy[i, 0] - torch.roll(spec[i, 0], shift, dims=0)
        assert added.min() >= -1e-6 and added.max() < 0.1
    train, test = synth_split("mono", True, 4), synth_split("mono", False, 2)
    kinds = []
    loss = ev.classification_loss
    monkeypatch.setattr(ev, "classification_loss", lambda logits, targets, bce, *a: kinds.append(bce) or loss(
        logits, targets, bce, *a))
    for choice in ("auto", "bce"):
        cfg = FinetuneConfig(steps=1, warmup=0, batch_size=2, loss=choice, noise=True, out=str(tmp_path / choice),
                             workers=0)
        Finetuner(tiny_encoder(), train, test, cfg, log=lambda *a: None).fit()
    assert kinds == [False, True]
    with pytest.raises(ValueError, match=r"loss='mse': 'auto' .* or 'bce'"):
        Finetuner(tiny_encoder(), train, test, FinetuneConfig(loss="mse", out=str(tmp_path), workers=0))


def test_misspelt_fine_tuning_choices_are_refused_with_the_other_settings():
    """precision, checkpoint_blocks and loss are refused by check_settings, which `sslam
    evaluate` runs before it reads the checkpoint and both splits (they were refused only
    once a Finetuner was built, after all that reading)."""
    from sslam.evaluate import check_settings

    for setting, message in ((dict(precision="fp64"), "precision='fp64': auto, fp32, bf16 or fp16"),
                             (dict(checkpoint_blocks="some"), "checkpoint_blocks='some': one of"),
                             (dict(loss="mse"), "loss='mse': 'auto'")):
        with pytest.raises(ValueError, match=re.escape(message)):
            check_settings(FinetuneConfig(**setting))


def test_a_non_finite_loss_stops_fine_tuning_without_saving_nan_weights(tmp_path, monkeypatch):
    """A NaN loss made every weight NaN, the run went on and saved and exported them (and the
    NaN scores then failed the evaluation): it stops at the next read of the losses, keeping
    the checkpoint before, with the losses logged."""
    import sslam.evaluate as ev
    from sslam.runs import StopTraining

    loss, calls = ev.classification_loss, []

    def poisoned(*args):
        calls.append(1)
        return loss(*args) * (float("nan") if len(calls) == 3 else 1.0)

    monkeypatch.setattr(ev, "classification_loss", poisoned)
    train, test = synth_split("poly", True, 4), synth_split("poly", False, 2)
    cfg = FinetuneConfig(steps=6, warmup=0, batch_size=2, eval_every=100, ckpt_every=2, out=str(tmp_path), workers=0)
    with pytest.raises(StopTraining, match=r"step 3: the loss is not finite .* nothing was saved after .*checkpoint_"
                                           r"00000002.pt\. Try a lower lr\.$"):  # fp32 already: no other advice
        Finetuner(tiny_encoder(), train, test, cfg, log=lambda *a: None).fit()
    assert [p.name for p in sorted(tmp_path.glob("checkpoint_*"))] == ["checkpoint_00000002.pt"]
    assert not (tmp_path / "model").exists()
    # Strict JSON (the bare token NaN is refused by every JSON reader but Python's): the
    # non-finite loss is null, which pandas and jq read as missing.
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    logged = [json.loads(line, parse_constant=lambda token: pytest.fail(f"{token} in metrics.jsonl")) for line in lines]
    assert [r["step"] for r in logged] == [1, 2, 3, 4] and logged[2]["loss"] is None


def test_fine_tuning_schedule_is_fairseqs_cosine():
    """Warm-up from min_lr (fairseq's warmup_init_lr default) to the peak, then cosine down to
    min_lr: AS-20K's 5e-5 -> 1e-6 over 40,000 updates with 4,000 of warm-up (SPEC 6.2)."""
    lr = [cosine(step, 40_000, 4_000, 5e-5, 1e-6) for step in (0, 2_000, 4_000, 22_000, 40_000, 50_000)]
    assert lr == pytest.approx([1e-6, 2.55e-5, 5e-5, 2.55e-5, 1e-6, 1e-6])
    # The warm-up is 10 % of the steps unless given (a fixed 400 refused runs of 400 steps or less).
    assert FinetuneConfig(steps=300).warmup_steps == 30 and FinetuneConfig(steps=300, warmup=0).warmup_steps == 0
    assert apply_overrides(FinetuneConfig(), ["--warmup=50"]).warmup == 50
    assert apply_overrides(FinetuneConfig(warmup=5), ["--warmup=none"]).warmup is None
    # A run saved with the former fixed default resumes: the same warm-up in effect.
    from sslam.evaluate import finetune_resume_conflicts

    saved = {"config": asdict(FinetuneConfig(warmup=400))}
    identity = lambda cfg: {"config": asdict(cfg), "class_names": [], "multilabel": False,  # noqa: E731
                            "encoder_config": {}, "preprocessing": {}, "train_split": "a", "test_split": "b",
                            "start_encoder": "c", "world_size": 1}
    assert finetune_resume_conflicts(saved, identity(FinetuneConfig())) == []
    assert finetune_resume_conflicts(saved, identity(FinetuneConfig(warmup=100))) == [
        "warmup: 400 in the checkpoint, 100 now"]


def test_roll_mixup_specaugment():
    rng = np.random.default_rng(0)
    rolled, lengths = roll_crop([torch.arange(1.0, 7.0), torch.arange(1.0, 11.0)], rng, window=10)
    assert lengths.tolist() == [6, 10] and torch.all(rolled[0, 6:] == 0)
    ratio = rolled[0, :6].sum() / 21
    assert 0.5 <= ratio <= 1.5
    assert sorted((rolled[0, :6] / ratio).round().tolist()) == [1, 2, 3, 4, 5, 6]
    x, y = torch.randn(4, 1, 8, 8), torch.eye(4)
    mx, my = mixup(x, y, np.random.default_rng(1), alpha=0.8, prob=1.0)
    draws = np.random.default_rng(1)
    draws.random()  # the draw that decides whether to mix
    lam = float(draws.beta(0.8, 0.8))
    assert 0 < lam < 1 and my[0, 0].item() == pytest.approx(lam) and my[0, 3].item() == pytest.approx(1 - lam)
    assert torch.allclose(mx[0], lam * x[0] + (1 - lam) * x[3]) and torch.allclose(my.sum(1), torch.ones(4))
    same = mixup(x, y, np.random.default_rng(1), prob=0.0)
    assert same[0] is x
    spec = torch.randn(3, 1, 40, 20) + 5
    masked = spec_augment(spec, 6, 10, np.random.default_rng(2))
    for i in range(3):
        zero_cols = (masked[i, 0] == 0).all(0).sum().item()
        zero_rows = (masked[i, 0] == 0).all(1).sum().item()
        assert zero_cols < 6 and zero_rows < 10


# ---- training runs --------------------------------------------------------------------------


def test_linear_probe_fast_and_full():
    enc = tiny_encoder()
    train, test = synth_split("poly", True, 24), synth_split("poly", False, 12)
    fast = linear_probe(enc, train, test, ProbeConfig(epochs=2, batch_size=8), seeds=range(2))
    assert fast["metric"] == "mAP" and 0 < fast["mean"] <= 1 and len(fast["per_seed"]) == 2
    full = linear_probe(enc, train, test, ProbeConfig(epochs=1, batch_size=8, fast=False), seeds=[0])
    assert 0 < full["mean"] <= 1
    mono = linear_probe(enc, synth_split("mono", True, 24), synth_split("mono", False, 12), ProbeConfig(epochs=1))
    assert mono["metric"] == "accuracy"
    with pytest.raises(ValueError, match="unknown option"):
        apply_overrides(ProbeConfig(), ["--lr_max=1"])


@pytest.mark.parametrize("fast", [True, False])
def test_linear_probe_runs_the_official_number_of_updates(monkeypatch, fast):
    """The official scripts count a probe's epochs as max_update = floor(n * epochs / batch)
    (SPEC 6.2: 3,906 for SPASS's 3,750 clips, where 50 whole epochs would be 3,950): the run
    stops inside its last epoch and the cosine reaches its floor there."""
    import sslam.evaluate as ev

    rates = []
    monkeypatch.setattr(ev, "set_lr", lambda opt, lr: rates.append(lr))
    train, test = synth_split("poly", True, 10, seconds=1.0), synth_split("poly", False, 4, seconds=1.0)
    cfg = ProbeConfig(epochs=3, batch_size=4, fast=fast)  # 3 epochs of 3 batches; floor(30 / 4) = 7
    linear_probe(tiny_encoder(), train, test, cfg)
    assert rates == [cosine(step, 7, 0, cfg.lr, cfg.min_lr) for step in range(7)]


@pytest.mark.parametrize("fast", [True, False])
def test_linear_probe_best_epoch_is_the_best_of_each_epochs_head(fast):
    """--select=best reports the best score on the test split at an epoch's end, as the official
    runs pick checkpoint_best on the evaluation split (SPEC 9.12). With a constant lr the head
    after epoch k of a 3-epoch probe is the head of a k-epoch probe (the same seed draws the
    same first k epochs), so the best of those is the answer."""
    enc = tiny_encoder()
    train, test = synth_split("poly", True, 24, seconds=1.0), synth_split("poly", False, 12, seconds=1.0)
    # 24 clips: 3 whole batches an epoch. An lr this high makes the scores swing from epoch to epoch.
    constant = dict(batch_size=8, lr=1.0, min_lr=1.0, fast=fast)
    by_epoch = [linear_probe(enc, train, test, ProbeConfig(epochs=k, **constant))["mean"] for k in (1, 2, 3)]
    best = linear_probe(enc, train, test, ProbeConfig(epochs=3, select="best", **constant))
    assert max(by_epoch) not in (by_epoch[0], by_epoch[-1]), "the test would not see the first or last picked"
    assert best["mean"] == max(by_epoch)
    assert best["per_seed_epoch"] == [len(by_epoch) - by_epoch[::-1].index(max(by_epoch))]  # a tie: the later
    last = linear_probe(enc, train, test, ProbeConfig(epochs=3, **constant))
    assert last["mean"] == by_epoch[-1] and "per_seed_epoch" not in last


@pytest.mark.parametrize("fast", [True, False])
def test_linear_probe_best_epoch_scores_each_epoch_and_the_cut_last_one(monkeypatch, fast):
    """10 clips in batches of 4 for 3 epochs: floor(30 / 4) = 7 updates, so the heads after
    updates 3, 6 and 7 (the last epoch cut short) are scored, as fairseq validates at each
    epoch's end and where max_update stops the run. Equal scores pick the later epoch, as
    fairseq's is_better (a >= b) does."""
    import sslam.evaluate as ev

    updates, scored, real_score = [], [], ev.score
    monkeypatch.setattr(ev, "set_lr", lambda opt, lr: updates.append(lr))
    monkeypatch.setattr(ev, "score", lambda *a, **k: scored.append(len(updates)) or real_score(*a, **k))
    train, test = synth_split("poly", True, 10, seconds=1.0), synth_split("poly", False, 4, seconds=1.0)
    cfg = ProbeConfig(epochs=3, batch_size=4, select="best", fast=fast)
    ev.linear_probe(tiny_encoder(), train, test, cfg)
    assert scored == [3, 6, 7]
    monkeypatch.setattr(ev, "score", lambda *a, **k: ("mAP", 0.5))
    assert ev.linear_probe(tiny_encoder(), train, test, cfg)["per_seed_epoch"] == [3]
    with pytest.raises(ValueError, match="select='max'"):
        ev.linear_probe(tiny_encoder(), train, test, ProbeConfig(select="max"))


def test_layer_decay_groups():
    enc = Encoder(EncoderConfig(embed_dim=32, depth=3, num_heads=2, max_length=16, num_classes=4))
    groups = layer_decay_groups(enc, FinetuneConfig(layer_decay=0.5))
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    assert scale_of[id(enc.blocks[0].attn.qkv.weight)] == 0.5**3
    assert scale_of[id(enc.blocks[2].mlp.fc1.weight)] == 0.5
    assert scale_of[id(enc.head.weight)] == scale_of[id(enc.patch_embed.weight)] == scale_of[id(enc.cls_token)] == 1.0


def test_finetune_takes_every_seed_its_range_allows(tmp_path):
    """Regression: a seed above ~1.8e13 (2**63 - 1 is accepted) overflowed the epoch's generator
    seed ("Overflow when unpacking long long") at the first batch."""
    train, test = synth_split("mono", True, 4, seconds=1.0), synth_split("mono", False, 2, seconds=1.0)
    for seed in (2**63 - 1, 3 * 10**15):
        cfg = FinetuneConfig(steps=1, warmup=0, batch_size=2, seed=seed, out=str(tmp_path / str(seed)), workers=0)
        clips, _ = next(Finetuner(tiny_encoder(target_length=128), train, test, cfg, log=lambda *a, **k: None)._batches())
        assert len(clips) == 2


def test_finetune_writes_checkpoints_resumes_and_exports(tmp_path):
    from sslam.checkpoint import load_encoder

    train, test = synth_split("poly", True, 16), synth_split("poly", False, 8)
    cfg = FinetuneConfig(steps=3, warmup=1, batch_size=4, eval_every=2, ckpt_every=2, out=str(tmp_path), workers=0)
    Finetuner(tiny_encoder(), train, test, cfg, log=lambda *a: None).fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and "mAP" in records[-1]
    exported = load_encoder(tmp_path / "model")
    assert exported.label_names == list(train.class_names) and exported.cfg.num_classes == 12
    # The training checkpoints carry the model's preprocessing too (not the AudioSet defaults).
    for path in (tmp_path / "model", sorted(tmp_path.glob("checkpoint_*.pt"))[-1]):
        assert load_encoder(path).preprocessing == tiny_encoder().preprocessing, path
    cfg.steps = 5
    again = Finetuner(tiny_encoder(), train, test, cfg, log=lambda *a: None)
    assert again.step == 3
    again.fit()
    assert again.step == 5
    # Run once more when finished: nothing to do, and it says how the run ended.
    done = Finetuner(tiny_encoder(), train, test, cfg, log=lambda *a: None)
    assert done.fit() == {"step": 5, "best": again.best} and again.best is not None
    with pytest.raises(ValueError, match=r"checkpoint_00000005.pt: the run is at step 5, past steps=4"):
        Finetuner(tiny_encoder(), train, test, replace(cfg, steps=4), log=lambda *a: None)


def test_a_warm_up_changed_by_other_steps_says_how_to_keep_it():
    """Without --warmup the warm-up is 10 % of the steps: another --steps (which a resume may
    take) was refused as "warmup: 2 in the record, 4 now", a setting never given."""
    from sslam.evaluate import finetune_resume_conflicts

    identity = {"train_split": "a", "test_split": "b", "class_names": ["x"], "multilabel": True,
                "encoder_config": {}, "preprocessing": {}, "start_encoder": "c", "world_size": 1}
    saved = {**identity, "config": asdict(FinetuneConfig(steps=20))}
    conflicts = finetune_resume_conflicts(saved, {**identity, "config": asdict(FinetuneConfig(steps=40))}, "record")
    assert conflicts == ["warmup: 2 in the record, 4 now (without --warmup it is 10 % of --steps: give --warmup=2 "
                         "to keep it)"]
    assert finetune_resume_conflicts(saved, {**identity, "config": asdict(FinetuneConfig(steps=40, warmup=2))}) == []


@pytest.mark.parametrize("change, pattern", [
    (lambda c: c.pop("optimizer"), "optimizer: missing"),
    (lambda c: c.update(step="3"), "step: a str, not an int"),
    (lambda c: c.update(best="0.5"), "best: a str, not a number or None"),
    (lambda c: c["model"].update({"head.bias": torch.full((12,), float("nan"))}), r"\(model\): head\.bias is not a finite"),
    (lambda c: c.update(rng={"torch": torch.zeros(3, dtype=torch.uint8)}), "random streams do not load"),
])
def test_a_damaged_fine_tuning_checkpoint_is_named_with_its_damaged_part(tmp_path, change, pattern):
    from sslam.checkpoint import CheckpointError

    train, test = synth_split("poly", True, 16), synth_split("poly", False, 8)
    cfg = FinetuneConfig(steps=2, warmup=1, batch_size=4, eval_every=2, ckpt_every=2, out=str(tmp_path), workers=0)
    Finetuner(tiny_encoder(), train, test, cfg, log=lambda *a: None).fit()
    path = sorted(tmp_path.glob("checkpoint_*.pt"))[-1]
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"] = dict(ckpt["model"])
    change(ckpt)
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=f"{path.name}.*{pattern}"):
        Finetuner(tiny_encoder(), train, test, replace(cfg, steps=4), log=lambda *a: None)


def test_demo_quick(tmp_path, monkeypatch, capsys):
    from sslam.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--quick", "--out", "demo"]) == 0
    out = tmp_path / "demo"
    result = json.loads((out / "results.json").read_text())
    assert set(result["table"]) == {"random", "stage 1", "stage 2"}
    assert (out / "demo.png").stat().st_size > 10_000 and "| stage 2 |" in (out / "results.md").read_text()
    # Run again from elsewhere: stage 2 recorded its start by a path relative to the first
    # run's folder, and refused to go on ("run.init: 'demo/stage1/...' in the checkpoint").
    monkeypatch.chdir(out / "stage1")
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    # Run again finished, its stages report their steps' time, not the call's (which ran none).
    again = json.loads((out / "results.json").read_text())["timings"]
    for stage in ("pretrain stage 1", "pretrain stage 2"):
        assert again[stage] == result["timings"][stage] > 0
    assert main(["demo", "--quick", "--out", ""]) == 2 and "--out is empty: name a folder" in capsys.readouterr().err
    # The full demo in a --quick one's folder: named as such (its stage runs refused to resume
    # with "changed settings" of options the demo does not have).
    capsys.readouterr()
    assert main(["demo", "--out", str(out)]) == 2
    assert f"--out {out}: holds a --quick demo; the full demo needs another folder" in capsys.readouterr().err


def test_the_demo_refuses_a_folder_of_other_files(tmp_path):
    """The report overwrote a results.md or demo.png of the user's, and a demo.json of another
    shape was taken for none and replaced."""
    from sslam.demo import _claim_folder

    (tmp_path / "results.md").write_text("my notes\n")
    with pytest.raises(ValueError, match=r"holds other files \(results.md\) and no demo; give the demo an empty"):
        _claim_folder(tmp_path, quick=True)
    for text in ('{"quick": "yes"}', "[1]", "not json"):
        (tmp_path / "demo.json").write_text(text)
        with pytest.raises(ValueError, match="its demo.json is not a demo's record"):
            _claim_folder(tmp_path, quick=True)
        assert (tmp_path / "demo.json").read_text() == text
    assert (tmp_path / "results.md").read_text() == "my notes\n"
    (tmp_path / "new").mkdir()  # a folder holding only what a killed claim was writing is empty
    (tmp_path / "new" / ".demo.json.k2j3.tmp").write_text("")
    _claim_folder(tmp_path / "new", quick=True)  # a new folder, or an empty one, is claimed
    _claim_folder(tmp_path / "new", quick=True)
    assert json.loads((tmp_path / "new" / "demo.json").read_text()) == {"quick": True}
    with pytest.raises(ValueError, match="holds a --quick demo; the full demo needs another folder"):
        _claim_folder(tmp_path / "new", quick=False)


def test_probe_features_of_two_splits_with_one_name_are_their_own():
    import dataclasses

    train = dataclasses.replace(synth_split("poly", True, 16), name="labels")  # fold1/labels.csv
    test = dataclasses.replace(synth_split("poly", False, 8), name="labels")  # fold2/labels.csv
    encoder, cache = tiny_encoder(), {}
    linear_probe(encoder, train, test, ProbeConfig(epochs=2, batch_size=4), cache=cache)
    assert len(cache) == 2
    assert torch.equal(cache[id(test)][1], extract_cls(encoder, test))
    assert torch.equal(cache[id(train)][1], extract_cls(encoder, train))


def interrupt(finetuner: Finetuner, at_step: int) -> None:
    """Run ``finetuner`` until a KeyboardInterrupt stops it before its update ``at_step``."""
    step = finetuner.optimizer.step

    def interrupted(*args, **kwargs):
        if finetuner.step == at_step - 1:
            raise KeyboardInterrupt
        return step(*args, **kwargs)

    finetuner.optimizer.step = interrupted
    with pytest.raises(KeyboardInterrupt):
        finetuner.fit()


def test_finetuning_resumes_exactly_with_stochastic_depth_and_logs_each_step_once(tmp_path):
    train, test = synth_split("poly", True, 16), synth_split("poly", False, 8)

    def config(out):
        return FinetuneConfig(steps=6, warmup=1, batch_size=4, eval_every=100, ckpt_every=3, out=str(out),
                              workers=0, drop_path=0.1)

    whole = Finetuner(tiny_encoder(), train, test, config(tmp_path / "whole"), log=lambda *a: None)
    whole.fit()
    interrupt(Finetuner(tiny_encoder(), train, test, config(tmp_path / "cut"), log=lambda *a: None), at_step=5)
    resumed = Finetuner(tiny_encoder(), train, test, config(tmp_path / "cut"), log=lambda *a: None)
    assert resumed.step == 3
    resumed.fit()
    for name, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name

    def logged(run):
        return [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    assert [r["step"] for r in logged("cut")] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in logged("cut")] == [r["loss"] for r in logged("whole")]


def test_a_run_extended_without_warmup_keeps_its_warmup(tmp_path):
    """Regression: --steps may change on resume, but the default warm-up (10 % of the steps)
    changed with it and the resume was refused ("warmup: 1 in the checkpoint, 2 now")."""
    train, test = synth_split("poly", True, 8), synth_split("poly", False, 4)

    def config(steps):
        return FinetuneConfig(steps=steps, batch_size=4, eval_every=100, ckpt_every=10, out=str(tmp_path), workers=0)

    Finetuner(tiny_encoder(), train, test, config(10), log=lambda *a: None).fit()
    extended = Finetuner(tiny_encoder(), train, test, config(20), log=lambda *a: None)
    assert extended.step == 10 and extended.cfg.warmup_steps == 1
    extended.fit()
    assert extended.step == 20
    with pytest.raises(ValueError, match="warmup: 1 in the checkpoint, 3 now"):
        Finetuner(tiny_encoder(), train, test, replace(config(30), warmup=3), log=lambda *a: None)
    # Shortened below what is done or below the kept warm-up: each said as such ("warmup=1 must be
    # below steps=1" named a --warmup never given).
    with pytest.raises(ValueError, match=r"checkpoint_00000020.pt: the run is at step 20, past steps=1"):
        Finetuner(tiny_encoder(), train, test, config(1), log=lambda *a: None)
    early = replace(config(40), out=str(tmp_path / "early"), ckpt_every=2)
    interrupt(Finetuner(tiny_encoder(), train, test, early, log=lambda *a: None), at_step=3)
    with pytest.raises(ValueError, match=r"checkpoint_00000002.pt: the run's warm-up of 4 steps, kept on resume, is "
                                         r"not below steps=4: give more steps, or --warmup"):
        Finetuner(tiny_encoder(), train, test, replace(early, steps=4), log=lambda *a: None)


def test_a_restarted_finetuning_removes_what_a_killed_run_was_writing(tmp_path):
    stale = tmp_path / ".checkpoint_00000004.pt.a1b2c3.tmp"
    stale.write_bytes(b"half a checkpoint")
    train, test = synth_split("poly", True, 8), synth_split("poly", False, 4)
    Finetuner(tiny_encoder(), train, test, FinetuneConfig(steps=2, batch_size=4, out=str(tmp_path), workers=0),
              log=lambda *a: None)
    assert not stale.exists()


def test_finetuning_restarted_before_its_first_checkpoint_logs_each_step_once(tmp_path):
    train, test = synth_split("poly", True, 8), synth_split("poly", False, 4)
    cfg = FinetuneConfig(steps=3, warmup=0, batch_size=4, eval_every=1, ckpt_every=3, out=str(tmp_path), workers=0)
    interrupt(Finetuner(tiny_encoder(), train, test, cfg, log=lambda *a: None), at_step=3)
    Finetuner(tiny_encoder(), train, test, cfg, log=lambda *a: None).fit()
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_a_tie_with_the_best_evaluation_replaces_it_as_fairseq_does(tmp_path, monkeypatch):
    """fairseq's checkpoint_best.pt is replaced when the metric is >= the best; OUT/best kept
    the first of equal evaluations (ties are common for accuracy on small test sets)."""
    train, test = synth_split("poly", True, 8), synth_split("poly", False, 4)
    cfg = FinetuneConfig(steps=3, warmup=0, batch_size=4, eval_every=1, ckpt_every=3, out=str(tmp_path), workers=0)
    monkeypatch.setattr(Finetuner, "evaluate", lambda self: ("mAP", 0.5))
    Finetuner(tiny_encoder(), train, test, cfg, log=lambda *a: None).fit()
    assert json.loads((tmp_path / "best" / "config.json").read_text())["source"]["steps"] == 3


def test_finetuning_never_starts_over_another_runs_record(tmp_path):
    """A fresh start cuts metrics.jsonl and replaces best/: over a pretraining run's record, or a
    fine-tuning's with other settings, both stopped before their first checkpoint, that is
    refused and their files are kept. The same run started again goes on (test above)."""
    train, test = synth_split("poly", True, 8), synth_split("poly", False, 4)
    cfg = FinetuneConfig(steps=3, warmup=0, batch_size=4, eval_every=1, ckpt_every=3, out=str(tmp_path / "ft"),
                         workers=0)
    interrupt(Finetuner(tiny_encoder(), train, test, cfg, log=lambda *a: None), at_step=3)
    kept = {p: p.read_bytes() for p in (tmp_path / "ft").rglob("*") if p.is_file()}
    assert tmp_path / "ft" / "best" / "model.safetensors" in kept
    with pytest.raises(ValueError, match=r"ft holds files of another run and no checkpoint \(metrics.jsonl, "
                                         r"best\): seed: 0 in the record, 5 now; starting here"):
        Finetuner(tiny_encoder(), train, test, replace(cfg, seed=5), log=lambda *a: None)
    assert {p: p.read_bytes() for p in (tmp_path / "ft").rglob("*") if p.is_file()} == kept
    (tmp_path / "pre").mkdir()
    (tmp_path / "pre" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    with pytest.raises(ValueError, match=r"pre holds files of another run and no checkpoint \(metrics.jsonl\): "
                                         r"no finetune.json says they are this fine-tuning's"):
        Finetuner(tiny_encoder(), train, test, replace(cfg, out=str(tmp_path / "pre")), log=lambda *a: None)
    assert (tmp_path / "pre" / "metrics.jsonl").read_text() == '{"step": 1, "loss": 2.0}\n'
    # The record is JSON: a custom (mean, std) norm, a tuple, is the same run read back as a list.
    custom = tiny_encoder()
    custom.preprocessing["norm"] = (-4.0, 4.5)
    cfg = replace(cfg, out=str(tmp_path / "custom"))
    interrupt(Finetuner(custom, train, test, cfg, log=lambda *a: None), at_step=3)
    assert Finetuner(custom, train, test, cfg, log=lambda *a: None).step == 0


@pytest.mark.parametrize("change", [{"eval_every": -1}, {"ckpt_every": 0}, {"steps": 0}, {"layer_decay": -1.0},
                                    {"warmup": -5}, {"mixup_prob": 2.0}, {"mask_ratio": 2.0},
                                    {"mixup": float("nan")}, {"batch_size": 0}, {"min_lr": 1.0},
                                    {"lr": float("inf")}, {"mixup": float("inf")}, {"weight_decay": float("inf")},
                                    {"warmup": 10**9}, {"steps": 10**400}, {"lr": 10**400}])
def test_impossible_finetuning_and_probe_settings_are_refused_by_name(tmp_path, change):
    train, test = synth_split("poly", True, 8), synth_split("poly", False, 4)
    name = next(iter(change))
    with pytest.raises(ValueError, match=rf"^{name}="):
        Finetuner(tiny_encoder(), train, test, FinetuneConfig(out=str(tmp_path), workers=0, **change))
    probe_change = {"epochs" if name == "steps" else name: value for name, value in change.items()}
    if all(hasattr(ProbeConfig, key) for key in probe_change):
        with pytest.raises(ValueError, match=rf"^{next(iter(probe_change))}="):
            linear_probe(tiny_encoder(), train, test, ProbeConfig(**probe_change))


def test_degenerate_label_sets_are_refused_before_training(tmp_path):
    for i in range(4):
        sf.write(tmp_path / f"c{i}.wav", np.random.default_rng(i).uniform(-0.3, 0.3, 8000), 16000)

    def split(name, rows, classes=None):
        path = tmp_path / name
        path.write_text("path,labels\n" + "".join(f"c{i}.wav,{labels}\n" for i, labels in enumerate(rows)))
        return read_csv_split(path, classes)

    cases = [
        (split("one.csv", ["dog"] * 4), r"'one' has one class \('dog'\)"),
        (split("gaps.csv", ["dog", "", "cat", "dog"]), r"'gaps': 1 clip\(s\) without a label"),
        (split("none.csv", [""] * 4), r"'none' names no classes"),
    ]
    for train, match in cases:
        with pytest.raises(ValueError, match=match):
            linear_probe(tiny_encoder(), train, train, ProbeConfig(epochs=1, batch_size=2))
    # Multi-label splits may hold clips without a label (none of the classes is present).
    multi = split("multi.csv", ["dog;cat", "", "cat", "dog"])
    assert multi.multilabel
    linear_probe(tiny_encoder(), multi, multi, ProbeConfig(epochs=1, batch_size=2))


def test_finetuning_refuses_to_resume_on_other_training_clips(tmp_path):
    test = synth_split("poly", False, 8)
    cfg = FinetuneConfig(steps=2, warmup=0, batch_size=4, eval_every=100, ckpt_every=2, out=str(tmp_path), workers=0)
    Finetuner(tiny_encoder(), synth_split("poly", True, 16, seed=0), test, cfg, log=lambda *a: None).fit()
    cfg.steps = 4
    with pytest.raises(ValueError, match="training split: other clips or labels"):
        Finetuner(tiny_encoder(), synth_split("poly", True, 16, seed=1), test, cfg, log=lambda *a: None)
    # Another test split: the best kept so far was measured on the first (it was accepted, and
    # OUT/best mixed the two).
    with pytest.raises(ValueError, match="test split: other clips or labels"):
        Finetuner(tiny_encoder(), synth_split("poly", True, 16, seed=0), synth_split("poly", False, 8, seed=1), cfg,
                  log=lambda *a: None)
    assert Finetuner(tiny_encoder(), synth_split("poly", True, 16, seed=0), test, cfg, log=lambda *a: None).step == 2


# ---- the recipe's details (SPEC 6) -----------------------------------------------------------


def test_fine_tuning_recipe_details(tmp_path, monkeypatch):
    """AdamW betas (0.9, 0.95) as the official recipes; no label smoothing once mixup is on (the
    official loss takes the mixed targets as they are); a fresh fc_norm of eps 1e-6 whatever
    head the encoder had; layer_decay=0 refused; a run resumed with other preprocessing refused."""
    import sslam.evaluate as ev

    assert ev.augmented_smoothing(FinetuneConfig(mixup=0.8)) == 0.0
    assert ev.augmented_smoothing(FinetuneConfig(mixup=0.0, label_smoothing=0.1)) == 0.1
    hf_like = tiny_encoder()
    hf_like.cfg = hf_like.cfg.replace(head_norm_eps=1e-5)
    assert ev.with_head(hf_like, ["a", "b"], 0.1).cfg.head_norm_eps == 1e-6
    with pytest.raises(ValueError, match="layer_decay=0"):
        ev.check_settings(FinetuneConfig(layer_decay=0.0))
    train, test = synth_split("mono", True, 12), synth_split("mono", False, 6)
    cfg = FinetuneConfig(steps=1, warmup=0, batch_size=4, out=str(tmp_path), workers=0)
    tuner = Finetuner(tiny_encoder(), train, test, cfg, log=lambda *a: None)
    assert all(group["betas"] == (0.9, 0.95) for group in tuner.optimizer.param_groups)
    tuner.fit()
    other = with_preprocessing(tiny_encoder(), norm="esc50")
    with pytest.raises(ValueError, match="preprocessing: .*'audioset'.* in the checkpoint, .*'esc50'.* now"):
        Finetuner(other, train, test, cfg, log=lambda *a: None)


def test_task_preprocessing_is_set_and_checked():

    encoder = with_preprocessing(tiny_encoder(), norm="esc50", target_length=64)
    assert encoder.preprocessing == {"sample_rate": 16000, "target_length": 64, "norm": "esc50"}
    with pytest.raises(ValueError, match="norm='nope': unknown preset"):
        with_preprocessing(tiny_encoder(), norm="nope")
    with pytest.raises(ValueError, match="target_length=520: must be a positive multiple of 16 frames, at most the 256"):
        with_preprocessing(tiny_encoder(), target_length=520)


@pytest.mark.parametrize("training", [True, False])
def test_the_full_probe_hands_the_encoder_back_as_it_was(training):
    """The full path encodes its own augmented batches with the frozen encoder's drop-path on
    (0 -> 0.1 over the blocks, SPEC 9.10) and the test split in eval mode: only the test split's
    features are extracted, and the encoder keeps its mode, rates and trainable weights."""
    encoder = tiny_encoder().train(training)
    seen = []
    encoder.register_forward_pre_hook(lambda m, args: seen.append((m.training, [b.drop_path_rate for b in m.blocks])))
    train, test = synth_split("poly", True, 8), synth_split("poly", False, 4)
    cache = {}
    linear_probe(encoder, train, test, ProbeConfig(fast=False, epochs=1, batch_size=4), cache=cache)
    assert list(cache) == [id(test)]
    assert seen == [(False, [0.0, 0.0])] + [(True, [0.0, 0.1])] * 2  # test features, then 2 batches
    assert encoder.training == training and [b.drop_path_rate for b in encoder.blocks] == [0.0, 0.0]
    assert encoder.cfg.drop_path_rate == 0 and all(p.requires_grad for p in encoder.parameters())


def test_a_split_without_any_label_is_refused(tmp_path):
    """Classes named by descriptors can have no clip: a test split without any positive gave
    mAP NaN (printed as the non-JSON token NaN, exit status 0), a train split without any an
    untrained head scored as if trained."""
    import dataclasses

    train = synth_split("poly", True, 8)
    test = synth_split("poly", False, 4)
    cfg = FinetuneConfig(steps=1, warmup=0, batch_size=4, out=str(tmp_path), workers=0)
    for which, split in (("test", test), ("train", train)):
        empty = dataclasses.replace(split, targets=torch.zeros_like(split.targets))
        pair = (train, empty) if which == "test" else (empty, test)
        with pytest.raises(ValueError, match=f"split '{split.name}': no clip has a label"):
            Finetuner(tiny_encoder(), *pair, cfg, log=lambda *a: None)
        with pytest.raises(ValueError, match=f"split '{split.name}': no clip has a label"):
            linear_probe(tiny_encoder(), *pair, ProbeConfig(epochs=1, batch_size=4))
    # A single-label task scores accuracy: its clips without a label are named as such.
    mono_train, mono_test = synth_split("mono", True, 8), synth_split("mono", False, 4)
    empty = dataclasses.replace(mono_test, targets=torch.zeros_like(mono_test.targets))
    with pytest.raises(ValueError, match="4 clip\\(s\\) without a label; a single-label split"):
        linear_probe(tiny_encoder(), mono_train, empty, ProbeConfig(epochs=1, batch_size=4))
    # A detection test split where every clip carries every class it holds: mAP 1.0 (or, with
    # classes it lacks, their share of 0) whatever the encoder, as one class in a single-label
    # task: refused alike.
    lacking = torch.ones_like(test.targets)
    lacking[:, 0] = 0
    for targets in (torch.ones_like(test.targets), lacking):
        full = dataclasses.replace(test, targets=targets)
        with pytest.raises(ValueError, match=f"split '{test.name}': every clip carries every class it holds; its "
                                             "mAP is the same whatever the encoder"):
            linear_probe(tiny_encoder(), train, full, ProbeConfig(epochs=1, batch_size=4))
    with pytest.raises(ValueError, match=r"workers=100000: must be an int in \[0, 1024\]"):
        linear_probe(tiny_encoder(), train, test, ProbeConfig(epochs=1, batch_size=4), workers=100000)


def test_fine_tuning_names_unreadable_test_clips_before_training(tmp_path):
    """A test clip that cannot be read failed the first evaluation, losing every step trained
    since the start (500 by default) on each attempt: it is named before any training."""
    for i in range(4):
        sf.write(tmp_path / f"c{i}.wav", np.random.default_rng(i).uniform(-0.3, 0.3, 4000), 16000)
    (tmp_path / "bad.wav").write_bytes(b"not audio at all")
    rows = "path,labels\n" + "".join(f"c{i}.wav,{'ab'[i % 2]}\n" for i in range(4))
    (tmp_path / "train.csv").write_text(rows)
    (tmp_path / "test.csv").write_text(rows + "bad.wav,a\n")
    train = read_csv_split(tmp_path / "train.csv")
    test = read_csv_split(tmp_path / "test.csv", class_names=train.class_names)
    cfg = FinetuneConfig(steps=4, warmup=0, batch_size=2, out=str(tmp_path / "ft"), workers=0)
    with pytest.raises(LabelError, match=r"split 'test': 1 clip\(s\) cannot be read, e\.g\. .*bad\.wav: cannot decode audio"):
        Finetuner(tiny_encoder(), train, test, cfg, log=lambda *a: None)
    assert not (tmp_path / "ft").exists()


@pytest.mark.parametrize("workers", [0, 1])
def test_unusable_test_clips_are_named_by_file_on_one_line(tmp_path, capsys, workers):
    """A clip shorter than one 25 ms frame is named by its file (it was named by its place in a
    batch, 'clip(s) 4'), and an error met in a loader worker is the file's one-line message,
    not 'Caught LabelError in DataLoader worker process 0' and the worker's traceback."""
    from sslam.checkpoint import save_encoder
    from sslam.cli import main

    save_encoder(tiny_encoder(), tmp_path / "enc")
    for i in range(4):
        sf.write(tmp_path / f"c{i}.wav", np.random.default_rng(i).uniform(-0.3, 0.3, 4000), 16000)
    sf.write(tmp_path / "short.wav", np.full(200, 0.1), 16000)
    (tmp_path / "bad.wav").write_bytes(b"not audio at all")
    rows = "path,labels\n" + "".join(f"c{i}.wav,{'ab'[i % 2]}\n" for i in range(4))
    (tmp_path / "train.csv").write_text(rows)
    for name, message in [("short", "short: " + str(tmp_path / "short.wav") + ": too short: 200 samples"),
                          ("bad", "bad: " + str(tmp_path / "bad.wav") + ": cannot decode audio")]:
        (tmp_path / f"{name}.csv").write_text(rows + f"{name}.wav,a\n")
        argv = ["evaluate", "linear", "--checkpoint", str(tmp_path / "enc"), "--train", str(tmp_path / "train.csv"),
                "--test", str(tmp_path / f"{name}.csv"), "--device", "cpu", f"--workers={workers}", "--epochs=1"]
        assert main(argv) == 2
        err = capsys.readouterr().err.split("the score is not a held-out one\n")[-1]  # after the note on c0..c3
        assert err.startswith(f"sslam: error: {message}") and err.count("\n") == 1, err


def test_fine_tuning_exports_the_best_evaluated_weights(tmp_path, monkeypatch):
    """As the official runs keep checkpoint_best.pt (selected on the eval split's metric, SPEC
    9.12), out/best holds the weights of the best evaluation; out/model the last ones."""
    import sslam.evaluate as ev
    from sslam.checkpoint import load_encoder

    scores = iter([0.3, 0.7, 0.5])
    monkeypatch.setattr(ev.Finetuner, "evaluate", lambda self: ("mAP", next(scores)))
    saved = {}
    real_save = ev.Finetuner.save

    def save(self):
        saved[self.step] = {k: v.clone() for k, v in self.model.state_dict().items()}
        real_save(self)

    monkeypatch.setattr(ev.Finetuner, "save", save)
    train, test = synth_split("poly", True, 4), synth_split("poly", False, 2)
    cfg = FinetuneConfig(steps=3, warmup=0, batch_size=2, eval_every=1, ckpt_every=1, out=str(tmp_path), workers=0)
    result = Finetuner(tiny_encoder(), train, test, cfg, log=lambda *a: None).fit()
    assert result["best"] == 0.7
    best, last = load_encoder(tmp_path / "best"), load_encoder(tmp_path / "model")
    assert all(torch.equal(v, saved[2][k]) for k, v in best.state_dict().items())
    assert all(torch.equal(v, saved[3][k]) for k, v in last.state_dict().items())
    assert not all(torch.equal(v, saved[3][k]) for k, v in best.state_dict().items())
    config = json.loads((tmp_path / "best" / "config.json").read_text())
    assert config["source"] == {"format": "sslam-finetune", "steps": 2, "mAP": 0.7}


def test_the_task_type_can_be_set_when_the_labels_do_not_show_it(tmp_path, capsys):
    """An AudioSet-style split whose clips happen to carry one label each reads as single-label
    (softmax, accuracy); --task=multilabel makes it BCE and mAP, and a one-class detection task
    possible. --task=single-label refuses a clip with two labels, naming the split."""
    from sslam.checkpoint import save_encoder
    from sslam.cli import main

    save_encoder(tiny_encoder(), tmp_path / "enc")
    for i in range(4):
        sf.write(tmp_path / f"c{i}.wav", np.random.default_rng(i).uniform(-0.3, 0.3, 4000), 16000)
    (tmp_path / "one.csv").write_text("path,labels\n" + "".join(f"c{i}.wav,{'ab'[i % 2]}\n" for i in range(4)))
    (tmp_path / "gun.csv").write_text("path,labels\nc0.wav,gun\nc1.wav,\nc2.wav,gun\nc3.wav,\n")
    (tmp_path / "two.csv").write_text("path,labels\nc0.wav,a;b\nc1.wav,a\nc2.wav,b\nc3.wav,a\n")

    def run(split, *task):
        argv = ["evaluate", "linear", "--checkpoint", str(tmp_path / "enc"), "--train", str(tmp_path / split),
                "--test", str(tmp_path / split), "--device", "cpu", *task, "--epochs=1"]
        return main(argv), capsys.readouterr()

    assert "accuracy" in run("one.csv")[1].out
    assert "mAP" in run("one.csv", "--task", "multilabel")[1].out
    code, out = run("gun.csv", "--task", "multilabel")
    assert code == 0 and "mAP" in out.out
    code, out = run("two.csv", "--task", "single-label")
    assert code == 2 and "split 'two': 1 clip(s) with several labels; a single-label split needs one label per clip" in out.err


def test_a_resumed_fine_tuning_keeps_a_better_best_exported_after_its_checkpoint(tmp_path, monkeypatch):
    """The best evaluation came after the checkpoint a run resumed from (0.85 at step 3; the
    checkpoint of step 2 holds best 0.8): a later 0.82 overwrote OUT/best with worse weights."""
    import sslam.evaluate as ev

    scores = iter([0.8, 0.7, 0.85, 0.82])
    monkeypatch.setattr(ev.Finetuner, "evaluate", lambda self: ("mAP", next(scores)))
    train, test = synth_split("poly", True, 4), synth_split("poly", False, 2)
    cfg = FinetuneConfig(steps=3, warmup=0, batch_size=2, eval_every=1, ckpt_every=2, out=str(tmp_path), workers=0)
    Finetuner(tiny_encoder(), train, test, cfg, log=lambda *a: None).fit()
    best = (tmp_path / "best" / "model.safetensors").read_bytes()
    (tmp_path / "checkpoint_00000003.pt").unlink()  # as if it stopped before saving step 3
    resumed = Finetuner(tiny_encoder(), train, test, replace(cfg, steps=4, eval_every=2), log=lambda *a: None)
    assert resumed.best == 0.85
    assert resumed.fit()["best"] == 0.85
    assert (tmp_path / "best" / "model.safetensors").read_bytes() == best


def test_a_killed_export_leaves_no_folder_behind(tmp_path, monkeypatch):
    """save_encoder writes OUT/best and OUT/model through a temporary folder: a run killed
    there left it (a whole model) for good; the next run removes it. Other folders stay."""
    killed = tmp_path / ".best.k1ll3d.tmp"
    killed.mkdir(parents=True)
    (killed / "model.safetensors").write_bytes(b"half a model")
    (tmp_path / ".notes.mine.tmp").mkdir()
    (tmp_path / ".notes.mine.tmp" / "notes.txt").write_text("keep me")
    (tmp_path / ".locked.theirs.tmp").mkdir()  # another user's, unreadable: left alone, no crash
    from pathlib import Path

    iterdir = Path.iterdir
    monkeypatch.setattr(Path, "iterdir", lambda self: (_ for _ in ()).throw(PermissionError(13, "denied"))
                        if self.name == ".locked.theirs.tmp" else iterdir(self))
    train, test = synth_split("poly", True, 4), synth_split("poly", False, 2)
    Finetuner(tiny_encoder(), train, test, FinetuneConfig(steps=1, batch_size=2, out=str(tmp_path), workers=0),
              log=lambda *a: None)
    assert not killed.exists() and (tmp_path / ".notes.mine.tmp" / "notes.txt").read_text() == "keep me"
    assert (tmp_path / ".locked.theirs.tmp").is_dir()


def test_fine_tuning_under_two_processes_logs_the_global_batchs_loss(tmp_path):
    """Each process logged (and printed) its own batch's loss; the record is now the mean over
    the processes, as the update is, and the result is printed once."""
    import os
    import subprocess
    import sys

    from sslam.checkpoint import save_encoder

    save_encoder(tiny_encoder(), tmp_path / "enc")
    out = tmp_path / "ft"
    argv = ["evaluate", "finetune", "--checkpoint", str(tmp_path / "enc"), "--train", "synth:poly", "--test",
            "synth:poly", "--device", "cpu", "--out", str(out), "--steps=2", "--batch_size=4", "--eval_every=2"]
    script = tmp_path / "ft.py"
    script.write_text(
        "import os, sys\nimport sslam.evaluate as ev\nreal = ev.classification_loss\n"
        "def recording(*args, **kwargs):\n    loss = real(*args, **kwargs)\n"
        f"    with open(os.path.join({str(tmp_path)!r}, 'losses.' + os.environ['RANK']), 'a') as f:\n"
        "        f.write(repr(loss.item()) + '\\n')\n    return loss\n"
        f"ev.classification_loss = recording\nfrom sslam.cli import main\nsys.exit(main({argv!r}))\n")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script)], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count('"best"') == 1, result.stdout
    ranks = [[float(x) for x in (tmp_path / f"losses.{r}").read_text().split()] for r in (0, 1)]
    logged = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert ranks[0] != ranks[1]
    assert logged == pytest.approx([(a + b) / 2 for a, b in zip(*ranks)], rel=1e-6)


def test_fine_tuning_processes_that_find_different_newest_checkpoints_are_refused(tmp_path):
    """As pretraining's: each process lists the run folder itself, and one that sees an older
    listing (a shared filesystem's cache) would resume from another step than the others."""
    import os
    import subprocess
    import sys

    from sslam.checkpoint import save_encoder
    from sslam.files import checkpoints_in

    save_encoder(tiny_encoder(), tmp_path / "enc")
    out = tmp_path / "ft"
    argv = ["evaluate", "finetune", "--checkpoint", str(tmp_path / "enc"), "--train", "synth:poly", "--test",
            "synth:poly", "--device", "cpu", "--out", str(out), "--batch_size=4", "--ckpt_every=1", "--eval_every=1"]
    stale_listing = ("import os, sslam.evaluate\n"
                     "if os.environ['RANK'] == '1' and os.environ.get('STALE'):\n"
                     "    listed = sslam.evaluate.checkpoints_in\n"
                     "    sslam.evaluate.checkpoints_in = lambda out: listed(out)[:-1]\n")
    for steps, stale in ((2, ""), (3, "1")):
        script = tmp_path / "ft.py"
        script.write_text(stale_listing + f"import sys\nfrom sslam.cli import main\nsys.exit(main({[*argv, f'--steps={steps}']!r}))\n")
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 str(script)], capture_output=True, text=True, timeout=120,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "STALE": stale})
        assert (result.returncode != 0) == bool(stale), result.stderr[-3000:]
    assert "the processes found different checkpoints to resume: step 2 (process 0), step 1 (process 1)" in result.stderr
    assert [path.name for path in checkpoints_in(out)] == ["checkpoint_00000001.pt", "checkpoint_00000002.pt"]


def test_help_lists_the_full_probe_options_apart(capsys):
    """The options only --full reads are refused without it, so the help lists them apart."""
    from sslam.cli import main

    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    linear, rest = text.split("linear options (defaults): ")[1].split("; with --full also: ")
    full = rest.split(". finetune options")[0]
    assert "--epochs=50" in linear and not any(f"--{key}=" in linear for key in ("mixup", "roll", "drop_path"))
    assert full.split(", ") == ["--mixup=0.8", "--mixup_prob=0.9", "--mask_ratio=0.2", "--roll=True", "--noise=False",
                                "--drop_path=0.1"]


def test_fine_tuning_evaluates_at_every_epochs_end_by_default(tmp_path):
    """The official fine-tuning validates once per epoch (SPEC 6.1) and keeps the best of those
    evaluations; ours evaluated every 500 steps. eval_every=0, the default, is every epoch's
    end (and the last step); a number of steps still works."""
    train, test = synth_split("poly", True, 12), synth_split("poly", False, 4)

    def evaluated(**settings):
        out = tmp_path / str(len(list(tmp_path.iterdir())))
        cfg = FinetuneConfig(steps=7, warmup=0, batch_size=4, ckpt_every=100, out=str(out), workers=0, **settings)
        Finetuner(tiny_encoder(), train, test, cfg, log=lambda *a: None).fit()
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [r["step"] for r in records if "mAP" in r]

    assert FinetuneConfig().eval_every == 0
    assert evaluated() == [3, 6, 7]  # 12 clips in batches of 4: 3 steps an epoch
    assert evaluated(eval_every=2) == [2, 4, 6, 7]


def test_evaluate_notes_the_manifest_entries_it_skips(tmp_path, capsys):
    """The 10000-sample filter of fairseq splits is said, once per split, on the command line."""
    from sslam.cli import main

    rng = np.random.default_rng(0)
    (tmp_path / "d.csv").write_text("0,music,Music\n1,speech,Speech\n")
    for split, n in (("train", 6), ("eval", 4)):
        for i in range(n):
            sf.write(tmp_path / f"{split}{i}.wav", rng.standard_normal(8000) * 0.1, 16000)
        sizes = [5000] * (2 if split == "train" else 1) + [32000] * (n - (2 if split == "train" else 1))
        (tmp_path / f"{split}.tsv").write_text(f"{tmp_path}\n" + "".join(f"{split}{i}.wav\t{s}\n" for i, s in enumerate(sizes)))
        (tmp_path / f"{split}.lbl").write_text("".join(f"{split}{i}\t{'music' if i % 2 else 'music,speech'}\n"
                                                       for i in range(n)))
    assert main(["evaluate", "linear", "--checkpoint", str(GOLDEN / "tiny_ckpt.pt"), "--train", str(tmp_path / "train.tsv"),
                 "--test", str(tmp_path / "eval.tsv"), "--label-descriptors", str(tmp_path / "d.csv"),
                 "--target-length", "64", "--epochs=1"]) == 0
    err = capsys.readouterr().err
    assert "note: train: 2 manifest entries under 10000 samples skipped" in err
    assert "note: eval: 1 manifest entry under 10000 samples skipped" in err
