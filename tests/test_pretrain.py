"""The pretraining objective, piece by piece on hand-checkable cases, and the stage-1 forward
against the official one (golden masked_forward.pt)."""

import dataclasses
import math

import pytest
import torch
from conftest import GOLDEN

from sslam.checkpoint import read_checkpoint
from sslam.mixing import MixWindows, mix_spectrograms, partner_keep_indices
from sslam.model import EncoderConfig
from sslam.pretrain import (
    CNNDecoder,
    DecoderConfig,
    EMATeacher,
    ObjectiveConfig,
    Pretrainer,
    cls_regression_sum,
    decoder_input,
    ema_decay,
    layer_targets,
    masked_regression_sum,
    masked_regression_sum_copied,
    regression_elements,
    srl_target,
    train_flops_per_clip,
)

TINY = EncoderConfig(embed_dim=32, depth=2, num_heads=2, max_length=8)


@pytest.fixture(scope="module")
def golden_forward(golden_masked_forward):
    return golden_masked_forward["tiny_pretrain_forward"]


@pytest.fixture(scope="module")
def official_tiny():
    ckpt = read_checkpoint(GOLDEN / "tiny_ckpt.pt")
    return Pretrainer.from_checkpoint(ckpt, ObjectiveConfig(stage=1, clones=8, top_k=2))


# ---- stage-1 parity with the official forward ----------------------------------------------


def test_official_decoder_shape_is_read_from_the_file(official_tiny):
    assert official_tiny.objective.decoder == DecoderConfig(dim=32, groups=16, kernel=3, layers=6)
    assert official_tiny.decoder.blocks[0][0].weight.shape == (32, 4, 3, 3)


def test_student_output_matches_official(official_tiny, golden_forward):
    g = golden_forward
    with torch.no_grad():
        out = official_tiny.student(g["source"], keep=g["ids_keep"], clones=8)
    assert (out.x - g["student_last_block_x"]).abs().max() < 1e-5


def test_targets_and_cls_loss_match_official(official_tiny, golden_forward):
    g = golden_forward
    keep, spec = g["ids_keep"], g["source"]
    with torch.no_grad():
        layers = official_tiny._teacher_layers(spec)
        target = layer_targets(layers, 2)
        rows = torch.arange(16) // 8
        masked = official_tiny._masked(keep, 512)
        assert torch.equal(masked, g["encoder_mask"].bool())
        sample_size = int(g["sample_size"])
        assert int(masked.sum()) == sample_size == 6560
        # the frame loss of the official decoder output against our targets, element by element
        reg = regression_elements(g["decoder_out"][masked], target[rows][masked])
        assert (reg - g["losses"]["IMAGE_regression"]).abs().max() < 1e-4
        # the CLS loss (EAT: mean of the top-K target), scaled by sample_size as fairseq logs it
        cls = official_tiny.student(spec, keep=keep, clones=8).x[:, 0]
        ours = regression_elements(cls, target.mean(1)[rows]) * sample_size
        assert ((ours - g["losses"]["cls"]).abs().max() / g["losses"]["cls"].abs().max()) < 1e-5
        y = target[rows][masked]
        assert abs(torch.sqrt(y.var(0) + 1e-6).mean().item() - g["scalars"]["target_var"]) < 1e-4


def test_full_stage1_loss_matches_official_up_to_mask_token_noise(official_tiny, golden_forward):
    g = golden_forward
    with torch.no_grad():
        losses = official_tiny(g["source"], g["ids_keep"], generator=torch.Generator().manual_seed(0))
        _, pred = official_tiny._student(g["source"], g["ids_keep"], 8, torch.Generator().manual_seed(0))
    official_cls = g["losses"]["cls"].sum() / 6560
    official_frame = g["losses"]["IMAGE_regression"].sum() / 6560
    assert abs(losses.cls.item() - official_cls.item()) / official_cls.item() < 1e-5
    # the decoder's mask tokens are fresh N(0, 0.01^2) noise in both runs
    assert abs(losses.frame.item() - official_frame.item()) / official_frame.item() < 0.02
    corr = torch.corrcoef(torch.stack([pred.flatten(), g["decoder_out"].flatten()]))[0, 1]
    assert corr > 0.99
    assert losses.sample_size == 6560


