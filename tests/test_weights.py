"""Pretrained sources: real ImageNet Lite0 weights, torchvision-format files, local checkpoints, reports."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from medtune.errors import MedTuneError
from medtune.weights import adapt_input_conv, create_model, get_source, list_sources, read_checkpoint
from medtune.weights.sources import SOURCES


def _photo(name: str) -> np.ndarray:
    skimage = pytest.importorskip("skimage")
    from PIL import Image

    path = Path(skimage.__file__).parent / "data" / name
    im = Image.open(path).convert("RGB").resize((224, 224), Image.BILINEAR)
    x = np.asarray(im, dtype=np.float32) / 255.0
    return ((x - 0.5) / 0.5).transpose(2, 0, 1)[None]


@pytest.fixture(scope="module")
def lite0_imagenet():
    model = create_model("efficientnet_lite0", "imagenet-efficientnet-lite0", in_channels=3, num_classes=1000)
    return model.eval()


def test_lite0_imagenet_weights_classify_a_cat_and_coffee(lite0_imagenet):
    """The offline ImageNet weights are loaded correctly: natural photos get sensible ImageNet top-5."""
    with torch.no_grad():
        cat = lite0_imagenet(torch.from_numpy(_photo("chelsea.png"))).softmax(1)[0]
        coffee = lite0_imagenet(torch.from_numpy(_photo("coffee.png"))).softmax(1)[0]
    cat_top5 = cat.topk(5).indices.tolist()
    assert cat_top5[0] in (281, 282, 285), cat_top5  # tabby / tiger cat / Egyptian cat
    assert {281, 282, 285} & set(cat_top5[:3]) and cat[cat_top5[0]] > 0.4
    coffee_top5 = coffee.topk(5).indices.tolist()
    assert coffee_top5[0] in (967, 968, 504), coffee_top5  # espresso / cup / coffee mug


def test_lite0_load_report_is_complete(lite0_imagenet):
    report = lite0_imagenet.medtune_load_report
    assert report.n_loaded == 296 and not report.skipped() and report.remapped > 0
    assert report.reinitialized_head == []


def test_one_channel_adaptation_sums_rgb_filters(lite0_imagenet):
    """A grey image through the adapted 1-channel stem equals the RGB net on the grey image in 3 channels."""
    grey = create_model("efficientnet_lite0", "imagenet-efficientnet-lite0", in_channels=1, num_classes=1000).eval()
    rep = grey.medtune_load_report
    assert any("3 -> 1" in a for a in rep.adapted)
    sd = grey.state_dict()
    ref = lite0_imagenet.state_dict()
    torch.testing.assert_close(sd["_conv_stem.weight"], ref["_conv_stem.weight"].sum(1, keepdim=True))
    x = torch.from_numpy(_photo("chelsea.png")).mean(1, keepdim=True)
    with torch.no_grad():
        torch.testing.assert_close(grey(x), lite0_imagenet(x.repeat(1, 3, 1, 1)), atol=1e-3, rtol=1e-4)


def test_new_head_is_reinitialized_and_reported():
    model = create_model("efficientnet_lite0", "imagenet-efficientnet-lite0", in_channels=1, num_classes=2)
    rep = model.medtune_load_report
    assert rep.reinitialized_head == ["_fc.weight", "_fc.bias"]
    assert rep.n_loaded == 294
    assert "re-initialized head: _fc.weight, _fc.bias" in rep.summary()


def test_adapt_input_conv_more_channels_keeps_scale():
    w = torch.randn(8, 3, 3, 3)
    assert adapt_input_conv(w, 5).shape == (8, 5, 3, 3)
    w6 = adapt_input_conv(w, 6)  # tiled twice, scaled by 3/6
    x = torch.randn(1, 1, 8, 8)  # same value in every channel -> same response as the RGB net
    out3 = torch.nn.functional.conv2d(x.repeat(1, 3, 1, 1), w)
    out6 = torch.nn.functional.conv2d(x.repeat(1, 6, 1, 1), w6)
    torch.testing.assert_close(out3, out6, atol=1e-4, rtol=1e-4)


def _hub_file(torch_home: Path, url: str) -> Path:
    path = torch_home / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_torchvision_resnet18_loads_through_real_torchvision_code(tmp_path, monkeypatch):
    """Downloads fail here, so a file of the same format is placed in the torch hub cache; torchvision's own
    ``Weights.get_state_dict`` then reads it (the same code path as after a real download)."""
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    reference = torchvision.models.resnet18(weights=None)
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    torch.save(reference.state_dict(), _hub_file(tmp_path, url))
    model = create_model("resnet18", "torchvision-resnet18-imagenet", in_channels=1, num_classes=3, verbose=False)
    rep = model.medtune_load_report
    assert rep.reinitialized_head == ["fc.weight", "fc.bias"] and not rep.shape_mismatch and not rep.missing
    torch.testing.assert_close(model.conv1.weight, reference.conv1.weight.sum(1, keepdim=True))
    torch.testing.assert_close(model.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)


def test_torchvision_densenet_legacy_keys_are_remapped(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    reference = torchvision.models.densenet121(weights=None)
    # the published file predates num_batches_tracked and names layers `norm.1` instead of `norm1`
    legacy = {
        re.sub(r"(norm|relu|conv)([12])\.", r"\1.\2.", k): v
        for k, v in reference.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    assert any(".norm.1." in k for k in legacy)
    url = torchvision.models.DenseNet121_Weights.IMAGENET1K_V1.url
    torch.save(legacy, _hub_file(tmp_path, url))
    model = create_model("densenet121", "torchvision-densenet121-imagenet", in_channels=3, num_classes=2, verbose=False)
    rep = model.medtune_load_report
    assert not rep.unexpected and not rep.missing and rep.remapped > 0
    torch.testing.assert_close(
        model.features.denseblock1.denselayer1.norm1.weight, reference.features.denseblock1.denselayer1.norm1.weight
    )


def test_torchvision_offline_without_cache_gives_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(MedTuneError) as err:
        create_model("resnet18", "torchvision-resnet18-imagenet", verbose=False)
    assert "\n" not in str(err.value) and "torch hub cache" in str(err.value)


def test_local_checkpoint_with_wrapper_and_module_prefix(tmp_path):
    src = create_model("tiny_cnn", None, in_channels=1, num_classes=4)
    wrapped = {"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}, "epoch": 3}
    path = tmp_path / "ckpt.pt"
    torch.save(wrapped, path)
    model = create_model("tiny_cnn", f"local:{path}", in_channels=1, num_classes=2, verbose=False)
    rep = model.medtune_load_report
    assert rep.reinitialized_head == ["8.weight", "8.bias"]  # 4 classes -> 2 classes
    torch.testing.assert_close(model[0].weight, src[0].weight)


def test_bad_checkpoints_fail_with_one_line_errors(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(MedTuneError) as err:
        read_checkpoint(garbage)
    assert str(garbage) in str(err.value) and "\n" not in str(err.value)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    pickled = tmp_path / "pickled.pt"
    torch.save({"obj": Evil()}, pickled)
    with pytest.raises(MedTuneError, match="weights-only"):
        read_checkpoint(pickled)
    with pytest.raises(MedTuneError, match="not found"):
        read_checkpoint(tmp_path / "missing.pt")


def test_wrong_architecture_for_source_is_refused():
    with pytest.raises(MedTuneError, match="is for efficientnet_lite0"):
        create_model("resnet18", "imagenet-efficientnet-lite0", verbose=False)


def test_sources_have_metadata():
    names = {m["name"] for m in list_sources()}
    assert {"imagenet-efficientnet-lite0", "torchvision-resnet18-imagenet"} <= names
    for meta in list_sources():
        assert meta["license"] and meta["origin"] and meta["input_size"] and len(meta["mean"]) in (1, 3)
    assert get_source("none") is None
    assert SOURCES["imagenet-efficientnet-lite0"].grey_mean_std() == (0.5, 0.5)
    with pytest.raises(MedTuneError, match="unknown pretrained source"):
        get_source("imagenet-does-not-exist")
