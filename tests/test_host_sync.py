"""On a GPU, a training step queues its features, forward and backward without the host ever
waiting for the GPU: each wait drains the GPU's queue, which then idles until the host has
launched new work. torch.cuda's sync debug mode turns every synchronising call into an error.
(The trainer reads the losses once per step, after the backward: outside what is checked here.)
"""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("stage, recompute", [(1, "off"), (2, "off"), (2, "selective"), (2, "full")])
def test_features_forward_and_backward_never_wait_for_the_gpu(tmp_path, stage, recompute):
    """Also with the decoder and the student's blocks recomputed in the backward."""
    from test_train import small

    from sslam.train import Trainer

    settings = {"run__checkpoint_decoder": recompute != "off", "run__checkpoint_blocks": recompute}
    trainer = Trainer(small(tmp_path, stage=stage, steps=2, run__device="cuda", **settings), log=lambda *a: None)
    loader = iter(trainer.data_loader())
    trainer.train_step([next(loader)])  # the first call autotunes and allocates, which synchronises
    batch = next(loader)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        clean, mixed, keep, windows, noise = trainer.micro_step_inputs(batch, slot=0)
        with trainer.autocast():
            losses = trainer.train_module(clean, keep, windows=windows, generator=noise, mixed=mixed)
        losses.total.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(losses.total)


def test_preprocess_never_waits_for_the_gpu():
    """The PyTorch feature path (SSLAM_KERNELS=0, or fine-tuning's): the lengths are checked on
    the CPU before they are copied to the GPU, so reading them does not drain its queue."""
    from sslam.features import preprocess

    waves = 0.1 * torch.randn(4, 16000, device="cuda")
    lengths = torch.tensor([16000, 12000, 8000, 400])
    preprocess(waves, 16000, lengths=lengths, check_finite=False)  # allocations, kernels loaded
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = preprocess(waves, 16000, lengths=lengths, check_finite=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.shape == (4, 1, 1024, 128)


def test_fine_tuning_features_and_the_fused_kernels_reference_never_wait_for_the_gpu(monkeypatch):
    """Fine-tuning's and the probes' features, and fbank_patch with SSLAM_KERNELS=0, handed
    preprocess lengths copied to the GPU, which it copied back: a wait per batch. The
    augmentations of a training batch (noise, mixup, SpecAugment) copy their draws without
    waiting either."""
    import numpy as np
    from sslam.kernels import fbank_patch

    from sslam.evaluate import FinetuneConfig, _augmented_spec, _features
    from sslam.model import Encoder, EncoderConfig

    encoder = Encoder(EncoderConfig(embed_dim=32, depth=1, num_heads=2, max_length=64)).cuda()
    waves, lengths = 0.1 * torch.randn(4, 16000), torch.tensor([16000, 12000, 8000, 400])
    on_gpu = waves.cuda()  # a blocking copy, as the sync-debug mode counts it: outside the check
    clips, targets = [wave[:n] for wave, n in zip(waves, lengths)], torch.eye(4)
    augment = FinetuneConfig(noise=True, mixup_prob=1.0)
    rng = np.random.default_rng(0)
    monkeypatch.setenv("SSLAM_KERNELS", "0")
    for call in (lambda: _features(encoder, waves, lengths), lambda: fbank_patch(on_gpu, lengths),
                 lambda: _augmented_spec(encoder, clips, targets, augment, rng)):
        call()  # allocations, kernels loaded
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
