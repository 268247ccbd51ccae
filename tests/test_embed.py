"""The embeddings API: official contract, masked batching, long audio, fine-tuned heads, HEAR."""

import io

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import GOLDEN

from sslam import hear
from sslam.audio import AudioError
from sslam.checkpoint import load_encoder
from sslam.model import Encoder, EncoderConfig


@pytest.fixture(scope="module")
def tiny():
    return load_encoder(GOLDEN / "tiny_ckpt.pt")


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_official_contract_from_raw_files(tiny, golden_fbank, golden_tiny_out):
    for name, ref in golden_tiny_out["items"].items():
        item = golden_fbank["items"][name]
        crop = item["n_frames_raw"] > 1024  # the official code crops; we window unless asked
        emb = tiny.embed(item["waveform"], item["wav_file_sample_rate"], crop=crop)
        assert rel_err(emb.utterance[0], ref["utterance"]) < 1e-4
        assert emb.frames.shape == (1, 512, 64)
        assert rel_err(emb.frames[0], ref["frame"]) < 1e-4
        real_rows = -(-min(item["n_frames_raw"], 1024) // 16)
        assert int(emb.timestamp_mask.sum()) == real_rows
        assert int(emb.frame_mask.sum()) == real_rows * 8
        assert torch.allclose(emb.mean[0], ref["frame"][: real_rows * 8].mean(0), atol=1e-5)


def test_list_of_clips_equals_one_by_one(tiny, golden_fbank):
    clips = [it["waveform"] for it in golden_fbank["items"].values() if not it["resampled"]]
    clips.append(torch.randn(9000) * 0.1)
    together = tiny.embed(clips, 16000, batch_size=2)
    for i, clip in enumerate(clips):
        alone = tiny.embed(clip, 16000)
        assert torch.allclose(together.utterance[i], alone.utterance[0], atol=1e-5)
        assert torch.allclose(together.frames[i], alone.frames[0], atol=1e-5)


def test_batch_tensor_input(tiny):
    batch = torch.randn(3, 20000) * 0.1
    emb = tiny.embed(batch, 16000)
    assert emb.utterance.shape == (3, 64) and emb.timestamps.shape == (3, 64, 64)
    assert emb.times.shape == (64,) and abs(emb.times[0].item() - 0.0875) < 1e-6


def test_mask_padding_is_independent_of_the_batch(tiny):
    clips = [torch.randn(n) * 0.1 for n in (5000, 16000, 40000)]
    together = tiny.embed(clips, 16000, padding="mask")
    for i, clip in enumerate(clips):
        alone = tiny.embed(clip, 16000, padding="mask")
        rows = int(alone.num_rows[0])
        assert int(together.num_rows[i]) == rows
        assert torch.allclose(together.utterance[i], alone.utterance[0], atol=1e-5)
        assert torch.allclose(together.mean[i], alone.mean[0], atol=1e-5)
        assert torch.allclose(together.frames[i, : rows * 8], alone.frames[0], atol=1e-5)
    # the padding content never reaches an embedding: other partners, same result
    other = tiny.embed([clips[0], torch.randn(40000)], 16000, padding="mask")
    assert torch.allclose(other.utterance[0], together.utterance[0], atol=1e-5)


def test_long_audio_is_windowed_not_cropped(tiny):
    wave = torch.randn(16000 * 25) * 0.1  # 25 s = 2498 frames
    emb = tiny.embed(wave, 16000)
    real_rows = -(-2498 // 16)
    assert int(emb.num_rows[0]) == real_rows == emb.timestamps.shape[1]
    assert bool(emb.timestamp_mask[0].all())
    assert emb.times[-1] > 24.9
    cropped = tiny.embed(wave, 16000, crop=True)
    assert int(cropped.num_rows[0]) == 64
    first = tiny.embed(wave[: 16000 * 10], 16000)
    assert not torch.allclose(emb.utterance, cropped.utterance)
    # the first window of the long clip sees the same frames as the cropped clip
    assert torch.allclose(cropped.frames[0, :400], first.frames[0, :400], atol=1e-3)
    with pytest.raises(ValueError, match="hop"):
        tiny.embed(wave, 16000, hop=100)
    # A hop with crop was accepted and did nothing: one window is kept.
    with pytest.raises(ValueError, match=r"hop=16: crop keeps only the first window, so no hop applies"):
        tiny.embed(wave, 16000, crop=True, hop=16)


def test_windows_that_see_the_same_sound_give_that_windows_embedding(tiny):
    """Windows are averaged, not summed: a clip that repeats every hop (512 frames) gives three
    windows of the same frames, so its CLS is its first window's, and a patch row two windows
    cover is the mean of the two rows (32 patch rows apart in a window) that see it."""
    period = 512 * 160  # samples per hop
    wave = (0.1 * torch.randn(period)).repeat(5)[: 160 * (2048 - 1) + 400]  # 2048 frames: 3 windows
    emb = tiny.embed(wave, 16000)
    first = tiny.embed(wave, 16000, crop=True)  # the first window, from the same log-mel
    assert int(emb.num_rows[0]) == 128
    assert torch.allclose(emb.utterance, first.utterance, rtol=1e-5, atol=1e-6)
    half = 32 * 8  # tokens of 512 frames
    rows = first.frames[0].split(half)  # the window's first and second halves
    overlapped = (rows[0] + rows[1]) / 2
    expected = torch.cat([rows[0], overlapped, overlapped, rows[1]])
    assert torch.allclose(emb.frames[0], expected, rtol=1e-5, atol=1e-5)


def test_paths_and_errors(tiny, tmp_path):
    sf.write(tmp_path / "a.wav", (torch.randn(24000) * 0.1).numpy(), 24000)
    emb = tiny.embed(str(tmp_path / "a.wav"))
    assert emb.utterance.shape == (1, 64)
    for path in (tmp_path / "a.wav", bytes(tmp_path / "a.wav"), [bytes(tmp_path / "a.wav")]):
        assert torch.equal(tiny.embed(path).utterance, emb.utterance)
    with pytest.raises(AudioError, match=r"missing\.wav: file not found"):
        tiny.embed(bytes(tmp_path / "missing.wav"))
    with open(tmp_path / "a.wav", "rb") as handle:  # open files and io.BytesIO are files too
        assert torch.equal(tiny.embed(handle).utterance, emb.utterance)
        handle.seek(0)
        both = tiny.embed([handle, io.BytesIO((tmp_path / "a.wav").read_bytes())])
        assert torch.equal(both.utterance, emb.utterance.expand(2, -1))
    with pytest.raises(ValueError, match="sample_rate is required"):
        tiny.embed(torch.randn(16000))
    # Paths in an array (np.array of names, pandas' .values) are paths, not a clip without a rate.
    for paths in (np.array([str(tmp_path / "a.wav")] * 2), np.array([tmp_path / "a.wav"] * 2, dtype=object)):
        assert torch.equal(tiny.embed(paths).utterance, emb.utterance.expand(2, -1))
    # What is not samples is named as such, not asked for a rate.
    for item, pattern in [([0.1, 0.2], "expected a torch.Tensor or numpy.ndarray, got list"),
                          (torch.empty(16000, device="meta"), "a tensor on the meta device holds no samples")]:
        for rate in (None, 16000):
            with pytest.raises(AudioError, match=rf"audio\[0\]: {pattern}"):
                tiny.embed([item], rate)
    with pytest.raises(ValueError, match="padding="):
        tiny.embed(torch.randn(16000), 16000, padding="zeros")


def test_finetuned_model_returns_probabilities():
    model = Encoder(EncoderConfig(embed_dim=32, depth=1, num_heads=2, num_classes=4)).eval()
    model.label_names = ["a", "b", "c", "d"]
    emb = model.embed([torch.randn(16000), torch.randn(8000)], 16000)
    assert emb.probabilities.shape == (2, 4) and emb.label_names == ["a", "b", "c", "d"]
    assert torch.all((emb.probabilities > 0) & (emb.probabilities < 1))


def test_head_outputs_do_not_depend_on_the_batch():
    """Regression: the head ran on all of a call's windows at once, and a matmul's rounding
    depends on its row count, so a clip's logits moved by ~1e-6 with its batch (its embeddings,
    with the official padding, did not)."""
    torch.manual_seed(0)
    model = Encoder(EncoderConfig(embed_dim=96, depth=1, num_heads=2, num_classes=50)).eval()
    clips = [torch.randn(n) * 0.2 for n in (32037, 800, 200000, 16000, 5000)]  # 12.5 s: two windows
    together = model.embed(clips, 16000)
    for i, clip in enumerate(clips):
        alone = model.embed(clip, 16000)
        assert torch.equal(together.utterance[i], alone.utterance[0])
        assert torch.equal(together.logits[i], alone.logits[0])
        assert torch.equal(together.probabilities[i], alone.probabilities[0])


def test_an_encoder_of_other_mel_bins_is_refused_by_embed():
    """embed computes the official 128-bin log-mel; a 64-bin encoder failed inside its forward
    ("expected a (B, 1, T, 64) spectrogram, got (1, 1, 1024, 128)")."""
    model = Encoder(EncoderConfig(embed_dim=32, depth=1, num_heads=2, mel_bins=64)).eval()
    with pytest.raises(ValueError, match="model: takes 64 mel bins; embed computes the official 128-bin log-mel"):
        model.embed(torch.randn(16000), 16000)


def test_embeddings_are_ordinary_tensors(tiny):
    """Regression: ``embed`` ran under ``torch.inference_mode``, so its outputs (and HEAR's) could
    not be changed in place nor feed a model that is trained (a probe on ``utterance``)."""
    emb = tiny.embed(torch.randn(2, 16000) * 0.1, 16000)
    scene = hear.get_scene_embeddings(torch.randn(2, 16000) * 0.1, hear.load_model(str(GOLDEN / "tiny_ckpt.pt")))
    for x in (emb.utterance, emb.frames, scene):
        assert not x.is_inference() and not x.requires_grad
        probe = torch.nn.Linear(x.shape[-1], 2)
        probe(x).sum().backward()
        assert probe.weight.grad is not None
        x.mul_(2)


def test_arguments_of_the_wrong_kind_are_named(tiny):
    """Regression: these failed inside torch or Python (AttributeError: 'numpy.ndarray' object
    has no attribute 'dim', 'str' object has no attribute 'preprocessing', ...)."""
    import sslam

    clip = np.zeros(16000, np.float32)
    cases = [(lambda: tiny(np.zeros((1, 1, 64, 128), np.float32)), TypeError, "x: expected a .* tensor .*got ndarray"),
             (lambda: sslam.embed("ckpt.pt", clip, 16000), TypeError, "model: expected an sslam Encoder .*got str"),
             (lambda: tiny.embed(np.zeros((0, 16000)), 16000), ValueError, "audio: expected .*; got no clips"),
             (lambda: tiny.embed(3.0, 16000), ValueError, "audio: expected .*; got float"),
             (lambda: hear.get_scene_embeddings(np.zeros((2, 16000)), tiny), ValueError,
              r"expected a \(n_sounds, n_samples\) torch tensor, got ndarray"),
             (lambda: load_encoder(GOLDEN / "tiny_ckpt.pt", dtype=torch.int32), TypeError, "dtype=torch.int32"),
             (lambda: load_encoder(GOLDEN / "tiny_ckpt.pt", dtype="float16"), TypeError, "dtype='float16'")]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


def test_hear_api(tmp_path):
    model = hear.load_model(str(GOLDEN / "tiny_ckpt.pt"), device="cpu")
    assert model.sample_rate == 16000
    assert model.scene_embedding_size == 64 and model.timestamp_embedding_size == 64
    audio = torch.randn(3, 16000 * 2) * 0.1
    scene = hear.get_scene_embeddings(audio, model)
    assert isinstance(scene, torch.Tensor) and scene.shape == (3, 64) and scene.dtype == torch.float32
    emb, ts = hear.get_timestamp_embeddings(audio, model)
    # 198 frames: 12 whole patch rows and a partial 13th centred at 2007.5 ms, past the end
    assert emb.shape == (3, 12, 64) and ts.shape == (3, 12)
    assert torch.all(ts[:, 1:] > ts[:, :-1]) and abs(ts[0, 1] - ts[0, 0] - 160.0) < 1e-3
    both = hear.load_model(str(GOLDEN / "tiny_ckpt.pt"), device="cpu", scene="cls+mean")
    assert hear.get_scene_embeddings(audio, both).shape == (3, 128) == (3, both.scene_embedding_size)
    with pytest.raises(ValueError, match="SSLAM_CHECKPOINT"):
        hear.load_model("")


def test_clips_share_a_feature_batch_only_with_clips_of_similar_length():
    from sslam.embedding import length_groups

    assert length_groups([16000] * 15 + [2_880_000]) == [list(range(15)), [15]]
    rng = np.random.default_rng(0)
    lengths = rng.integers(400, 2_000_000, 200).tolist()
    groups = length_groups(lengths)
    assert sorted(i for g in groups for i in g) == list(range(200))
    for group in groups:
        real = sum(lengths[i] for i in group)
        assert len(group) * max(lengths[i] for i in group) <= 2 * real


def test_a_preprocessing_without_a_window_takes_the_default_one_everywhere():
    """``preprocessing`` may leave target_length out or None (save_encoder writes None as "the
    default window"): embed raised TypeError on None, and evaluation took 1024 frames where the
    position table covers fewer; both now take the encoder's default window."""
    from sslam.evaluate import extract_cls
    from sslam.labels import synth_split

    encoder = Encoder(EncoderConfig(embed_dim=32, depth=1, num_heads=2, max_length=32)).eval()  # 512 frames
    clip = torch.randn(16000 * 6, generator=torch.Generator().manual_seed(0)) * 0.1
    split = synth_split("poly", False, 2)
    default = dict(encoder.preprocessing)
    assert default["target_length"] == 512
    expected_embedding, expected_cls = encoder.embed(clip, 16000).frames, extract_cls(encoder, split)
    for prep in ({**default, "target_length": None}, {"norm": "audioset"}):
        encoder.preprocessing = prep
        assert torch.equal(encoder.embed(clip, 16000).frames, expected_embedding)
        assert torch.equal(extract_cls(encoder, split), expected_cls)
