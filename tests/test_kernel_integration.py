"""The model, objective and trainer pick the PyTorch references on CPU, and their Triton path
(run here by the interpreter) gives the same encoder outputs and losses."""

import importlib
import os

import pytest
import torch

from sslam.mixing import MixWindows
from sslam.model import Encoder, EncoderConfig
from sslam.pretrain import DecoderConfig, ObjectiveConfig, Pretrainer

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="checks the interpreted kernel path on a CPU-only machine",
)

attention_kernel = importlib.import_module("sslam.kernels.attention")  # the function shares its name
CFG = EncoderConfig(embed_dim=32, depth=2, num_heads=2, max_length=8)


def test_references_are_chosen_on_cpu(monkeypatch):
    monkeypatch.delenv("SSLAM_KERNELS", raising=False)
    model = Encoder(CFG)
    assert model._attention_impl(torch.zeros(1)) == "sdpa"
    monkeypatch.setenv("SSLAM_KERNELS", "1")
    assert model._attention_impl(torch.zeros(1)) == "triton"
    # Heads wider than the kernel holds (192 > 128) take SDPA, and run.
    wide = Encoder(EncoderConfig(embed_dim=192, depth=1, num_heads=1, max_length=8)).eval()
    assert wide._attention_impl(torch.zeros(1)) == "sdpa"
    with torch.no_grad():
        assert wide(torch.randn(1, 1, 32, 128)).x.shape == (1, 17, 192)


def test_encoder_output_equal_through_the_kernels(monkeypatch):
    model = Encoder(CFG).eval()
    spec = torch.randn(2, 1, 64, 128)
    keep = torch.stack([torch.randperm(32)[:9] for _ in range(4)])
    with torch.no_grad():
        ref = model(spec, keep=keep, clones=2, layer_results=True)
        shared_ref = model(spec, keep=torch.arange(0, 32, 3)).x
        monkeypatch.setenv("SSLAM_KERNELS", "1")
        out = model(spec, keep=keep, clones=2, layer_results=True)
        shared = model(spec, keep=torch.arange(0, 32, 3)).x
        # int32 indices, which check_keep accepts, take the kernel path too (the gather refused them)
        shared_int32 = model(spec, keep=torch.arange(0, 32, 3, dtype=torch.int32)).x
    assert (out.x - ref.x).abs().max() < 1e-4
    for a, b in zip(out.layer_results, ref.layer_results):
        assert (a - b).abs().max() < 1e-4
    assert (shared - shared_ref).abs().max() < 1e-4
    assert torch.equal(shared_int32, shared)


def test_packed_sets_equal_through_the_kernels(monkeypatch):
    """The packed attention kernel (cu_seqlens) keeps each set's sequences apart."""
    model = Encoder(CFG).eval()
    sets = [torch.randn(2, 32, 32), torch.randn(3, 11, 32)]
    with torch.no_grad():
        ref = [model.forward_tokens(t, layer_results=True) for t in sets]
        monkeypatch.setenv("SSLAM_KERNELS", "1")
        out = model.forward_packed(sets, layer_results=True)
    for o, r in zip(out, ref):
        assert o.x.shape == r.x.shape
        for a, b in zip([o.x, *o.layer_results], [r.x, *r.layer_results]):
            assert (a - b).abs().max() < 1e-4


def small_stage2(decoder_layers: int = 1):
    """(model, spectrograms, kept indices, windows) of a small stage-2 step: 3 clips, 2 clones."""
    torch.manual_seed(0)
    decoder = DecoderConfig(dim=16, groups=4, layers=decoder_layers)
    model = Pretrainer(CFG, ObjectiveConfig(stage=2, clones=2, top_k=2, mix_width=16, decoder=decoder))
    keep = torch.stack([torch.randperm(32)[:7] for _ in range(6)])
    return model, torch.randn(3, 1, 64, 128), keep, MixWindows(starts=(0, 32), width=16)


def test_stage2_loss_and_gradients_equal_through_the_kernels(monkeypatch):
    model, spec, keep, windows = small_stage2()

    def run():
        model.zero_grad()
        losses = model(spec, keep, windows=windows, generator=torch.Generator().manual_seed(3))
        losses.total.backward()
        return losses, model.student.blocks[0].attn.qkv.weight.grad.clone()

    ref, ref_grad = run()
    monkeypatch.setenv("SSLAM_KERNELS", "1")
    teacher_passes = []
    model.teacher.encoder.blocks[0].register_forward_pre_hook(lambda *_: teacher_passes.append(1))
    out, grad = run()
    assert len(teacher_passes) == 1  # its two passes packed into one
    for name in ("total", "frame", "cls", "srl"):
        a, b = getattr(out, name), getattr(ref, name)
        assert abs(a.item() - b.item()) <= 1e-4 * abs(b.item()) + 1e-5, name
    assert (grad - ref_grad).abs().max() <= 1e-3 * ref_grad.abs().max()


