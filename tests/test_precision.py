"""The pure half-precision mode (sslam.precision): half weights over fp32 master weights."""

import copy
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from sslam.mixing import MixWindows
from sslam.model import EncoderConfig
from sslam.precision import MATMUL_MODULES, half_weights
from sslam.pretrain import DecoderConfig, ObjectiveConfig, Pretrainer

HALVES = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", HALVES)
def test_half_weights_reads_casts_and_sends_fp32_gradients(dtype):
    torch.manual_seed(0)
    shared = nn.Linear(8, 8)
    net = nn.Sequential(shared, nn.LayerNorm(8), shared)  # a parameter used twice: one cast
    x = torch.randn(5, 8)
    weights = list(net.parameters())
    with half_weights([net], dtype):
        assert all(p.dtype == dtype for p in net.parameters())
        assert net[0].weight is net[2].weight
        net(x.to(dtype)).float().square().sum().backward()
    assert list(net.parameters()) == weights and all(type(p) is nn.Parameter for p in net.parameters())
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in weights)

    # The same computation on half leaves: its gradients, cast to fp32, bit for bit.
    w, b, g, beta = (p.detach().to(dtype).requires_grad_() for p in (shared.weight, shared.bias, *net[1].parameters()))
    y = F.linear(F.layer_norm(F.linear(x.to(dtype), w, b), (8,), g, beta), w, b)
    y.float().square().sum().backward()
    assert torch.equal(shared.weight.grad, w.grad.float()) and torch.equal(net[1].weight.grad, g.grad.float())


def test_half_weights_restores_the_parameters_on_error():
    net = nn.Linear(4, 4)
    weight = net.weight
    with pytest.raises(RuntimeError, match="inside"):
        with half_weights([net], torch.bfloat16):
            raise RuntimeError("inside")
    assert net.weight is weight and net.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="bfloat16 or torch.float16"):
        with half_weights([net], torch.float32):
            pass


def stage2_model():
    torch.manual_seed(0)
    cfg = EncoderConfig(embed_dim=32, depth=2, num_heads=2, mel_bins=128)
    objective = ObjectiveConfig(stage=2, clones=2, top_k=2, mix_width=16, decoder=DecoderConfig(dim=16, groups=4, layers=2))
    model = Pretrainer(cfg, objective).train()
    with torch.no_grad():  # a teacher apart from the student, so both sets of weights matter
        for p in model.teacher.encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    keep = torch.stack([torch.randperm(32)[:7] for _ in range(6)])
    return model, torch.randn(3, 1, 64, 128), keep, MixWindows(starts=(0, 32), width=16)


def losses_and_grads(model, spec, keep, windows, context):
    model.zero_grad(set_to_none=True)
    with context:
        losses = model(spec, keep, windows=windows, generator=torch.Generator().manual_seed(3))
        losses.total.backward()
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    return losses.total.detach(), grads


@pytest.mark.parametrize("dtype", HALVES)
def test_pure_mode_trains_a_half_copy_of_the_model(dtype):
    """Stage 2 under half weights: the loss and the gradients of the model converted to the
    half type (``.to(dtype)``, the official ``.half()``) given the fp32 spectrograms, bit for bit."""
    model, spec, keep, windows = stage2_model()
    half = copy.deepcopy(model).to(dtype)
    loss, grads = losses_and_grads(model, spec, keep, windows, half_weights([model], dtype))
    half_loss, half_grads = losses_and_grads(half, spec, keep, windows, torch.enable_grad())
    assert torch.equal(loss, half_loss)
    assert grads.keys() == half_grads.keys() and len(grads) == len(model.trainable_parameters())
    assert all(torch.equal(grads[n], half_grads[n]) for n in grads)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    fp32_loss, _ = losses_and_grads(model, spec, keep, windows, torch.enable_grad())
    assert abs(loss - fp32_loss) <= (2e-2 if dtype == torch.bfloat16 else 2e-3) * fp32_loss