# ---- pieces ---------------------------------------------------------------------------------


def test_decoder_layers_residual_and_shapes():
    dec = CNNDecoder(16, DecoderConfig(dim=8, groups=4, kernel=3, layers=2))
    x = torch.randn(3, 4 * 2, 16)
    out = dec(x, (4, 2))
    assert out.shape == (3, 8, 16)
    # by hand: layer 0 (16 -> 8 channels) has no residual, layer 1 has one
    grid = x.transpose(1, 2).reshape(3, 16, 4, 2)
    conv0, conv1 = dec.blocks[0][0], dec.blocks[1][0]

    def ln_gelu(y):
        return torch.nn.functional.gelu(torch.nn.functional.layer_norm(y.movedim(1, -1), (8,)).movedim(-1, 1))

    h = ln_gelu(conv0(grid))
    h = ln_gelu(conv1(h)) + h
    expected = dec.proj(h.reshape(3, 8, 8).transpose(1, 2))
    assert torch.allclose(out, expected, atol=1e-6)


def test_decoder_input_places_kept_tokens_and_noise():
    kept = torch.randn(2, 3, 4)
    keep = torch.tensor([[0, 2, 5], [1, 3, 4]])
    grid = decoder_input(kept, keep, 6, 0.01, torch.Generator().manual_seed(0))
    assert torch.equal(grid[0, [0, 2, 5]], kept[0]) and torch.equal(grid[1, [1, 3, 4]], kept[1])
    noise = grid[0, [1, 3, 4]]
    assert noise.abs().max() < 0.06 and noise.abs().min() > 0


def test_ema_decay_schedule():
    assert ema_decay(0) == 0.9998
    assert math.isclose(ema_decay(50_000), 0.9998 + 0.5 * (0.99999 - 0.9998))
    assert ema_decay(100_000) == ema_decay(10**7) == 0.99999


def test_ema_teacher_update():
    from sslam.model import Encoder

    student = Encoder(TINY)
    teacher = EMATeacher(student)
    before = teacher.encoder.blocks[0].mlp.fc1.weight.clone()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    teacher.update(student, 0.75)
    after = teacher.encoder.blocks[0].mlp.fc1.weight
    assert torch.allclose(after, 0.75 * before + 0.25 * student.blocks[0].mlp.fc1.weight)
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.encoder.training
    assert teacher.encoder.blocks[0].mlp.fc1.weight.dtype == torch.float32
    # A student held in bf16 is read through a cast; the teacher stays fp32.
    half = Encoder(TINY).to(torch.bfloat16)
    before = after.clone()
    teacher.update(half, 0.5)
    assert after.dtype == torch.float32
    assert torch.equal(after, torch.lerp(before, half.blocks[0].mlp.fc1.weight.float(), 0.5))


