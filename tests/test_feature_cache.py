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