def test_pure_mode_recomputation_is_exact():
    """Blocks and decoder layers recomputed in the backward read the same half weights."""
    model, spec, keep, windows = stage2_model()
    plain = losses_and_grads(model, spec, keep, windows, half_weights([model], torch.bfloat16))
    model.checkpoint_decoder = True
    model.student.set_block_checkpointing("selective")
    recomputed = losses_and_grads(model, spec, keep, windows, half_weights([model], torch.bfloat16))
    assert torch.equal(plain[0], recomputed[0])
    assert all(torch.equal(plain[1][n], recomputed[1][n]) for n in plain[1])


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_weights_and_their_gradients_are_cast_in_one_copy_each():
    """One multi-tensor copy casts the trainable weights and one the frozen (teacher) ones; one
    backward node sends every gradient back to fp32. A per-tensor cast would be ~10 ops and
    ~5 backward nodes per block."""
    model, spec, keep, windows = stage2_model()
    ops = _Ops()
    with half_weights([model], torch.bfloat16):
        with ops:
            loss = model(spec, keep, windows=windows, generator=torch.Generator().manual_seed(3)).total
        forward = list(ops.names)
        nodes, stack = [], [loss.grad_fn]
        while stack:
            node = stack.pop()
            if node is not None and node not in nodes:
                nodes.append(node)
                stack.extend(n for n, _ in node.next_functions)
        with ops:
            loss.backward()
    backward = ops.names[len(forward):]
    # the nodes that hand gradients to the fp32 parameters
    feeders = [n.name() for n in nodes if any(m is not None and m.name().endswith("AccumulateGrad")
                                              for m, _ in n.next_functions)]
    assert feeders == ["_CastBackward"]
    assert forward.count("_foreach_copy_") == 0  # cast on entering the block, before `ops`
    assert backward.count("_foreach_copy_") == 1
    assert all(p.grad.dtype == torch.float32 for p in model.trainable_parameters())
    assert all(p.grad is None for p in model.teacher.parameters())


def test_casting_counts_one_copy_per_dtype_group():
    """Trainable and frozen fp32 weights: two copies on entering; a weight already in the half
    type is left as it is."""
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4).to(torch.bfloat16))
    net[1].requires_grad_(False)
    ops = _Ops()
    held = net[2].weight
    with ops, half_weights([net], torch.bfloat16):
        assert net[2].weight is held
        assert all(p.dtype == torch.bfloat16 for p in net.parameters())
        assert net[0].weight.requires_grad and not net[1].weight.requires_grad
    assert ops.names.count("_foreach_copy_") == 2


def test_autocast_with_the_matmul_weights_cast_once_is_exact():
    """Under autocast, the weights of the matmul modules cast once beforehand (only=
    MATMUL_MODULES) give autocast's losses and gradients bit for bit, with no cast of a weight
    in the forward; LayerNorms keep their fp32 weights, which autocast's fp32 LayerNorm reads."""
    model, spec, keep, windows = stage2_model()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    plain = losses_and_grads(model, spec, keep, windows, autocast)

    casts = []

    class Casts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ == "_to_copy":
                casts.append(args[0].shape)
            return func(*args, **(kwargs or {}))

    @contextmanager
    def precast():
        with half_weights([model], torch.bfloat16, only=MATMUL_MODULES), Casts(), autocast:
            assert model.student.pre_norm.weight.dtype == torch.float32
            assert model.student.blocks[0].mlp.fc1.weight.dtype == torch.bfloat16
            yield

    weights = {p.shape for m in model.modules() if isinstance(m, MATMUL_MODULES) for p in m.parameters()}
    precast = losses_and_grads(model, spec, keep, windows, precast())
    assert torch.equal(plain[0], precast[0])
    assert plain[1].keys() == precast[1].keys()
    assert all(torch.equal(plain[1][n], precast[1][n]) for n in plain[1])
    assert casts and not weights & set(casts)  # activations are still cast, weights no more
