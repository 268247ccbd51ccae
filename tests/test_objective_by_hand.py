"""The stage-1 and stage-2 objectives against a second implementation written from SPEC 4-5.

Everything between the encoder's weights and the loss is rebuilt here in float64 with plain
tensor operations: patch embedding, the post-LN blocks, the teacher's targets, the decoder,
the mixtures, the partner pass, the stitched SRL target and the loss normalisation. Only the
weights (and the mask-token noise, drawn as the objective draws it) are shared, so a term
computed from the wrong layers, clips, masks or normaliser shows here as a different loss or
gradient.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sslam.masking import MaskConfig, block_masks_ref, kept_indices
from sslam.mixing import MixWindows
from sslam.model import EncoderConfig
from sslam.pretrain import DecoderConfig, ObjectiveConfig, Pretrainer

PATCH, FREQ_PATCHES = 16, 8


def embed(encoder, spec):
    """(B, 1, T, 128) -> (B, N, D) patch tokens plus their fixed positions."""
    conv = encoder.patch_embed
    tokens = F.conv2d(spec, conv.weight, conv.bias, stride=PATCH).flatten(2).transpose(1, 2)
    return tokens + encoder.pos_embed[:, : tokens.shape[1]]


def blocks(encoder, tokens):
    """(B, K, D) tokens -> (final (B, 1 + K, D), every block's FFN output (B, 1 + K, D))."""
    x = torch.cat([encoder.cls_token.expand(tokens.shape[0], -1, -1), tokens], 1)
    x = F.layer_norm(x, x.shape[-1:], encoder.pre_norm.weight, encoder.pre_norm.bias, encoder.pre_norm.eps)
    ffn_outputs = []
    for block in encoder.blocks:
        b, n, d = x.shape
        heads = encoder.cfg.num_heads
        q, k, v = F.linear(x, block.attn.qkv.weight, block.attn.qkv.bias).view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        attended = ((q @ k.transpose(-2, -1)) / math.sqrt(d // heads)).softmax(-1) @ v
        attended = F.linear(attended.transpose(1, 2).reshape(b, n, d), block.attn.proj.weight, block.attn.proj.bias)
        h = F.layer_norm(x + attended, (d,), block.norm1.weight, block.norm1.bias, block.norm1.eps)
        ffn = F.linear(F.gelu(F.linear(h, block.mlp.fc1.weight, block.mlp.fc1.bias)), block.mlp.fc2.weight, block.mlp.fc2.bias)
        x = F.layer_norm(h + ffn, (d,), block.norm2.weight, block.norm2.bias, block.norm2.eps)
        ffn_outputs.append(ffn)
    return x, ffn_outputs


def target(ffn_outputs, top_k):
    """SPEC 4.2: the last top_k FFN outputs without CLS, each instance-normalised over the
    tokens, averaged, then layer-normalised: (B, N, D)."""
    layers = [F.instance_norm(y[:, 1:].transpose(1, 2), eps=1e-5).transpose(1, 2) for y in ffn_outputs[-top_k:]]
    mean = sum(layers) / top_k
    return F.layer_norm(mean, mean.shape[-1:], eps=1e-5)


def decode(decoder, student_out, keep, noise, rows):
    """SPEC 4.3: kept outputs at their positions, noise elsewhere, then the conv layers
    (conv, channel LayerNorm, GELU, residual) and the final projection: (B', N, D)."""
    grid = noise.scatter(1, keep[..., None].expand(-1, -1, noise.shape[-1]), student_out[:, 1:])
    x = grid.view(grid.shape[0], rows, FREQ_PATCHES, -1).permute(0, 3, 1, 2)
    for layer in decoder.blocks:
        conv = layer[0]
        y = F.conv2d(x, conv.weight, conv.bias, padding=conv.weight.shape[-1] // 2, groups=conv.groups)
        y = F.gelu(F.layer_norm(y.permute(0, 2, 3, 1), y.shape[1:2], eps=1e-5)).permute(0, 3, 1, 2)
        x = x + y
    return F.linear(x.permute(0, 2, 3, 1).flatten(1, 2), decoder.proj.weight, decoder.proj.bias)


def distance(a, b):
    """||a - b||^2 / sqrt(D) over the last dim."""
    return ((a - b) ** 2).sum(-1) / math.sqrt(a.shape[-1])


def student(model, spec, keep, clones, noise):
    """(CLS outputs (B C, D), predictions (B C, N, D)) of the clips' clones under ``keep``."""
    tokens = embed(model.student, spec).repeat_interleave(clones, 0)
    kept = tokens.gather(1, keep[..., None].expand(-1, -1, tokens.shape[-1]))
    out, _ = blocks(model.student, kept)
    return out[:, 0], decode(model.decoder, out, keep, noise, spec.shape[2] // PATCH)


def stage1_losses(model, spec, keep, clones, noise):
    pred_cls, pred = student(model, spec, keep, clones, noise)
    with torch.no_grad():
        frame_target = target(blocks(model.teacher.encoder, embed(model.teacher.encoder, spec))[1], model.objective.top_k)
    masked = torch.ones(pred.shape[:2], dtype=torch.bool).scatter(1, keep, False)
    frame_target = frame_target.repeat_interleave(clones, 0)
    cls_target = frame_target.mean(1)  # EAT: the mean of the frame target
    sample_size = masked.sum()
    frame = distance(pred[masked], frame_target[masked]).sum() / sample_size
    return {"frame": frame, "cls": distance(pred_cls, cls_target).sum()}


def stage2_losses(model, spec, keep, clones, noise, windows: MixWindows):
    """SPEC 5: clean clips then their mixtures with clip i - 1 (element-wise max outside the
    windows), the mixtures under their clean clips' masks; frame targets of every clip, CLS
    targets from the last layer, and the SRL target of the mixtures: inside the windows the
    clean target, elsewhere its mean with the partner's target from a pass over its tokens
    outside the windows."""
    partner = spec.roll(1, 0).clone()
    for start in windows.starts:
        partner[:, :, start : start + windows.width] = -math.inf
    both = torch.cat([spec, torch.maximum(spec, partner)])
    keep = torch.cat([keep, keep])
    pred_cls, pred = student(model, both, keep, clones, noise)
    teacher, top_k = model.teacher.encoder, model.objective.top_k
    with torch.no_grad():
        layers = blocks(teacher, embed(teacher, both))[1]
        frame_target, cls_target = target(layers, top_k), target(layers, 1).mean(1)
        rows = spec.shape[2] // PATCH
        in_window = [any(s // PATCH <= r < (s + windows.width) // PATCH for s in windows.starts) for r in range(rows)]
        outside = torch.tensor([r * FREQ_PATCHES + f for r in range(rows) if not in_window[r] for f in range(FREQ_PATCHES)])
        partial = target(blocks(teacher, embed(teacher, spec)[:, outside])[1], top_k)
        clean = frame_target[: spec.shape[0]]
        stitched = clean.clone()
        stitched[:, outside] = partial.roll(1, 0)  # the partner of clip i is clip i - 1
        srl_target = (clean + stitched) / 2
    masked = torch.ones(pred.shape[:2], dtype=torch.bool).scatter(1, keep, False)
    sample_size = masked.sum()
    frame_target = frame_target.repeat_interleave(clones, 0)
    mixtures = slice(spec.shape[0] * clones, None)
    srl_target = srl_target.repeat_interleave(clones, 0)
    mixed_masked = masked[mixtures]
    srl = distance(pred[mixtures][mixed_masked], srl_target[mixed_masked]).sum()
    return {
        "frame": distance(pred[masked], frame_target[masked]).sum() / sample_size,
        "srl": model.objective.srl_weight * srl / sample_size,
        "cls": distance(pred_cls, cls_target.repeat_interleave(clones, 0)).sum(),
    }


def pretrainer(stage: int, clones: int, mix_width: int) -> Pretrainer:
    """A float64 model whose teacher, norms, biases and decoder all differ from their init."""
    torch.manual_seed(0)
    model = Pretrainer(
        EncoderConfig(embed_dim=32, depth=3, num_heads=4, max_length=32),
        ObjectiveConfig(stage=stage, clones=clones, top_k=2, mix_width=mix_width,
                        decoder=DecoderConfig(dim=32, groups=4, layers=2)),
    ).double()
    with torch.no_grad():
        for p in model.teacher.encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for p in (*model.student.parameters(), *model.decoder.parameters()):
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("stage, starts", [(1, None), (2, (16, 160)), (2, (0, 48)), (2, (112, 208))])
def test_the_objective_equals_a_second_implementation_of_spec(stage, starts):
    clips, clones, frames, width = 3, 2, 256, 48
    model = pretrainer(stage, clones, width)
    spec = torch.randn(clips, 1, frames, 128, dtype=torch.float64)
    grid = (frames // PATCH, FREQ_PATCHES)
    keep, _ = kept_indices(block_masks_ref(clips * clones, MaskConfig(grid=grid), torch.Generator().manual_seed(5)))
    windows = MixWindows(starts=starts, width=width) if stage == 2 else None

    losses = model(spec, keep, windows=windows, generator=torch.Generator().manual_seed(7))
    params = list(model.trainable_parameters())
    ours = torch.autograd.grad(losses.total, params)

    rows = clips * clones * (1 if stage == 1 else 2)
    noise = torch.randn(rows, grid[0] * grid[1], 32, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(7)) * 0.01  # as the objective draws it
    if stage == 1:
        expected = stage1_losses(model, spec, keep, clones, noise)
    else:
        expected = stage2_losses(model, spec, keep, clones, noise, windows)
    # The objective makes its targets and sums in float32 (as in training): float32 rounding.
    for name, value in expected.items():
        assert getattr(losses, name).item() == pytest.approx(value.item(), rel=1e-6), name
    reference = torch.autograd.grad(sum(expected.values()), params)
    ours, reference = torch.cat([g.flatten() for g in ours]), torch.cat([g.flatten() for g in reference])
    assert float((ours - reference).norm() / reference.norm()) < 1e-6
