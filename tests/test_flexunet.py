"""FlexibleUNet with the ImageNet EfficientNet-Lite0 encoder: shapes, complete and correct encoder load, 3D."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.networks.nets import FlexibleUNet
from monai.networks.nets.flexible_unet import FLEXUNET_BACKBONE

from medtune.weights import create_model, get_source
from medtune.weights.architectures import get_architecture
from medtune.weights.sources import _lite0_package_state

HEAD_KEYS = {
    "_conv_head.weight",
    "_bn1.weight",
    "_bn1.bias",
    "_bn1.running_mean",
    "_bn1.running_var",
    "_bn1.num_batches_tracked",
    "_fc.weight",
    "_fc.bias",
}
N_ENCODER = 296 - len(HEAD_KEYS)
FEATURE_STACKS = (0, 1, 2, 4, 6)  # Lite0 block stacks ending at 1/2, 1/4, 1/8, 1/16, 1/32


def _photo(size: int = 64) -> torch.Tensor:
    skimage = pytest.importorskip("skimage")
    from PIL import Image

    path = Path(skimage.__file__).parent / "data" / "chelsea.png"
    x = np.asarray(Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
    return torch.from_numpy(((x - 0.5) / 0.5).transpose(2, 0, 1)[None].copy())


def _package_key(key: str) -> str:
    """``encoder._blocks.S.N.x`` -> ``_blocks.N.x`` (efficientnet_pytorch naming), ``encoder.x`` -> ``x``."""
    key = key.removeprefix("encoder.")
    return re.sub(r"^_blocks\.\d+\.(\d+\.)", r"_blocks.\1", key)


@pytest.fixture(scope="module")
def package() -> dict[str, torch.Tensor]:
    return _lite0_package_state()


@pytest.fixture(scope="module")
def unet2d() -> torch.nn.Module:
    return create_model("flexunet_lite0", "imagenet-flexunet-lite0", 3, 2, spatial_dims=2, verbose=False).eval()


@pytest.fixture(scope="module")
def unet3d() -> torch.nn.Module:
    return create_model("flexunet_lite0", "imagenet-flexunet-lite0-inflated", 1, 3, spatial_dims=3).eval()


def test_registered_in_medtune_and_monai():
    arch = get_architecture("flexunet_lite0")
    assert arch.task == "segmentation" and arch.fully_convolutional and arch.spatial_dims == (2, 3)
    assert arch.stem_key == "encoder._conv_stem.weight" and arch.head_prefixes == ("decoder.", "segmentation_head.")
    assert get_source("imagenet-flexunet-lite0").spatial_dims == 2
    assert get_source("imagenet-flexunet-lite0-inflated").spatial_dims == 3
    entry = FLEXUNET_BACKBONE.register_dict["efficientnet-lite0"]
    assert entry["feature_number"] == 5 and entry["feature_channel"] == (16, 24, 40, 112, 320)


def test_2d_and_3d_outputs_have_the_input_size(unet2d, unet3d):
    with torch.no_grad():
        assert unet2d(torch.randn(2, 3, 64, 64)).shape == (2, 2, 64, 64)
        assert unet3d(torch.randn(1, 1, 32, 32, 32)).shape == (1, 3, 32, 32, 32)


def test_every_encoder_tensor_comes_from_the_package(unet2d, package):
    report = unet2d.medtune_load_report
    encoder_keys = {k for k in unet2d.state_dict() if k.startswith("encoder.")}
    assert report.n_loaded == N_ENCODER == len(encoder_keys) == 288
    assert set(report.loaded) == encoder_keys
    assert set(report.unexpected) == HEAD_KEYS and not report.missing and not report.shape_mismatch
    assert report.adapted == ["Lite0 classification head not used by the encoder (8 tensors: _conv_head, _bn1, _fc)"]
    fresh = {k for k in unet2d.state_dict() if k.startswith(("decoder.", "segmentation_head."))}
    assert set(report.reinitialized_head) == fresh and "segmentation_head.0.weight" in fresh
    state = unet2d.state_dict()
    for key in encoder_keys:
        assert torch.equal(state[key], package[_package_key(key)]), key
    # spot checks with hand-written names: block 10 is the 3rd block of stack 4, block 14 the last of stack 5
    for mine, theirs in [
        ("encoder._conv_stem.weight", "_conv_stem.weight"),
        ("encoder._bn0.running_var", "_bn0.running_var"),
        ("encoder._blocks.0.0._depthwise_conv.weight", "_blocks.0._depthwise_conv.weight"),
        ("encoder._blocks.4.10._depthwise_conv.weight", "_blocks.10._depthwise_conv.weight"),
        ("encoder._blocks.5.14._bn2.running_mean", "_blocks.14._bn2.running_mean"),
        ("encoder._blocks.6.15._project_conv.weight", "_blocks.15._project_conv.weight"),
    ]:
        assert torch.equal(state[mine], package[theirs]), mine


def test_encoder_features_equal_the_lite0_classifier_intermediates(unet2d):
    """Not only shapes: the U-Net encoder computes exactly the ImageNet classifier's multi-scale features."""
    classifier = create_model("efficientnet_lite0", "imagenet-efficientnet-lite0", 3, 1000, verbose=False).eval()
    x = _photo(64)
    with torch.no_grad():
        features = unet2d.encoder(x)
        h = classifier._swish(classifier._bn0(classifier._conv_stem(classifier._conv_stem_padding(x))))
        reference = []
        for i, stack in enumerate(classifier._blocks):
            h = stack(h)
            if i in FEATURE_STACKS:
                reference.append(h)
    assert [tuple(f.shape[1:]) for f in features] == [(16, 32, 32), (24, 16, 16), (40, 8, 8), (112, 4, 4), (320, 2, 2)]
    for got, want in zip(features, reference, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_3d_one_channel_encoder_is_inflated_and_stem_summed(unet3d, package):
    report = unet3d.medtune_load_report
    assert report.n_loaded == N_ENCODER and not report.missing and not report.shape_mismatch
    assert report.adapted == [
        "inflated 48 conv kernels 2D->3D (center: 2D kernel at the central depth slice, zeros elsewhere)",
        "Lite0 classification head not used by the encoder (8 tensors: _conv_head, _bn1, _fc)",
        "encoder._conv_stem.weight: input channels 3 -> 1 (summed filters)",
    ]
    stem = unet3d.state_dict()["encoder._conv_stem.weight"]
    assert stem.shape == (32, 1, 3, 3, 3)
    torch.testing.assert_close(stem[..., 1], package["_conv_stem.weight"].sum(1, keepdim=True))
    assert not stem[..., 0].any() and not stem[..., 2].any()
    dw = unet3d.state_dict()["encoder._blocks.5.11._depthwise_conv.weight"]
    assert dw.shape == (672, 1, 5, 5, 5)
    torch.testing.assert_close(dw[..., 2], package["_blocks.11._depthwise_conv.weight"])
    assert all(k.startswith(("decoder.", "segmentation_head.")) for k in report.reinitialized_head)


def test_linear_probe_trains_decoder_and_head_only(unet2d):
    from medtune.finetune.strategies import setup_finetuning

    model = create_model("flexunet_lite0", "imagenet-flexunet-lite0", 1, 2, verbose=False)
    setup_finetuning(model, "flexunet_lite0", "linear_probe")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    fresh = {n for n, _ in model.named_parameters() if n.startswith(("decoder.", "segmentation_head."))}
    assert trainable == fresh and fresh


def test_monai_flexibleunet_backbone_loads_the_package_itself():
    """The encoder works through MONAI's own API too: ``FlexibleUNet(backbone="efficientnet-lite0", pretrained=True)``
    loads the package weights (MONAI's loader would download B0..B7 checkpoints)."""
    net = FlexibleUNet(in_channels=1, out_channels=2, backbone="efficientnet-lite0", pretrained=True, spatial_dims=2)
    report = net.encoder.load_report
    assert report.n_loaded == N_ENCODER and set(report.unexpected) == HEAD_KEYS
    assert report.adapted == ["_conv_stem.weight: input channels 3 -> 1 (summed filters)"]


@pytest.mark.parametrize(
    ("kernel", "stride", "bias", "size"),
    [(3, 1, False, (9, 10, 11)), (3, 2, False, (17, 12, 9)), (5, 2, True, (11, 12, 13)), (5, 1, False, (8, 9, 8))],
)
def test_depthwise_conv3d_by_taps_equals_conv3d_forward_and_gradients(kernel, stride, bias, size, monkeypatch):
    from medtune.weights import flexunet
    from medtune.weights.flexunet import DepthwiseConv3dByTaps

    torch.manual_seed(0)
    ref = torch.nn.Conv3d(6, 6, kernel, stride, groups=6, bias=bias)
    taps = DepthwiseConv3dByTaps.from_conv(ref)
    assert taps._by_taps() and list(taps.state_dict()) == list(ref.state_dict())
    x1 = torch.randn(2, 6, *size, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    calls = []
    conv2d = flexunet.F.conv2d
    monkeypatch.setattr(flexunet.F, "conv2d", lambda *a, **k: calls.append(1) or conv2d(*a, **k))
    y1, y2 = ref(x1), taps(x2)
    assert len(calls) == kernel  # computed by taps: one 2D depthwise conv per depth tap
    assert y1.shape == y2.shape and y2.is_contiguous()
    torch.testing.assert_close(y2, y1, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(taps.weight.grad, ref.weight.grad, atol=1e-4, rtol=1e-5)
    if bias:
        torch.testing.assert_close(taps.bias.grad, ref.bias.grad, atol=1e-4, rtol=1e-5)


def test_depthwise_conv3d_by_taps_falls_back_outside_its_layout():
    from medtune.weights.flexunet import DepthwiseConv3dByTaps

    torch.manual_seed(0)
    ref = torch.nn.Conv3d(4, 4, 3, padding=1, dilation=1, groups=4)  # built-in padding: nn.Conv3d computes it
    taps = DepthwiseConv3dByTaps.from_conv(ref)
    x = torch.randn(1, 4, 6, 7, 8)
    assert not taps._by_taps()
    torch.testing.assert_close(taps(x), ref(x), atol=0, rtol=0)
    # inference (no gradient needed) takes nn.Conv3d's own forward, bit for bit, in the taps layout too
    ref = torch.nn.Conv3d(4, 4, 3, stride=2, groups=4, bias=False)
    taps = DepthwiseConv3dByTaps.from_conv(ref)
    with torch.no_grad():
        assert taps._by_taps() and torch.equal(taps(x), ref(x))
    # maps under min_voxels (the deep 1/16, 1/32 Lite0 stages) too: there the 3D kernel is the faster one
    small = torch.randn(1, 4, 7, 7, 7, requires_grad=True)
    assert 7**3 < taps.min_voxels and torch.equal(taps(small), ref(small))


def test_3d_flexunet_uses_depthwise_by_taps_with_the_same_weights_and_function(unet3d):
    from medtune.weights.flexunet import FAST_DECODER_CHANNELS, DepthwiseConv3dByTaps

    swapped = [m for m in unet3d.modules() if isinstance(m, DepthwiseConv3dByTaps)]
    assert len(swapped) == 16  # one depthwise conv per Lite0 MBConv block
    plain = create_model("flexunet_lite0", None, 1, 3, spatial_dims=3, depthwise_by_taps=False, verbose=False)
    assert not any(isinstance(m, DepthwiseConv3dByTaps) for m in plain.modules())
    assert list(plain.state_dict()) == list(unet3d.state_dict())  # checkpoints move between the two
    plain.load_state_dict(unet3d.state_dict())
    plain.eval()
    x = torch.randn(1, 1, 32, 32, 32)
    torch.testing.assert_close(unet3d(x), plain(x), atol=1e-4, rtol=1e-4)
    # the narrow CPU decoder, on the hippocampus benchmark's patch (48 is not a multiple of 32: FlexibleUNet pads)
    fast = create_model("flexunet_lite0", None, 1, 3, spatial_dims=3, decoder_channels=FAST_DECODER_CHANNELS).eval()
    with torch.no_grad():
        assert fast(torch.randn(1, 1, 32, 48, 32)).shape == (1, 3, 32, 48, 32)
    assert fast.segmentation_head[0].in_channels == FAST_DECODER_CHANNELS[-1] == 8
