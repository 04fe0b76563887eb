"""Fine-tuning strategies: which parameters receive gradients, learning rates per depth, BatchNorm stats."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine, Events

from medtune.errors import MedTuneError
from medtune.finetune.handlers import FreezeScheduleHandler
from medtune.finetune.strategies import param_groups, setup_finetuning
from medtune.weights import create_model


def _step(model, groups, in_ch=1):
    opt = torch.optim.AdamW(groups, lr=1e-3)
    model.train()
    x = torch.randn(4, in_ch, 32, 32)  # Lite0's smallest input (the last stage at 1x1): every layer still runs
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 0, 1]))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


@pytest.fixture()
def lite0():
    return create_model(
        "efficientnet_lite0", "imagenet-efficientnet-lite0", in_channels=1, num_classes=2, verbose=False
    )


def test_full_finetune_trains_everything(lite0):
    groups = setup_finetuning(lite0, "efficientnet_lite0", "full")
    got = _step(lite0, groups)
    assert got == {n for n, _ in lite0.named_parameters()}


def test_linear_probe_trains_only_the_head_and_keeps_bn_stats(lite0):
    groups = setup_finetuning(lite0, "efficientnet_lite0", "linear_probe")
    before = lite0._bn0.running_mean.clone()
    got = _step(lite0, groups)
    assert got == {"_fc.weight", "_fc.bias"}
    torch.testing.assert_close(lite0._bn0.running_mean, before)  # frozen backbone: stats unchanged
    assert not lite0._bn0.training  # model.train() did not switch it back


def test_frozen_bn_stats_with_full_finetune(lite0):
    groups = setup_finetuning(lite0, "efficientnet_lite0", "full", freeze_bn_stats=True)
    before = lite0._bn0.running_mean.clone()
    got = _step(lite0, groups)
    assert "_bn0.weight" in got and "_conv_stem.weight" in got  # affine params still learn
    torch.testing.assert_close(lite0._bn0.running_mean, before)


def test_adapted_bn_stats_move_in_full_finetune(lite0):
    groups = setup_finetuning(lite0, "efficientnet_lite0", "full", freeze_bn_stats=False)
    before = lite0._bn0.running_mean.clone()
    _step(lite0, groups)
    assert not torch.allclose(lite0._bn0.running_mean, before)


def test_freeze_then_unfreeze_switches_at_the_epoch(lite0):
    groups = setup_finetuning(lite0, "efficientnet_lite0", "freeze_then_unfreeze")
    engine = Engine(lambda e, b: None)
    FreezeScheduleHandler(lite0, "efficientnet_lite0", "freeze_then_unfreeze", unfreeze_epoch=2).attach(engine)
    trained = {}

    @engine.on(Events.EPOCH_STARTED)
    def _record(e):
        trained[e.state.epoch] = _step(lite0, groups)

    engine.run([0], max_epochs=3)
    assert trained[1] == trained[2] == {"_fc.weight", "_fc.bias"}
    assert trained[3] == {n for n, _ in lite0.named_parameters()}
    lite0.train()
    assert lite0._bn0.training  # BatchNorm statistics adapt again after unfreezing


def test_layerwise_lr_decay_orders_rates_by_depth(lite0):
    groups = param_groups(lite0, "efficientnet_lite0", lr=1e-3, layer_decay=0.5, head_lr_mult=2.0)
    assert groups[-1]["name"] == "head" and groups[-1]["lr"] == pytest.approx(2e-3)
    backbone_lrs = [g["lr"] for g in groups[:-1]]
    assert backbone_lrs == sorted(backbone_lrs)  # earlier layers learn slower
    assert backbone_lrs[0] == pytest.approx(1e-3 * 0.5 ** len(backbone_lrs))
    assert len(backbone_lrs) >= 10  # stem, each block, head conv: real depth resolution
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == len(list(lite0.parameters()))  # every parameter exactly once


def test_unknown_strategy_is_refused(lite0):
    with pytest.raises(MedTuneError, match="unknown fine-tuning strategy"):
        setup_finetuning(lite0, "efficientnet_lite0", "half")


@pytest.mark.slow  # a 3D SwinUNETR backward; the segmentation linear probe (decoder + head train) is in the fast set
# through the default network's test_flexunet.py::test_linear_probe_trains_decoder_and_head_only
def test_swinunetr_linear_probe_trains_the_decoder_not_the_swin_encoder():
    """A segmentation "linear probe" freezes the pretrained Swin encoder and trains the whole CNN decoder + out.

    Training only the 1x1x1 ``out`` conv would read features of a randomly initialized, frozen decoder.
    """
    torch.manual_seed(0)
    model = create_model(
        "swinunetr", None, in_channels=1, num_classes=2, spatial_dims=3, feature_size=12, verbose=False
    )
    swin_before = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("swinViT.")}
    decoder = {n for n, _ in model.named_parameters() if not n.startswith("swinViT.")}
    groups = setup_finetuning(model, "swinunetr", "linear_probe")
    opt = torch.optim.AdamW(groups, lr=1e-2)
    model.train()
    x, y = torch.randn(1, 1, 32, 32, 64), torch.randint(0, 2, (1, 32, 32, 64))
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    opt.step()
    # every decoder block (skip-path residual blocks encoder1-4/10, up blocks decoder1-5) and out learn
    assert got == decoder and len(decoder) == 33 and len(swin_before) == 118  # parameters (126 with buffers)
    assert {n.split(".")[0] for n in got} == {
        *(f"encoder{i}" for i in (1, 2, 3, 4, 10)),
        *(f"decoder{i}" for i in range(1, 6)),
        "out",
    }
    for n, p in model.named_parameters():  # the encoder did not move
        if n in swin_before:
            assert not p.requires_grad and torch.equal(p, swin_before[n]), n
    assert groups[-1]["name"] == "head" and len(groups[-1]["params"]) == 33
