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
