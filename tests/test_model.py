"""The encoder: configuration, position table, attention paths, masked and padded forwards."""

import math

import pytest
import torch

from sslam.features import patchify
from sslam.model import VARIANTS, Encoder, EncoderConfig, create_model, sincos_positions

SMALL = EncoderConfig(embed_dim=48, depth=2, num_heads=3, max_length=16)


def small_model(**kw) -> Encoder:
    return Encoder(SMALL.replace(**kw)).eval()


def test_position_table_matches_the_official_fp32_table(golden_masked_forward):
    from conftest import load_golden

    ckpt = load_golden("tiny_ckpt.pt")
    official = ckpt["model"]["_ema"]["modality_encoders.IMAGE.fixed_positional_encoder.positions"][0]
    ours = sincos_positions(64, 768, 8)
    assert ours.shape == official.shape
    assert (ours - official).abs().max() < 1e-6


def test_position_layout_frequency_first():
    table = sincos_positions(16, 3, 8)  # quarter = 4
    # token (t=2, f=5): frequency sin/cos in the first half, time in the second
    row = table[2 * 8 + 5]
    omega = 1.0 / 10000 ** (torch.arange(4) / 4)
    assert torch.allclose(row[:4], torch.sin(5 * omega))
    assert torch.allclose(row[4:8], torch.cos(5 * omega))
    assert torch.allclose(row[8:12], torch.sin(2 * omega))
    assert torch.allclose(row[12:], torch.cos(2 * omega))


@pytest.mark.parametrize(
    "name,expected", [("base", 85_254_144), ("large", 302_575_616)]
)
def test_parameter_counts_of_the_official_sizes(name, expected):
    with torch.device("meta"):
        model = Encoder(VARIANTS[name])
    assert model.num_parameters() == expected  # SPEC 2.1 / 2.3: without the fixed positions


def test_config_validation():
    with pytest.raises(ValueError, match="not divisible"):
        EncoderConfig(embed_dim=100, num_heads=3)
    with pytest.raises(ValueError, match="unknown field"):
        EncoderConfig.from_dict({"embed_dim": 64, "colour": "red"})
    with pytest.raises(ValueError, match="unknown variant"):
        create_model("huge")
    assert create_model("tiny", depth=3).cfg.depth == 3


def test_sdpa_and_math_attention_agree():
    model = small_model()
    x = torch.randn(3, 1, 64, 128)
    with torch.no_grad():
        a = model.set_attention("sdpa")(x, layer_results=True)
        b = model.set_attention("math")(x, layer_results=True)
    assert torch.allclose(a.x, b.x, atol=1e-5)
    for la, lb in zip(a.layer_results, b.layer_results):
        assert torch.allclose(la, lb, atol=1e-5)
    with pytest.raises(ValueError, match="attention="):
        model.set_attention("flash")


@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_key_padding_mask_hides_padded_tokens(impl):
    model = small_model().set_attention(impl)
    tokens = model.patchify_embed(torch.randn(2, 1, 64, 128))
    pad = torch.zeros(2, 32, dtype=torch.bool)
    pad[0, 20:] = True
    other = tokens.clone()
    other[0, 20:] = torch.randn_like(other[0, 20:]) * 5
    with torch.no_grad():
        a = model.forward_tokens(tokens, key_padding_mask=pad).x
        b = model.forward_tokens(other, key_padding_mask=pad).x
        alone = model.forward_tokens(tokens[:1, :20]).x
    assert torch.allclose(a[0, :21], b[0, :21], atol=1e-5)  # CLS + the 20 real tokens
    assert torch.allclose(a[0, :21], alone[0], atol=1e-5)
    assert torch.allclose(a[1], b[1])


