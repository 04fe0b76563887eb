"""2D -> 3D inflation: a depth-constant volume through the inflated 3D Lite0 gives the 2D Lite0's answer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medtune.errors import MedTuneError
from medtune.weights import create_model, get_source, load_with_report
from medtune.weights.inflation import inflate_conv_weight, inflate_state_dict, inflated_filter
from medtune.weights.sources import _lite0_package_state, efficientnet_pytorch_to_monai

SIZE, DEPTH = 96, 32  # multiples of 32: MONAI's static "same" padders (built for 224) are then exact TF padding
STAGES = 8  # stem + 7 block stacks
CELL_NOTE = (
    "inflated 49 conv kernels 2D->3D (cell: 2D kernel at the central depth tap, a strided one over its stride cell)"
)


def _photo(name: str = "chelsea.png", size: int = SIZE) -> torch.Tensor:
    skimage = pytest.importorskip("skimage")
    from PIL import Image

    im = Image.open(Path(skimage.__file__).parent / "data" / name).convert("RGB").resize((size, size), Image.BILINEAR)
    x = np.asarray(im, dtype=np.float32) / 255.0
    return torch.from_numpy(((x - 0.5) / 0.5).transpose(2, 0, 1)[None].copy())


def _run_with_features(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One forward of a MONAI EfficientNet: the logits, the stem output and every block stack's output."""
    feats: list[torch.Tensor] = []
    hooks = [model._blocks[0].register_forward_pre_hook(lambda m, inp: feats.append(inp[0]))]
    hooks += [stack.register_forward_hook(lambda m, inp, out: feats.append(out)) for stack in model._blocks]
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        for h in hooks:
            h.remove()
    return logits, feats


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    return _photo()


@pytest.fixture(scope="module")
def net2d() -> torch.nn.Module:
    return create_model("efficientnet_lite0", "imagenet-efficientnet-lite0", 3, 1000, verbose=False).eval()


@pytest.fixture(scope="module")
def net3d() -> torch.nn.Module:
    return create_model(
        "efficientnet_lite0", "imagenet-efficientnet-lite0-inflated", 3, 1000, spatial_dims=3, verbose=False
    ).eval()