def instance_norm_tokens(y: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """One layer's instance norm, written plainly: each channel over the tokens of (B, N, D)."""
    var, mean = torch.var_mean(y.float(), dim=1, keepdim=True, unbiased=False)
    return (y - mean) * torch.rsqrt(var + eps)


def test_instance_norm_and_targets_by_hand():
    y = torch.tensor([[[1.0, 10.0], [3.0, 10.0], [5.0, 16.0]]])  # (1, N=3, D=2)
    normed = instance_norm_tokens(y)
    col0 = (torch.tensor([1.0, 3.0, 5.0]) - 3) / math.sqrt(8 / 3 + 1e-5)
    assert torch.allclose(normed[0, :, 0], col0)
    a, b = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    expected = torch.nn.functional.layer_norm((instance_norm_tokens(a) + instance_norm_tokens(b)) / 2, (4,))
    assert torch.allclose(layer_targets([torch.randn(2, 5, 4), a, b], 2), expected, atol=1e-6)
    with pytest.raises(ValueError, match="top_k"):
        layer_targets([a], 2)


def test_losses_by_hand():
    pred = torch.zeros(4, 3, 4)  # B = 2 clips, C = 2 clones
    target = torch.stack([torch.ones(3, 4), 2 * torch.ones(3, 4)])
    masked = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 0], [0, 0, 1]], dtype=torch.bool)
    # rows 0, 1 use clip 0 (error 1 per dim), rows 2, 3 clip 1 (error 4 per dim); D = 4
    expected = (3 * 4 * 1 + 1 * 4 * 4) / 2
    assert masked_regression_sum(pred, target, masked, clones=2).item() == pytest.approx(expected)
    cls = torch.zeros(4, 4)
    assert cls_regression_sum(cls, torch.ones(2, 4), clones=2).item() == pytest.approx(4 * 4 / 2)
    pred, target = torch.randn(6, 5, 8), torch.randn(2, 5, 8)
    masked = torch.rand(6, 5) < 0.6
    assert masked_regression_sum(pred, target, masked, 3).item() == pytest.approx(
        masked_regression_sum_copied(pred, target, masked, 3).item(), rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_regression_loss_keeps_no_fp32_copy_and_has_autograds_gradient(dtype):
    """The frame loss keeps pred and target for its backward instead of their fp32 difference
    over every clone (the same size in fp32, twice pred's in bf16), and its gradient is the one autograd gives the plain formula, bit for bit."""
    b, clones, n, d = 2, 8, 37, 24  # 8 clones as in stage 2
    pred = torch.randn(b * clones, n, d, dtype=dtype, requires_grad=True)
    target, masked = torch.randn(b, n, d), torch.rand(b * clones, n) < 0.7

    def plain(pred):
        diff = pred.float().view(b, clones, n, d) - target[:, None]
        return (diff.pow(2).sum(-1).view(b * clones, n) * masked).sum() / math.sqrt(d)

    def kept_bytes(loss_fn):
        kept = {}

        def pack(t):
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_fn(pred)
        return loss, sum(kept.values())

    expected, plain_bytes = kept_bytes(plain)
    loss, loss_bytes = kept_bytes(lambda p: masked_regression_sum(p, target, masked, clones))
    assert torch.equal(loss, expected)
    assert torch.equal(torch.autograd.grad(0.37 * loss, pred)[0], torch.autograd.grad(0.37 * expected, pred)[0])
    assert loss_bytes == pred.nbytes + target.nbytes + masked.nbytes
    if dtype == torch.bfloat16:  # training under autocast: pred + 1/8 fp32 target < fp32 difference
        assert loss_bytes < 0.7 * plain_bytes
    with pytest.raises(ValueError, match="target must not require gradients"):
        masked_regression_sum(pred, target.requires_grad_(), masked, clones)


def test_srl_target_stitching_by_hand():
    """Windows at frames 32 and 400 of 1024 (SPEC verification): rows 2-16 and 25-39 equal the
    clean target, every other row is the mean of the clean target and the partner's partial
    target, partial rows consumed in order."""
    b, rows, freq, d = 3, 64, 8, 4
    windows = MixWindows(starts=(32, 400), width=240)
    clean = torch.randn(b, rows * freq, d)
    kept_rows = rows - 30
    partial = torch.arange(b * kept_rows, dtype=torch.float32).view(b, kept_rows, 1, 1).expand(b, kept_rows, freq, d)
    partial = partial.reshape(b, kept_rows * freq, d)
    out = srl_target(clean, partial, windows, freq).view(b, rows, freq, d)
    clean_rows = clean.view(b, rows, freq, d)
    inside = list(range(2, 17)) + list(range(25, 40))
    assert torch.equal(out[:, inside], clean_rows[:, inside])
    mixed = [r for r in range(rows) if r not in inside]
    for i in range(b):
        foreign = (i - 1) % b
        for j, r in enumerate(mixed):
            assert torch.allclose(out[i, r], 0.5 * (clean_rows[i, r] + foreign * kept_rows + j))
    assert partner_keep_indices(windows).numel() == kept_rows * freq == 272


def small_stage2(decoder: DecoderConfig):
    """(model, spectrograms, kept indices, windows): a tiny stage-2 setup, 3 clips x 2 clones."""
    torch.manual_seed(0)
    cfg = EncoderConfig(embed_dim=32, depth=2, num_heads=2, max_length=16)
    model = Pretrainer(cfg, ObjectiveConfig(stage=2, clones=2, top_k=2, mix_width=48, decoder=decoder))
    spec = torch.randn(3, 1, 256, 128)
    keep = torch.stack([torch.randperm(128)[:25] for _ in range(6)])
    return model, spec, keep, MixWindows(starts=(16, 96), width=48)


def test_stage2_forward_terms():
    model, spec, keep, windows = small_stage2(DecoderConfig(dim=16, groups=4, layers=2))
    losses = model(spec, keep, windows=windows, generator=torch.Generator().manual_seed(1))
    assert losses.sample_size == 2 * 6 * (128 - 25)
    assert torch.isfinite(losses.total) and losses.srl > 0
    assert torch.allclose(losses.total, losses.frame + losses.srl + losses.cls)
    losses.total.backward()
    assert model.student.blocks[0].attn.qkv.weight.grad is not None
    assert all(p.grad is None for p in model.teacher.parameters())
    # the mixture really is the rolled max outside the windows
    mixed = mix_spectrograms(spec, windows)
    assert torch.equal(mixed[1, :, :16], torch.maximum(spec[1, :, :16], spec[0, :, :16]))
    assert torch.equal(mixed[1, :, 16:64], spec[1, :, 16:64])
    with pytest.raises(ValueError, match="windows"):
        model(spec, keep)
    with pytest.raises(ValueError, match="at least 2 clips"):  # it would be mixed with itself
        model(spec[:1], keep[:2], windows=windows)


def test_stage2_patch_input_of_another_patch_size_gives_the_spectrograms_losses():
    """8 x 8 patches (B, N, 64) are mixed by 8-frame rows: the losses are those of the same
    clips given as spectrograms (mixing them by 16-frame rows changed the loss silently)."""
    from sslam.features import patchify

    cfg = EncoderConfig(embed_dim=32, depth=1, num_heads=2, patch_size=8, mel_bins=64, max_length=16)
    objective = ObjectiveConfig(stage=2, clones=2, top_k=1, mix_width=8, decoder=DecoderConfig(dim=16, groups=4, layers=1))
    spec = torch.randn(3, 1, 64, 64)
    keep = torch.stack([torch.randperm(64)[:5] for _ in range(6)])
    torch.manual_seed(0)
    model = Pretrainer(cfg, objective)
    windows = MixWindows(starts=(8, 40), width=8)
    terms = [model(x, keep, windows=windows, generator=torch.Generator().manual_seed(1)).terms()
             for x in (spec, patchify(spec, 8))]
    assert {k: v.item() for k, v in terms[0].items()} == {k: v.item() for k, v in terms[1].items()}


@pytest.mark.parametrize("field, value", [
    ("stage", 3), ("stage", 0), ("clones", 0), ("top_k", 0), ("clones", 2.0), ("mix_width", -16),
    ("srl_weight", -1.0), ("cls_loss", float("nan")), ("srl_weight", True),
])
def test_objective_settings_are_checked_by_name(field, value):
    with pytest.raises(ValueError, match=f"ObjectiveConfig.{field}="):
        ObjectiveConfig(**{field: value})


def test_objective_settings_take_numpy_numbers_as_python_ones():
    import numpy as np

    objective = ObjectiveConfig(stage=np.int64(2), clones=np.int64(4), srl_weight=np.float32(2.0))
    assert objective == ObjectiveConfig(stage=2, clones=4) and type(objective.clones) is int


def test_compiled_networks_give_the_eager_losses_and_gradients():
    """compile_networks compiles the student, decoder and teacher (both of its stage-2 input
    shapes) in place: parameters and state-dict keys are unchanged, losses and gradients equal."""
    model, spec, keep, windows = small_stage2(DecoderConfig(dim=16, groups=4, layers=2))
    keys = list(model.state_dict())

    def run():
        model.zero_grad()
        losses = model(spec, keep, windows=windows, generator=torch.Generator().manual_seed(1))
        losses.total.backward()
        return losses.total.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eager, eager_grads = run()
    torch._dynamo.reset()
    model.compile_networks(backend="aot_eager", fullgraph=True)
    compiled, grads = run()
    assert list(model.state_dict()) == keys
    assert all(m._compiled_call_impl is not None for m in (model.student, model.decoder, model.teacher.encoder))
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    assert grads.keys() == eager_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    model.update_teacher(0.5)  # the EMA still reaches the compiled teacher's parameters
    assert torch.isfinite(run()[0])


def test_compiled_networks_are_specialised_to_the_step_shapes():
    """The student's forward is the teacher's code, which stage 2 runs on two shapes: dynamo
    would then compile the student for symbolic shapes (its automatic dynamic). Every network is
    compiled for the step's fixed shapes instead (torch 2.11's inductor failed on the symbolic
    student graph for a GPU)."""
    model, spec, keep, windows = small_stage2(DecoderConfig(dim=16, groups=4, layers=2))
    graphs = []

    def record(gm, inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    model.compile_networks(backend=record)
    for step in range(2):
        losses = model(spec, keep, windows=windows, generator=torch.Generator().manual_seed(step))
        losses.total.backward()
    assert len(graphs) == 4  # the teacher's two shapes, the student, the decoder: no recompiles
    inputs = [n.meta["example_value"] for gm in graphs for n in gm.graph.nodes if n.op == "placeholder"]
    symbolic = [x for x in inputs if not isinstance(x, torch.Tensor) or not all(type(s) is int for s in x.shape)]
    assert not symbolic


def test_checkpointed_decoder_gives_the_same_gradients_and_saves_less():
    """Recomputing the decoder in the backward is exact (it draws no random numbers) and keeps
    only its input instead of every layer's activations."""
    model, spec, keep, windows = small_stage2(DecoderConfig(dim=32, groups=4, layers=3))

    def run(checkpoint: bool):
        model.zero_grad()
        model.checkpoint_decoder = checkpoint
        saved = {}

        def pack(t):
            saved[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            losses = model(spec, keep, windows=windows, generator=torch.Generator().manual_seed(1))
        losses.total.backward()
        return losses.total.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, sum(saved.values())

    plain, plain_grads, plain_bytes = run(False)
    again, grads, checkpointed_bytes = run(True)
    assert torch.equal(plain, again) and plain_grads.keys() == grads.keys()
    assert all(torch.equal(plain_grads[n], grads[n]) for n in grads)
    decoder_activation = 6 * 128 * 32 * 4  # one (B * clones, N, D) fp32 tensor
    assert checkpointed_bytes < plain_bytes - 3 * decoder_activation


def test_flops_of_the_official_step():
    from sslam.model import VARIANTS

    eat = train_flops_per_clip(VARIANTS["base"], ObjectiveConfig(stage=1, clones=16), 1024, 102)
    sslam = train_flops_per_clip(VARIANTS["base"], ObjectiveConfig(stage=2, clones=8), 1024, 102)
    assert abs(eat / 1e12 - 1.083) < 0.002 and abs(sslam / 1e12 - 1.230) < 0.003


@pytest.mark.parametrize("stage", [1, 2])
def test_teacher_targets_are_made_before_the_student_runs(stage):
    """The teacher's layer results and the targets' temporaries are freed before the student's
    activations fill the memory: every teacher pass comes before the student's."""
    model, spec, keep, windows = small_stage2(DecoderConfig(dim=16, groups=4, layers=2))
    model.objective = dataclasses.replace(model.objective, stage=stage)
    order = []
    model.student.blocks[0].register_forward_pre_hook(lambda *_: order.append("student"))
    model.teacher.encoder.blocks[0].register_forward_pre_hook(lambda *_: order.append("teacher"))
    model(spec, keep, windows=windows if stage == 2 else None)
    assert order == ["teacher"] * stage + ["student"]  # on the CPU the teacher's passes are not packed


@pytest.mark.parametrize("change, pattern", [
    ({"blocks.0.0.weight": None}, "blocks.0.0.weight: missing"),
    ({"proj.weight": None}, "proj.weight: missing"),
    ({"blocks.0.0.weight": torch.ones(32)}, r"blocks.0.0.weight \(32,\) .*not a grouped conv"),
    ({"blocks.0.0.weight": torch.ones(32, 0, 3, 3)}, "input channels per group"),
    # A 1-MB tensor declaring 4001 x 4001 kernels: the decoder it implies (about 2 GB per layer)
    # is compared on the meta device, never built.
    ({"blocks.0.0.weight": torch.ones(32, 2, 1, 4001)}, "not a grouped conv"),
    ({"blocks.0.0.weight": torch.ones(32, 2, 4001, 4001)[:, :, :1].expand(32, 2, 4001, 4001)},
     r"shape mismatches .*blocks\.1\.0\.weight"),
])
def test_a_damaged_decoder_in_an_init_file_is_named_before_anything_is_built(change, pattern):
    from sslam.checkpoint import CheckpointError

    ckpt = read_checkpoint(GOLDEN / "tiny_ckpt.pt")
    decoder = dict(ckpt.decoder)
    for key, value in change.items():
        if value is None:
            del decoder[key]
        else:
            decoder[key] = value
    damaged = dataclasses.replace(ckpt, decoder=decoder)
    with pytest.raises(CheckpointError, match=f"(?s)tiny_ckpt.pt.*{pattern}"):
        Pretrainer.from_checkpoint(damaged, ObjectiveConfig(stage=1, clones=8, top_k=2))


def test_pretrain_init_with_a_damaged_decoder_names_the_file(tmp_path, capsys):
    """The trainer reads the file's decoder sizes first (to note unused settings): the error
    there names the file too."""
    from sslam.cli import main

    tiny = torch.load(GOLDEN / "tiny_ckpt.pt", weights_only=True)
    model = {k: v for k, v in tiny["model"].items() if k != "modality_encoders.IMAGE.decoder.proj.weight"}
    torch.save(dict(tiny, model=model), tmp_path / "init.pt")
    assert main(["pretrain", "--preset", "tiny", "--init", str(tmp_path / "init.pt"), "--out", str(tmp_path / "run"),
                 "--model.decoder_layers=2", "--optim.max_steps=1"]) == 2
    assert f"{tmp_path / 'init.pt'}: its decoder: proj.weight: missing" in capsys.readouterr().err


def test_the_default_objective_averages_every_layer_of_any_depth():
    """EAT averages all the teacher's layers (12 of ViT-B, 24 of ViT-L): the default top_k was
    ViT-B's 12, so a deeper encoder averaged half its layers and a shallower one was refused."""
    from sslam.model import VARIANTS

    for depth in (2, 24):
        cfg = VARIANTS["tiny"].replace(depth=depth)
        assert Pretrainer(cfg, ObjectiveConfig()).objective.top_k == depth
    assert Pretrainer(VARIANTS["tiny"].replace(depth=4), ObjectiveConfig(top_k=3)).objective.top_k == 3