def test_masked_student_path_gathers_kept_tokens_per_clone():
    model = small_model()
    spec = torch.randn(2, 1, 64, 128)
    clones = 3
    keep = torch.stack([torch.randperm(32)[:7].sort().values for _ in range(2 * clones)])
    with torch.no_grad():
        out = model(spec, keep=keep, clones=clones, layer_results=True, block_outputs=True)
        tokens = model.patchify_embed(spec)
        for r in range(2 * clones):
            alone = model.forward_tokens(tokens[r // clones][keep[r]][None]).x
            assert torch.allclose(out.x[r], alone[0], atol=1e-5)
    assert out.x.shape == (6, 8, 48)
    assert len(out.layer_results) == len(out.block_outputs) == 2
    assert torch.equal(out.block_outputs[-1], out.x)


def run_sets(model, sets, packed: bool):
    """(each set's EncoderOutput, how many times the first block ran, the sets' input gradients)."""
    sets = [t.clone().requires_grad_() for t in sets]
    calls = []
    hook = model.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        if packed:
            outs = model.forward_packed(sets, layer_results=True, block_outputs=True)
        else:
            outs = [model.forward_tokens(t, layer_results=True, block_outputs=True) for t in sets]
    finally:
        hook.remove()
    sum((o.x ** 2).sum() + o.layer_results[0].sum() for o in outs).backward()
    return outs, len(calls), [t.grad for t in sets]


def test_packed_sets_give_each_sets_own_outputs_and_gradients():
    """Sets of different lengths in one packed pass (the packed attention: its reference on the
    CPU) give what a pass per set gives, gradients included."""
    model = small_model().set_attention("triton")
    sets = [torch.randn(3, 7, 48), torch.randn(2, 4, 48), torch.randn(1, 1, 48)]
    packed, calls, grads = run_sets(model, sets, packed=True)
    alone, alone_calls, alone_grads = run_sets(model, sets, packed=False)
    assert (calls, alone_calls) == (1, 3)
    for p, a in zip(packed, alone):
        assert p.x.shape == a.x.shape and len(p.layer_results) == len(p.block_outputs) == 2
        for got, want in zip([p.x, *p.layer_results, *p.block_outputs], [a.x, *a.layer_results, *a.block_outputs]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, alone_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_sets_run_one_by_one_without_the_packed_attention_or_with_stochastic_depth():
    sets = [torch.randn(2, 5, 48), torch.randn(2, 3, 48)]
    assert run_sets(small_model().set_attention("sdpa"), sets, packed=True)[1] == 2
    model = small_model(drop_path_rate=0.5).set_attention("triton")
    assert run_sets(model.eval(), sets, packed=True)[1] == 1
    assert run_sets(model.train(), sets, packed=True)[1] == 2  # stochastic depth is drawn per clip
    with pytest.raises(ValueError, match=r"token_sets\[1\]: expected \(B, N, 48\)"):
        model.forward_packed([sets[0], torch.randn(2, 3, 40)])


def test_layer_results_are_ffn_outputs():
    model = small_model(depth=1)
    x = torch.randn(1, 1, 32, 128)
    with torch.no_grad():
        out = model(x, layer_results=True)
        tokens = model.patchify_embed(x)
        h0 = model.pre_norm(torch.cat([model.cls_token, tokens], 1))
        blk = model.blocks[0]
        h = blk.norm1(h0 + blk.attn(h0))
        m = blk.mlp(h)
    assert torch.allclose(out.layer_results[0], m, atol=1e-6)
    assert torch.allclose(out.x, blk.norm2(h + m), atol=1e-6)


def test_embed_patches_equals_the_convolution():
    model = small_model()
    spec = torch.randn(2, 1, 48, 128)
    assert torch.allclose(model.embed_patches(patchify(spec)), model.patchify_embed(spec), atol=1e-5)


def test_input_validation():
    model = small_model()
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.randn(1, 1, 40, 128))
    with pytest.raises(ValueError, match="exceeds the position table"):
        model(torch.randn(1, 1, 16 * 17, 128))
    with pytest.raises(ValueError, match=r"\(B, N, 256\) patches"):
        model(torch.randn(1, 64, 128))
    with pytest.raises(ValueError, match=r"\(B, 1, T, 128\)"):
        model(torch.randn(1, 2, 64, 128))


def test_drop_path_only_in_training():
    model = small_model(drop_path_rate=0.5)
    x = torch.randn(4, 1, 32, 128)
    with torch.no_grad():
        assert torch.equal(model(x).x, model(x).x)
        model.train()
        assert not torch.equal(model(x).x, model(x).x)


def test_drop_path_rescales_the_samples_it_keeps():
    """Stochastic depth keeps each sample with probability 1 - rate and divides it by that, so
    the expected output is the input (unscaled, fine-tuning would train a model whose blocks
    grow weaker at evaluation)."""
    from sslam.model import drop_path

    x = torch.randn(4000, 3, 2)
    out = drop_path(x, 0.25, training=True)
    kept = out.flatten(1).ne(0).all(1)
    assert torch.equal(out[kept], x[kept] / 0.75) and not out[~kept].any()
    assert 0.7 < kept.float().mean() < 0.8


def test_the_variants_are_the_official_architectures():
    """SPEC 2.1 and 2.3 (ViT-B and ViT-L) and 6.1 (the fine-tuning head's LayerNorm)."""
    base, large = VARIANTS["base"], VARIANTS["large"]
    assert (base.embed_dim, base.depth, base.num_heads, base.mlp_ratio) == (768, 12, 12, 4.0)
    assert (large.embed_dim, large.depth, large.num_heads, large.mlp_ratio) == (1024, 24, 16, 4.0)
    for cfg in (base, large):
        assert (cfg.patch_size, cfg.mel_bins, cfg.norm_eps, cfg.qkv_bias) == (16, 128, 1e-6, True)
        assert (cfg.drop_path_rate, cfg.num_classes, cfg.head_norm_eps) == (0.0, 0, 1e-6)


def test_classification_head():
    model = small_model(num_classes=5)
    assert model.classify(torch.randn(2, 48)).shape == (2, 5)
    with pytest.raises(RuntimeError, match="no classification head"):
        small_model().classify(torch.randn(2, 48))
    with pytest.raises(ValueError, match=r"cls: expected the \(B, 48\) CLS outputs, got \(2, 9, 48\)"):
        model.classify(torch.randn(2, 9, 48))  # the whole output, not its CLS column
    with pytest.raises(ValueError, match=r"tokens: expected \(B, N, 48\) tokens"):
        model.forward_tokens(torch.randn(2, 9, 40))


def test_timm_style_features_head_and_reset_classifier():
    """timm's names: forward_features (the final tokens), forward_head (CLS -> fc_norm -> head,
    or the normalised CLS with pre_logits), num_features, reset_classifier."""
    model = small_model(num_classes=5)
    spec = torch.randn(2, 1, 32, 128)
    features = model.forward_features(spec)
    assert torch.equal(features, model(spec).x) and model.num_features == 48
    logits = model.forward_head(features)
    assert torch.equal(logits, model.classify(features[:, 0]))
    assert torch.equal(model.forward_head(features, pre_logits=True), model.fc_norm(features[:, 0]))
    with pytest.raises(ValueError, match=r"features: expected the \(B, 1 \+ N, 48\) final tokens of forward_features, got \(2, 48\)"):
        model.forward_head(features[:, 0])  # the CLS alone: its first column would be taken
    model.label_names = [f"c{i}" for i in range(5)]
    body = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(("fc_norm.", "head."))}
    assert model.reset_classifier(3) is model
    assert model.cfg.num_classes == 3 and model.head.weight.shape == (3, 48) and model.label_names is None
    assert torch.equal(model.head.bias, torch.zeros(3)) and 0 < model.head.weight.std() < 0.05  # trunc-normal(0.02)
    assert torch.equal(model.fc_norm.weight, torch.ones(48)) and model.fc_norm.eps == SMALL.head_norm_eps
    assert all(torch.equal(model.state_dict()[k], v) for k, v in body.items())  # the encoder untouched
    assert model.forward_head(features).shape == (2, 3)
    model.reset_classifier(0)  # no head: forward_head gives the CLS, as timm's with num_classes=0
    assert model.cfg.num_classes == 0 and not hasattr(model, "head") and not hasattr(model, "fc_norm")
    assert torch.equal(model.forward_head(features), features[:, 0])
    assert set(model.state_dict()) == set(body)
    half = small_model().to(torch.float64).reset_classifier(4)
    assert half.head.weight.dtype == torch.float64
    with pytest.raises(ValueError, match="num_classes"):
        model.reset_classifier(-1)


def test_initialisation():
    model = Encoder(EncoderConfig(embed_dim=64, depth=2, num_heads=2))
    w = model.blocks[0].mlp.fc1.weight
    assert abs(w.std().item() - 0.02) < 0.003
    assert torch.all(model.blocks[1].attn.qkv.bias == 0)
    assert torch.all(model.pre_norm.weight == 1)
    assert not any(n == "pos_embed" for n, _ in model.named_parameters())
    # The patch conv: Xavier weight; the bias keeps PyTorch's default U(+-1/16), as the
    # official (untrained golden) checkpoint's does, not zeros.
    bias = model.patch_embed.bias
    assert bias.abs().max() <= 1 / 16 and bias.abs().max() > 1 / 32
    bound = math.sqrt(6 / (256 + 64))
    assert model.patch_embed.weight.abs().max() <= bound and model.patch_embed.weight.abs().max() > bound / 2


def activation_bytes_kept_for_backward(model: Encoder, run) -> int:
    """Bytes of the tensors autograd keeps while ``run()`` executes, weights not counted."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            kept[(ptr, t.dtype)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(kept.values())


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("mode, fewer_per_block", [("selective", 5), ("full", 15)])
def test_checkpointed_blocks_are_exact_and_keep_less(mode, fewer_per_block, autocast):
    """Block checkpointing gives the same outputs and gradients bit for bit, random draws
    (stochastic depth) included. Of the 16 token-width tensors (fc1 and GELU outputs count 4)
    a block keeps, "selective" keeps 11 (block input, q/k/v, attention output, both
    projections, fc1) and "full" 1 (the block input); in bf16 the plain run keeps more still
    (LayerNorm inputs in fp32)."""
    model = small_model(drop_path_rate=0.3).train()
    spec = torch.randn(3, 1, 64, 128)
    keep = torch.stack([torch.randperm(32)[:9] for _ in range(6)])
    padding = torch.rand(6, 9) < 0.3
    grad_out = torch.randn(6, 10, 48)

    def run(mode: str):
        model.zero_grad(set_to_none=True)
        model.set_block_checkpointing(mode)
        torch.manual_seed(7)  # the same stochastic-depth draws in both runs
        result = []

        def forward():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                result.append(model(spec, keep=keep, clones=2, key_padding_mask=padding).x)

        kept = activation_bytes_kept_for_backward(model, forward)
        result[0].float().backward(grad_out)
        return result[0].detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, kept

    out, grads, kept = run("off")
    out_again, grads_again, kept_checkpointed = run(mode)
    assert torch.equal(out, out_again)
    assert all(torch.equal(grads[n], grads_again[n]) for n in grads)
    token_tensor = 6 * 10 * 48 * (2 if autocast else 4)  # one (B * clones, 1 + K, D) activation
    fewer = (kept - kept_checkpointed) / token_tensor / SMALL.depth
    assert fewer >= fewer_per_block - 0.1, fewer


def test_blocks_are_checkpointed_only_when_gradients_are_recorded(monkeypatch):
    import sslam.model

    model = small_model().set_block_checkpointing("full")
    monkeypatch.setattr(sslam.model, "checkpointed_block", lambda *a: pytest.fail("checkpointed without autograd"))
    with torch.no_grad():
        model(torch.randn(2, 1, 32, 128))
    with pytest.raises(ValueError, match="block checkpointing 'yes'"):
        model.set_block_checkpointing("yes")


def test_selective_checkpointing_after_cached_weight_casts():
    """A no_grad forward, or a second forward, in the same autocast region finds the weights'
    bf16 casts in autocast's cache; the selective replay must not depend on that. After a
    no_grad forward the gradients are the plain ones bit for bit; with two forwards each casts
    its own weights, so their weight gradients meet in fp32 instead of in bf16 (last-bit
    differences)."""
    model = small_model().train()
    a, b = torch.randn(2, 1, 64, 128), torch.randn(2, 1, 64, 128)

    def grads(mode: str, second: bool):
        model.zero_grad(set_to_none=True)
        model.set_block_checkpointing(mode)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with torch.no_grad():
                model(a)
            loss = model(a).x.float().pow(2).mean()
            if second:
                loss = loss + model(b).x.float().pow(2).mean()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, selective = grads("off", False), grads("selective", False)
    assert all(torch.equal(plain[n], selective[n]) for n in plain)
    plain, selective = grads("off", True), grads("selective", True)
    for n in plain:
        torch.testing.assert_close(selective[n], plain[n], msg=n)


@pytest.mark.slow
def test_compile_for_inference_freezes_this_model_only():
    """The compiled model equals the eager one with its weights frozen in; the process-wide
    inductor freezing switch is on only during its calls, so a model compiled afterwards (a
    pretraining teacher, updated in place) sees its new weights."""
    import torch._inductor.config as inductor_config

    torch.manual_seed(0)
    cfg = EncoderConfig(embed_dim=32, depth=1, num_heads=2, max_length=8)
    spec = torch.randn(1, 1, 32, 128)
    eager = Encoder(cfg).eval()
    frozen = Encoder(cfg).eval()
    frozen.load_state_dict(eager.state_dict())
    frozen.compile_for_inference()
    with torch.inference_mode():
        torch.testing.assert_close(frozen(spec).x, eager(spec).x, rtol=1e-4, atol=1e-5)
    assert inductor_config.freezing is False
    # Its weights are in the graph: loading others is refused (they were silently half used),
    # and a pickled or copied model is the eager one, with its weights.
    with pytest.raises(RuntimeError, match="compiled for inference with its weights frozen in"):
        frozen.load_state_dict(Encoder(cfg).state_dict())
    import copy
    import pickle

    for twin in (pickle.loads(pickle.dumps(frozen)), copy.deepcopy(frozen)):
        assert "forward" not in vars(twin)
        twin.load_state_dict(eager.state_dict())
        torch.testing.assert_close(twin(spec).x, eager(spec).x)
    with pytest.raises(ValueError, match="float64 weights: inductor's frozen graphs take float32"):
        Encoder(cfg).double().compile_for_inference()
    later = Encoder(cfg).eval()
    later.compile()
    with torch.no_grad():
        later(spec)  # compiled here
        later.blocks[0].mlp.fc2.weight.mul_(3.0)
        torch.testing.assert_close(later(spec).x, later.forward(spec).x)  # compiled vs eager


def test_stochastic_depth_is_a_model_built_with_drop_path():
    """Inside ``stochastic_depth(model, rate)`` a model computes what one built with
    ``drop_path_rate=rate`` computes in train mode (the same samples dropped, for the same
    random stream); afterwards it is back in its mode, rates and config."""
    from sslam.model import stochastic_depth

    torch.manual_seed(0)
    cfg = EncoderConfig(embed_dim=32, depth=3, num_heads=2, max_length=8)
    model = Encoder(cfg).eval()
    built = Encoder(cfg.replace(drop_path_rate=0.5))
    built.load_state_dict(model.state_dict())
    spec = torch.randn(6, 1, 128, 128)
    with torch.no_grad():
        torch.manual_seed(1)
        expected = built.train()(spec).x
        with stochastic_depth(model, 0.5):
            assert [b.drop_path_rate for b in model.blocks] == [0.0, 0.25, 0.5]
            torch.manual_seed(1)
            assert torch.equal(model(spec).x, expected)
        assert not model.training and model.cfg == cfg
        assert [b.drop_path_rate for b in model.blocks] == [0.0] * 3
        eval_out = model(spec).x
        assert not torch.allclose(eval_out, expected)
        with stochastic_depth(model, 0.0):
            assert model.training and torch.equal(model(spec).x, eval_out)


def test_eval_mode_and_stochastic_depth_give_back_every_submodules_mode():
    """A user's mix of modes (a frozen block in eval inside a training model) came back as the
    top level's: model.train(training) sets every submodule."""
    from sslam.model import eval_mode, stochastic_depth

    model = small_model()
    model.train()
    model.blocks[0].eval()
    before = [m.training for m in model.modules()]
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == before
    with stochastic_depth(model, 0.1):
        assert all(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == before


def test_reset_parameters_fills_the_position_table_of_a_meta_built_model():
    """Built on the meta device, moved with to_empty and initialised with reset_parameters (the
    usual large-model set-up): the fixed sin-cos table was left as uninitialised memory."""
    cfg = EncoderConfig(embed_dim=32, depth=1, num_heads=2, max_length=8)
    with torch.device("meta"):
        model = Encoder(cfg)
    model.to_empty(device="cpu")
    model.pos_embed.fill_(float("nan"))  # what to_empty may leave
    model.reset_parameters()
    assert torch.equal(model.pos_embed, Encoder(cfg).pos_embed)


def test_the_encoder_exports_with_its_output_type():
    """torch.export refused the output (an unregistered dataclass): it is a pytree now, and one
    that the exported program's file can name (torch.export.save refused an unnamed one)."""
    import io

    cfg = EncoderConfig(embed_dim=32, depth=1, num_heads=2, max_length=8)
    model = Encoder(cfg).eval()
    spec = torch.randn(2, 1, 32, 128)
    program, saved = torch.export.export(model, (spec,), kwargs={"layer_results": True}), io.BytesIO()
    torch.export.save(program, saved)
    saved.seek(0)
    exported = torch.export.load(saved).module()
    out, expected = exported(spec, layer_results=True), model(spec, layer_results=True)
    assert type(out) is type(expected)
    assert torch.equal(out.x, expected.x) and len(out.layer_results) == 1
    torch.testing.assert_close(out.layer_results[0], expected.layer_results[0])


def test_replicas_outputs_gather_as_data_parallel_gathers_them(monkeypatch):
    """nn.DataParallel joins its replicas' outputs with scatter_gather.gather, which walks
    tensors, dicts, named tuples and sequences: a dataclass output was not iterable there."""
    from torch.nn.parallel import scatter_gather

    # Gather itself moves CUDA tensors; on the CPU its concatenation stands in for it.
    monkeypatch.setattr(scatter_gather.Gather, "apply", lambda device, dim, *parts: torch.cat(parts, dim))
    model = small_model()
    spec = torch.randn(5, 1, 32, 128)
    replicas = [model(part, layer_results=True) for part in (spec[:3], spec[3:])]
    joined, whole = scatter_gather.gather(replicas, "cpu"), model(spec, layer_results=True)
    assert type(joined) is type(whole) and joined.block_outputs == []
    torch.testing.assert_close(joined.x, whole.x)
    assert len(joined.layer_results) == SMALL.depth
    for got, expected in zip(joined.layer_results, whole.layer_results):
        torch.testing.assert_close(got, expected)


def test_eval_mode_is_safe_for_threads_sharing_a_model():
    """Two threads embedding with one model in train mode: each saved the modes the other had
    just set, so the model was left in eval mode, and a call could run with stochastic depth."""
    import threading

    from sslam.model import eval_mode

    cfg = EncoderConfig(embed_dim=32, depth=2, num_heads=2, max_length=8, drop_path_rate=0.5)
    model = Encoder(cfg).train()
    spec = torch.randn(1, 1, 32, 128)
    with torch.no_grad(), eval_mode(model):
        expected = model(spec).x
    outputs = []

    def work():
        for _ in range(100):
            with torch.no_grad(), eval_mode(model):
                outputs.append(model(spec).x)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(m.training for m in model.modules())
    assert len(outputs) == 300 and all(torch.equal(out, expected) for out in outputs)