def test_inflate_conv_weight_center_mean_and_depth_axis():
    w = torch.randn(4, 2, 3, 3)
    center = inflate_conv_weight(w, 3, "center")
    assert center.shape == (4, 2, 3, 3, 3)
    torch.testing.assert_close(center[..., 1], w)
    assert not center[..., 0].any() and not center[..., 2].any()
    mean = inflate_conv_weight(w, 5, "mean")
    assert mean.shape == (4, 2, 3, 3, 5)
    torch.testing.assert_close(mean.sum(-1), w)
    first = inflate_conv_weight(w, 3, "center", depth_axis=0)  # (O, I, kD, kH, kW)
    torch.testing.assert_close(first[:, :, 1], w)
    with pytest.raises(ValueError, match="inflation mode"):
        inflate_conv_weight(w, 3, "repeat")
    # a depth-constant input gives the 2D response on every slice (center) / in the interior (mean)
    x2 = torch.randn(1, 2, 8, 8)
    ref = F.conv2d(x2, w, padding=1)
    x3 = x2.unsqueeze(-1).repeat(1, 1, 1, 1, 6)
    out_c = F.conv3d(x3, center, padding=1)
    out_m = F.conv3d(x3, inflate_conv_weight(w, 3, "mean"), padding=1)
    torch.testing.assert_close(out_c, ref.unsqueeze(-1).expand_as(out_c), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_m[..., 1:-1], ref.unsqueeze(-1).expand_as(out_m[..., 1:-1]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_m[..., 0], ref * 2 / 3, atol=1e-5, rtol=1e-5)  # zero padding at the border


def test_inflate_state_dict_inflates_convs_and_copies_the_rest():
    net2 = create_model("tiny_cnn", None, in_channels=3, num_classes=4, spatial_dims=2)
    net3 = create_model("tiny_cnn", None, in_channels=3, num_classes=4, spatial_dims=3)
    sd2 = net2.state_dict()
    state, notes = inflate_state_dict(sd2, net3, mode="mean")
    assert notes == ["inflated 2 conv kernels 2D->3D (mean: 2D kernel repeated along depth / kD, I3D)"]
    for key, value in net3.state_dict().items():
        assert state[key].shape == value.shape, key
    torch.testing.assert_close(state["3.weight"].sum(-1), sd2["3.weight"])
    for key in ("1.running_var", "1.weight", "8.weight", "8.bias"):  # BatchNorm and Linear: as they were
        assert state[key] is sd2[key]


def test_inflated_source_is_registered_and_reported(net3d, net2d):
    source = get_source("imagenet-efficientnet-lite0-inflated")
    assert source.spatial_dims == 3 and source.arch == "efficientnet_lite0"
    report = net3d.medtune_load_report
    assert report.n_loaded == 296 and not report.skipped() and report.reinitialized_head == []
    assert report.adapted == [CELL_NOTE]
    assert "adapted: inflated 49 conv kernels" in report.summary()
    sd3, sd2 = net3d.state_dict(), net2d.state_dict()
    for key, k in [("_blocks.0.0._depthwise_conv.weight", 3), ("_blocks.5.12._depthwise_conv.weight", 5)]:  # stride 1
        assert sd3[key].shape == sd2[key].shape + (k,)
        torch.testing.assert_close(sd3[key][..., k // 2], sd2[key])
        assert not sd3[key][..., 0].any() and not sd3[key][..., -1].any()
    # stride 2: the stem (k3, "same" padding 0 before) and block 5.11 (k5, 1 before): half the kernel on the two taps
    # of the output voxel's stride cell, zeros elsewhere
    for key, k, taps in [("_conv_stem.weight", 3, (0, 1)), ("_blocks.5.11._depthwise_conv.weight", 5, (1, 2))]:
        assert sd3[key].shape == sd2[key].shape + (k,)
        for t in range(k):
            torch.testing.assert_close(sd3[key][..., t], sd2[key] / 2 if t in taps else torch.zeros_like(sd2[key]))
    assert sd3["_blocks.0.0._project_conv.weight"].shape == (16, 32, 1, 1, 1)
    torch.testing.assert_close(sd3["_fc.weight"], sd2["_fc.weight"])


def test_center_inflated_3d_net_on_repeated_photo_equals_2d_net(net2d, net3d, photo):
    """The issue's acceptance: one photo repeated along depth -> the 2D net's feature maps on every depth slice
    and the 2D net's logits (center mode: exact up to float rounding; measured max |diff| ~1e-5 on logits ~30)."""
    volume = photo.unsqueeze(-1).repeat(1, 1, 1, 1, DEPTH)  # depth last, MONAI's (C, H, W, D)
    logits2, feats2 = _run_with_features(net2d, photo)
    logits3, feats3 = _run_with_features(net3d, volume)
    assert len(feats3) == STAGES
    for f2, f3 in zip(feats2, feats3, strict=True):
        assert f3.shape == f2.shape + (f3.shape[-1],) and f3.shape[-1] == DEPTH * f2.shape[-1] // SIZE
        torch.testing.assert_close(f3, f2.unsqueeze(-1).expand_as(f3), atol=2e-4, rtol=1e-4)
    diff = (logits3 - logits2).abs().max().item()
    assert diff < 1e-4, diff
    assert logits3.argmax().item() == logits2.argmax().item() in (281, 282, 285)  # still a cat


def test_mean_inflation_is_exact_in_the_depth_interior(net2d, photo):
    """I3D "mean" inflation: exact where the depth receptive field stays inside the volume. MONAI pads with
    zeros, so the borders lose 1/kD per tap outside; the error spreads inwards with depth, and at DEPTH=32 it
    reaches the 1/8-resolution maps (the logits then differ by tens; top-1 changes): center mode is the default."""
    net = create_model("efficientnet_lite0", None, 3, 1000, spatial_dims=3, verbose=False).eval()
    report = load_with_report(
        net, _lite0_package_state(), "lite0-mean", filter_fn=inflated_filter(efficientnet_pytorch_to_monai, "mean")
    )
    assert report.n_loaded == 296 and report.adapted[0].startswith("inflated 49 conv kernels 2D->3D (mean")
    volume = photo.unsqueeze(-1).repeat(1, 1, 1, 1, DEPTH)
    feats2 = _run_with_features(net2d, photo)[1][:3]  # stem (1/2), stack 0 (1/2), stack 1 (1/4)
    with torch.no_grad():
        x = net._swish(net._bn0(net._conv_stem(net._conv_stem_padding(volume))))
        feats3 = [x, net._blocks[0](x)]
        feats3.append(net._blocks[1](feats3[-1]))
    for f2, f3, (lo, hi) in zip(feats2, feats3, [(0, -1), (1, -2), (2, -3)], strict=True):
        ref = f2.unsqueeze(-1).expand_as(f3)
        torch.testing.assert_close(f3[..., lo:hi], ref[..., lo:hi], atol=1e-3, rtol=1e-4)
        assert (f3[..., -1] - ref[..., -1]).abs().max() > 0.1  # the last slice saw the zero padding


def test_inflated_3d_net_reads_every_depth_slice_at_init():
    """The bug this guards: with one-tap ("center") kernels in the strided convs, Lite0's five stride-2 layers only
    subsample depth, so at init the 3D net read one slice in 32 - the crop's last one (input gradient zero on
    slices 0..30 at 32^3; LIDC malignancy fine-tuned on 57 crops: AUC 0.61, vs 0.79 with cell inflation).
    Now every slice reaches the output, about equally (each stride-2 layer averages the slices it merges)."""
    torch.manual_seed(0)
    net = create_model("efficientnet_lite0", "imagenet-efficientnet-lite0-inflated", 1, 2, 3, verbose=False)
    x = torch.randn(2, 1, 32, 32, 32, requires_grad=True)
    net.eval()(x)[:, 1].sum().backward()
    assert x.grad is not None
    per_slice = x.grad.abs().sum(dim=(0, 1, 2, 3))  # depth is the last axis
    assert per_slice.shape == (32,) and per_slice.min() > 0.25 * per_slice.max(), per_slice
    per_row = x.grad.abs().sum(dim=(0, 1, 3, 4))  # in-plane rows: the 2D kernels were always dense
    assert per_row.min() > 0
    with pytest.raises(ValueError, match="does not fit"):
        inflate_conv_weight(torch.randn(4, 2, 3, 3), 3, "cell", stride=2, pad_before=2)
    torch.testing.assert_close(  # stride 1: the same kernel as center mode
        inflate_conv_weight(w := torch.randn(4, 2, 3, 3), 3, "cell"), inflate_conv_weight(w, 3, "center")
    )


def test_one_channel_3d_net_from_inflated_weights(net3d):
    net = create_model("efficientnet_lite0", "imagenet-efficientnet-lite0-inflated", 1, 2, spatial_dims=3)
    report = net.medtune_load_report
    assert report.adapted == [
        CELL_NOTE,
        "_conv_stem.weight: input channels 3 -> 1 (summed filters)",
    ]
    assert report.n_loaded == 294 and report.reinitialized_head == ["_fc.weight", "_fc.bias"]
    assert not report.skipped()
    assert net._conv_stem.weight.shape == (32, 1, 3, 3, 3)
    torch.testing.assert_close(net._conv_stem.weight, net3d._conv_stem.weight.sum(1, keepdim=True))


def test_2d_source_in_a_3d_network_points_to_the_inflated_one():
    with pytest.raises(MedTuneError, match="-inflated"):
        create_model("efficientnet_lite0", "imagenet-efficientnet-lite0", 1, 2, spatial_dims=3, verbose=False)
