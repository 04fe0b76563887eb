"""Frozen-encoder recipes: cached features (keyed by data + weights), last-stage training, through the 3D preset."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import write_volume_classification

from medtune.finetune.feature_cache import enable_feature_cache
from medtune.finetune.strategies import STRATEGIES, backbone_stages, setup_finetuning
from medtune.weights import create_model
from medtune.weights.astra import build_resnet_merlin

TINY = {"layers": (1, 1, 1, 1), "block_inplanes": (4, 8, 8, 16)}


def _frozen_tiny(seed: int = 0):
    torch.manual_seed(seed)
    net = create_model("tiny_cnn", None, 1, 2, spatial_dims=3, verbose=False)
    setup_finetuning(net, "tiny_cnn", "linear_probe")
    return net


def test_cached_forward_equals_the_network_and_runs_the_backbone_once(tmp_path: Path):
    net = _frozen_tiny()
    x = torch.randn(4, 1, 12, 12, 8)
    net.train()
    with torch.no_grad():
        reference = net.eval()(x)
    net.train()
    calls = []
    net[0].register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    patched = enable_feature_cache(net, "tiny_cnn", tmp_path)
    out = net(x)  # training step: gradient reaches the head only
    torch.testing.assert_close(out, reference)
    out.sum().backward()
    assert net[8].weight.grad is not None and net[0].weight.grad is None
    assert calls == [4]
    net(x[[1, 3]])  # all cached
    net(torch.cat([x[:1], torch.randn(1, 1, 12, 12, 8)]))  # one new input (new data -> new key)
    assert calls == [4, 1] and patched.cache.hits == 3 and patched.cache.misses == 5
    patched.cache.flush()
    files = list(tmp_path.glob("features-*.pt"))
    assert len(files) == 1 and len(torch.load(files[0], weights_only=True)) == 5


def test_cache_is_keyed_by_weights_and_survives_processes(tmp_path: Path):
    x = torch.randn(3, 1, 12, 12, 8)
    a = _frozen_tiny(0)
    enable_feature_cache(a, "tiny_cnn", tmp_path)
    with torch.no_grad():
        a(x)
    a.medtune_feature_cache.cache.flush()
    b = _frozen_tiny(0)  # same weights: a new process would find every feature
    calls = []
    b[0].register_forward_hook(lambda m, i, o: calls.append(1))
    enable_feature_cache(b, "tiny_cnn", tmp_path)
    with torch.no_grad():
        b(x)
    assert calls == [] and b.medtune_feature_cache.cache.hits == 3
    c = _frozen_tiny(1)  # other weights: another cache file, nothing reused
    enable_feature_cache(c, "tiny_cnn", tmp_path)
    with torch.no_grad():
        c(x)
    c.medtune_feature_cache.cache.flush()
    assert c.medtune_feature_cache.cache.misses == 3 and len(list(tmp_path.glob("features-*.pt"))) == 2


def test_training_backbone_bypasses_the_cache(tmp_path: Path):
    torch.manual_seed(0)
    net = create_model("tiny_cnn", None, 1, 2, spatial_dims=3, verbose=False)
    setup_finetuning(net, "tiny_cnn", "full")
    enable_feature_cache(net, "tiny_cnn", tmp_path)
    net(torch.randn(2, 1, 12, 12, 8)).sum().backward()
    assert net[0].weight.grad is not None and net.medtune_feature_cache.cache is None


def test_last_stages_trains_only_the_last_stage_and_head():
    assert "last_stages" in STRATEGIES
    net = build_resnet_merlin(3, 1, 2, **TINY)
    net.medtune_arch = "resnet152_3d_merlin"
    assert [s[0] for s in backbone_stages(net, "resnet152_3d_merlin")] == ["conv1.", "layer1.", "layer2.", "layer3.",
                                                                           "layer4."]  # fmt: skip
    setup_finetuning(net, "resnet152_3d_merlin", "last_stages", train_stages=1)
    trained = {n.split(".")[0] for n, p in net.named_parameters() if p.requires_grad}
    assert trained == {"layer4", "fc"}
    net.train()
    assert net.layer4[0].bn1.training and not net.layer3[0].bn1.training and not net.bn1.training
    setup_finetuning(net, "resnet152_3d_merlin", "last_stages", train_stages=2)
    assert {n.split(".")[0] for n, p in net.named_parameters() if p.requires_grad} == {"layer3", "layer4", "fc"}
    with pytest.raises(Exception, match="train_stages must be 1..5"):
        setup_finetuning(net, "resnet152_3d_merlin", "last_stages", train_stages=9)


def test_3d_preset_linear_probe_computes_features_once_across_runs(tmp_path: Path):
    """Two runs (two seeds) of the 3D preset share the cache: the second computes no backbone feature."""
    from medtune.finetune.runner import evaluate_run, finetune

    ds = tmp_path / "ds"
    write_volume_classification(ds)
    cache = tmp_path / "cache"
    common = {"arch": "tiny_cnn", "pretrained": "none", "epochs": 3, "num_workers": 0, "image_size": [16, 16, 16],
              "batch_size": 4, "strategy": "linear_probe", "feature_cache_dir": str(cache)}  # fmt: skip
    rec = finetune(ds, "3d_classification", tmp_path / "r1", overrides={**common, "seed": 0}, progress_bar=False)
    assert rec["status"] == "completed"
    files = list(cache.glob("features-*.pt"))
    assert len(files) == 1 and len(torch.load(files[0], weights_only=True)) == 16  # 12 train + 4 val, once each
    stamp = files[0].stat().st_mtime_ns
    rec2 = finetune(ds, "3d_classification", tmp_path / "r2", overrides={**common, "seed": 1}, progress_bar=False)
    assert rec2["status"] == "completed" and files[0].stat().st_mtime_ns == stamp  # nothing new to store
    metrics = evaluate_run(tmp_path / "r2")["metrics"]
    assert metrics["n"] == 4 and files[0].stat().st_mtime_ns == stamp  # evaluation reads the same features


def _last_stage_tiny(seed: int = 0):
    torch.manual_seed(seed)
    net = build_resnet_merlin(3, 1, 2, **TINY)
    setup_finetuning(net, "resnet152_3d_merlin", "last_stages", train_stages=1)
    return net


def test_last_stages_caches_the_frozen_prefix_and_trains_the_same(tmp_path: Path):
    """layer4 + fc train on the cached output of stem + layer1-3: same outputs, same gradients, prefix run once."""
    from medtune.finetune.feature_cache import cache_applies

    assert cache_applies("resnet152_3d_merlin", "last_stages", 1) and cache_applies(
        "resnet152_3d_merlin", "last_stages", 4
    )
    assert not cache_applies("resnet152_3d_merlin", "last_stages", 5)  # the stem trains: nothing frozen before it
    assert not cache_applies("efficientnet_lite0", "last_stages", 1)  # its stages are blocks inside `_blocks`
    assert not cache_applies("resnet152_3d_merlin", "full", 1)
    x = torch.randn(4, 1, 32, 32, 32)
    ref, ours = _last_stage_tiny(), _last_stage_tiny()
    calls = []
    ours.layer3.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    patched = enable_feature_cache(ours, "resnet152_3d_merlin", tmp_path)
    for net in (ref, ours):
        net.train()
    for _step in range(2):  # the same input twice: the second step reads the prefix from the cache
        out_ref, out = ref(x), ours(x)
        torch.testing.assert_close(out, out_ref)
        out_ref.square().sum().backward()
        out.square().sum().backward()
        torch.testing.assert_close(ours.layer4[0].conv1.weight.grad, ref.layer4[0].conv1.weight.grad)
        assert ours.layer3[0].conv1.weight.grad is None
    # the one-time check (2 inputs, twice: reference and prefix) + the 4 misses of step 1; step 2 all cached
    assert calls == [2, 2, 4] and patched.prefix_cache.hits == 4 and patched.prefix_cache.misses == 4
    torch.testing.assert_close(ours.layer4[0].bn1.running_mean, ref.layer4[0].bn1.running_mean)  # BN adapts alike
    ours.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))
    assert patched.cache is None  # the backbone trains: the head-input cache is never used
    assert set(dict(ours.named_children())) == set(dict(ref.named_children()))  # modules restored
    assert all(not isinstance(m, torch.nn.Identity) for m in ours.children())
    patched.prefix_cache.flush()
    other = _last_stage_tiny(1)  # other prefix weights: another file
    enable_feature_cache(other, "resnet152_3d_merlin", tmp_path)
    other.train()
    other(x)
    other.medtune_feature_cache.prefix_cache.flush()
    assert len(list(tmp_path.glob("features-*.pt"))) == 2


def test_prefix_cache_falls_back_when_the_forward_is_not_a_chain(tmp_path: Path):
    class Skip(torch.nn.Module):  # its forward adds the input back: not a chain of its children
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv3d(1, 1, 3, padding=1)
            self.b = torch.nn.Conv3d(1, 1, 3, padding=1)
            self.add_module("8", torch.nn.Linear(1, 2))  # tiny_cnn's head name

        def forward(self, x):
            y = self.b(self.a(x)) + x
            return getattr(self, "8")(y.mean(dim=(2, 3, 4)))

    net = Skip()
    net.a.requires_grad_(False)
    x = torch.randn(3, 1, 8, 8, 8)
    with torch.no_grad():
        reference = net(x)
    patched = enable_feature_cache(net, "tiny_cnn", tmp_path)
    torch.testing.assert_close(net(x), reference)
    assert patched.prefix_ok is False and patched.prefix_cache.misses == 0