def test_recomputed_blocks_keep_the_attention_kernel_outputs(monkeypatch):
    """With the Triton attention, recomputing the blocks' cheap part still gives the same
    gradients bit for bit: the kernel's outputs are kept, never recomputed."""
    monkeypatch.setenv("SSLAM_KERNELS", "1")
    model = Encoder(CFG).train()
    spec = torch.randn(2, 1, 64, 128)
    keep = torch.stack([torch.randperm(32)[:9] for _ in range(4)])
    grad_out = torch.randn(4, 10, 32)
    calls = []
    forward = attention_kernel._forward
    monkeypatch.setattr(attention_kernel, "_forward", lambda *a: calls.append(1) or forward(*a))

    def run(recompute: bool):
        model.zero_grad(set_to_none=True)
        model.set_block_checkpointing("selective" if recompute else "off")
        calls.clear()
        model(spec, keep=keep, clones=2).x.backward(grad_out)
        return {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)

    plain, plain_calls = run(False)
    recomputed, recomputed_calls = run(True)
    assert all(torch.equal(plain[n], recomputed[n]) for n in plain)
    assert plain_calls == recomputed_calls == CFG.depth


def test_recomputation_through_the_kernels_is_exact(monkeypatch):
    """Decoder layers (token-major kernel) and student blocks recomputed in the backward give
    the stage-2 losses and gradients of the plain kernel path, bit for bit."""
    monkeypatch.setenv("SSLAM_KERNELS", "1")
    model, spec, keep, windows = small_stage2(decoder_layers=2)

    def run(recompute: bool):
        model.zero_grad(set_to_none=True)
        model.checkpoint_decoder = recompute
        model.student.set_block_checkpointing("selective" if recompute else "off")
        losses = model(spec, keep, windows=windows, generator=torch.Generator().manual_seed(3))
        losses.total.backward()
        return losses.total.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (plain, plain_grads), (again, grads) = run(False), run(True)
    assert torch.equal(plain, again) and plain_grads.keys() == grads.keys()
    assert all(torch.equal(plain_grads[n], grads[n]) for n in grads)


@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-3), ("fp16-pure", 2e-3)])
def test_trainer_step_equal_through_the_kernels(monkeypatch, tmp_path, precision, tolerance):
    """The fused feature kernel (with stage-2 mixing) feeds the same loss as the reference, also
    with fp16 weights and activations (bf16 is checked on a GPU: the interpreter gets it wrong)."""
    from test_train import small

    from sslam.train import Trainer

    def first_loss(out):
        cfg = small(out, stage=2, steps=1, run__precision=precision)
        cfg.data.batch_size, cfg.data.target_length, cfg.objective.clones = 2, 64, 1
        cfg.objective.mix_width = 16
        trainer = Trainer(cfg, log=lambda *a: None)
        loader = iter(trainer.data_loader())
        trainer._steps_at_start = 0
        return trainer.train_step([next(loader)])

    ref = first_loss(tmp_path / "ref")
    monkeypatch.setenv("SSLAM_KERNELS", "1")
    out = first_loss(tmp_path / "kernels")
    for name in ("loss", "frame", "cls", "srl"):
        assert abs(out[name] - ref[name]) <= tolerance * abs(ref[name]) + 1e-4, (name, out[name], ref[name])


def test_embeddings_equal_through_the_fused_feature_kernel(monkeypatch):
    model = Encoder(CFG).eval()
    model.preprocessing = {"sample_rate": 16000, "target_length": 128, "norm": "audioset"}
    clips = [torch.randn(n) * 0.1 for n in (9000, 20480, 700)]
    ref = model.embed(clips, 22050)
    monkeypatch.setenv("SSLAM_KERNELS", "1")
    out = model.embed(clips, 22050)
    assert (out.utterance - ref.utterance).abs().max() < 1e-4
    assert (out.frames - ref.frames).abs().max() < 1e-4
    assert torch.equal(out.frame_mask, ref.frame_mask) and torch.equal(out.num_rows, ref.num_rows)


def test_the_fused_feature_kernel_does_not_pad_short_clips_to_a_long_one(monkeypatch):
    """With crop=True only a window of each clip is kept, but its DC removal needs the whole
    clip: one batch padded every clip to the longest (16 clips of 2 s beside a 10-min file:
    614 MB for 40 MB of audio). Clips of similar length now share a launch."""
    import importlib

    fused = importlib.import_module("sslam.kernels.fbank_patch")  # the module: the package exports the function

    model = Encoder(CFG).eval()
    model.preprocessing = {"sample_rate": 16000, "target_length": 128, "norm": "audioset"}
    clips = [torch.randn(n) * 0.1 for n in (16000, 160000, 17000)]
    ref = model.embed(clips, 16000, crop=True)
    launches, kernel = [], fused.fbank_patch

    def spy(waves, lengths, **kwargs):
        launches.append((tuple(waves.shape), lengths.tolist()))
        return kernel(waves, lengths, **kwargs)

    monkeypatch.setattr(fused, "fbank_patch", spy)
    monkeypatch.setenv("SSLAM_KERNELS", "1")
    out = model.embed(clips, 16000, crop=True)
    assert sorted(launches) == [((1, 160000), [160000]), ((2, 17000), [16000, 17000])]
    assert (out.utterance - ref.utterance).abs().max() < 1e-4
    assert (out.frames - ref.frames).abs().max() < 1e-4
