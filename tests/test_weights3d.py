"""3D pretrained sources (Model Zoo bundle, SwinUNETR SSL, MedicalNet) on local files in the real key formats.

Downloads fail here, so each test writes a file with the source's real key format and container (from a small
randomly initialized network of the source's architecture) where the real loader looks for it, or monkeypatches
MONAI's download function to fail as it does offline. No test touches the network.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.error import URLError

import pytest
import torch

from medtune.errors import MedTuneError
from medtune.weights import adapt_input_conv, create_model, get_source
from medtune.weights.architectures import get_architecture
from medtune.weights.sources import SOURCES
from medtune.weights.zoo3d import (
    build_swinunetr,
    build_unet_zoo,
    medicalnet_resnet_builder,
    medicalnet_source,
    swinunetr_key,
    swinunetr_ssl_source,
    zoo_source,
)

TINY_UNET = (4, 8, 16, 32, 64)
SWIN_FS = 12  # smallest feature_size SwinUNETR accepts (divisible by 12)


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """An empty torch hub directory ($TORCH_HOME/hub): the download cache the loaders read."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub"


def _save(obj: object, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


def _one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


def _no_network(*args, **kwargs):
    raise URLError("[Errno -3] Temporary failure in name resolution")


# (every registered architecture is built and checked by the registry walk: tests/test_registry.py)


# --- MONAI Model Zoo spleen bundle (UNet) -------------------------------------------------------------------

# the last up block of MONAI's UNet: every tensor whose shape depends on num_classes
UNET_HEAD_REINIT = [
    "model.2.0.conv.weight",
    "model.2.0.conv.bias",
    "model.2.0.adn.N.weight",
    "model.2.0.adn.N.bias",
    "model.2.0.adn.N.running_mean",
    "model.2.0.adn.N.running_var",
    "model.2.1.conv.unit0.conv.weight",
    "model.2.1.conv.unit0.conv.bias",
]


@pytest.fixture(scope="module")
def spleen_reference() -> torch.nn.Module:
    """The spleen bundle's network (1 channel in, 2 classes out), tiny widths, with non-trivial BN statistics."""
    torch.manual_seed(1)
    net = build_unet_zoo(3, 1, 2, channels=TINY_UNET)
    with torch.no_grad():
        net.train()(torch.randn(2, 1, 32, 32, 32))  # running stats differ from a fresh net's
    return net.eval()


def test_spleen_bundle_from_monai_bundle_dir_new_task(spleen_reference, torch_home, monkeypatch):
    """The bundle's models/model.pt (a flat state dict) in MONAI's default bundle dir is read without a download;
    loading into 2 input channels and 3 classes adapts both input convs and re-initializes the last up block."""
    import monai.bundle

    ref = spleen_reference.state_dict()
    _save(ref, torch_home / "bundle" / "spleen_ct_segmentation" / "models" / "model.pt")
    monkeypatch.setattr(monai.bundle, "download", _no_network)  # a cached bundle needs no download
    model = create_model(
        "unet_zoo", "monai-zoo-spleen-ct", in_channels=2, num_classes=3, spatial_dims=3, channels=TINY_UNET
    )
    rep = model.medtune_load_report
    assert rep.reinitialized_head == UNET_HEAD_REINIT
    assert rep.n_loaded == len(ref) - len(UNET_HEAD_REINIT) == 140
    assert not rep.missing and not rep.unexpected and not rep.shape_mismatch and rep.remapped == 0
    assert rep.adapted == [
        "model.0.conv.unit0.conv.weight: input channels 1 -> 2 (tiled and rescaled filters)",
        "model.0.residual.weight: input channels 1 -> 2 (tiled and rescaled filters)",
    ]
    sd = model.state_dict()
    for key in (
        "model.1.submodule.0.conv.unit1.conv.weight",
        "model.1.submodule.1.submodule.1.submodule.0.residual.weight",
        "model.1.submodule.0.conv.unit0.adn.N.running_var",
        "model.2.0.adn.A.weight",
    ):
        torch.testing.assert_close(sd[key], ref[key], rtol=0, atol=0)
    for key in ("model.0.conv.unit0.conv.weight", "model.0.residual.weight"):
        torch.testing.assert_close(sd[key], ref[key].repeat(1, 2, 1, 1, 1) / 2)
    assert sd["model.2.1.conv.unit0.conv.weight"].shape == (3, 3, 3, 3, 3)


def test_spleen_bundle_same_task_reproduces_the_network(spleen_reference, torch_home):
    _save(spleen_reference.state_dict(), torch_home / "bundle" / "spleen_ct_segmentation" / "models" / "model.pt")
    model = create_model(
        "unet_zoo",
        "monai-zoo-spleen-ct",
        in_channels=1,
        num_classes=2,
        spatial_dims=3,
        channels=TINY_UNET,
        verbose=False,
    ).eval()
    rep = model.medtune_load_report
    assert rep.n_loaded == 148 and not rep.skipped() and not rep.adapted and not rep.reinitialized_head
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), spleen_reference(x))


def test_spleen_bundle_offline_is_a_one_line_error(torch_home, monkeypatch):
    import monai.bundle

    calls = []
    monkeypatch.setattr(monai.bundle, "download", lambda **kw: (calls.append(kw), _no_network())[1])
    with pytest.raises(MedTuneError) as excinfo:
        create_model("unet_zoo", "monai-zoo-spleen-ct", spatial_dims=3, channels=TINY_UNET, verbose=False)
    text = _one_line_error(excinfo)
    assert "spleen_ct_segmentation" in text and "zoo:PATH" in text and "URLError" in text
    assert calls == [{"name": "spleen_ct_segmentation", "bundle_dir": str(torch_home / "bundle"), "progress": False}]


def _bundle_folder(root: Path, state: dict) -> Path:
    bundle = root / "spleen_ct_segmentation"
    meta = {
        "name": "Spleen CT segmentation",
        "version": "0.5.9",
        "description": "A pre-trained model for volumetric (3D) segmentation of the spleen from CT image",
        "network_data_format": {
            "inputs": {
                "image": {
                    "modality": "CT",
                    "format": "hounsfield",
                    "num_channels": 1,
                    "spatial_shape": [96, 96, 96],
                    "value_range": [0, 1],
                }
            },
            "outputs": {"pred": {"format": "segmentation", "num_channels": 2, "spatial_shape": [96, 96, 96]}},
        },
    }
    (bundle / "configs").mkdir(parents=True)
    (bundle / "configs" / "metadata.json").write_text(json.dumps(meta))
    _save(state, bundle / "models" / "model.pt")
    return bundle


def test_zoo_path_source_reads_bundle_folder_and_metadata(spleen_reference, tmp_path, monkeypatch):
    ref = spleen_reference.state_dict()
    # a checkpoint with the network inside a container, saved from a DataParallel-wrapped network
    bundle = _bundle_folder(tmp_path, {"model": {f"module.{k}": v for k, v in ref.items()}, "epoch": 7})
    source = zoo_source(bundle, "unet_zoo")
    assert source.name == f"zoo:{bundle / 'models' / 'model.pt'}"
    assert (source.in_channels, source.num_classes, source.input_size, source.spatial_dims) == (1, 2, (96, 96, 96), 3)
    assert "0.5.9" in source.origin and "CT" in source.description
    monkeypatch.setitem(SOURCES, source.name, source)
    model = create_model(
        "unet_zoo", source.name, in_channels=1, num_classes=4, spatial_dims=3, channels=TINY_UNET, verbose=False
    )
    rep = model.medtune_load_report
    assert rep.n_loaded == 140 and rep.reinitialized_head == UNET_HEAD_REINIT and rep.remapped == len(ref)
    assert not rep.missing and not rep.unexpected and not rep.adapted
    torch.testing.assert_close(model.state_dict()["model.0.residual.weight"], ref["model.0.residual.weight"])


def test_zoo_path_errors_are_one_line(tmp_path):
    (tmp_path / "b" / "models").mkdir(parents=True)
    (tmp_path / "b" / "models" / "model.ts").write_bytes(b"PK")
    with pytest.raises(MedTuneError) as excinfo:
        zoo_source(tmp_path / "b")
    assert "TorchScript" in _one_line_error(excinfo)
    with pytest.raises(MedTuneError) as excinfo:
        zoo_source(tmp_path / "missing.pt")
    assert "not found" in _one_line_error(excinfo)


# --- SwinUNETR self-supervised encoder ------------------------------------------------------------------


@pytest.fixture(scope="module")
def swin_reference() -> dict[str, torch.Tensor]:
    """The state dict of a SwinUNETR (1 channel, feature_size 12) whose encoder plays the pretrained one."""
    torch.manual_seed(2)
    return build_swinunetr(3, 1, 2, feature_size=SWIN_FS).state_dict()


def _encoder(ref: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in ref.items() if k.startswith("swinViT.")}


def _released_format(ref: dict[str, torch.Tensor]) -> dict:
    """model_swinvit.pt: {'state_dict': {'module.layers1.0.blocks.0.mlp.fc1.weight': ...}} (no swinViT.)."""
    return {
        "state_dict": {
            "module." + k[len("swinViT.") :].replace(".mlp.linear", ".mlp.fc"): v for k, v in _encoder(ref).items()
        }
    }


def _sslhead_format(ref: dict[str, torch.Tensor]) -> dict:
    """A checkpoint of MONAI's SSL pretraining script (SSLHead under DDP, with pretext heads and optimizer)."""
    state = {"module.swin_vit." + k[len("swinViT.") :]: v for k, v in _encoder(ref).items()}
    state.update(
        {
            "module.rotation_head.weight": torch.randn(4, 8 * SWIN_FS),
            "module.rotation_head.bias": torch.zeros(4),
            "module.contrastive_head.weight": torch.randn(512, 8 * SWIN_FS),
            "module.conv.0.weight": torch.randn(2),
        }
    )
    return {"global_step": 100, "state_dict": state, "optimizer": {"state": {}, "param_groups": [{"lr": 4e-4}]}}


def _dae_format(ref: dict[str, torch.Tensor]) -> dict:
    """Disruptive-Autoencoders weights (MONAI's filter_swinunetr format): encoder.layersN.0.0.*, pretext tensors."""
    state = {}
    for k, v in _encoder(ref).items():
        rest = k[len("swinViT.") :]
        if rest.startswith("layers"):
            rest = rest[: len("layers1.0.")] + "0." + rest[len("layers1.0.") :]
        state["encoder." + rest] = v
    state.update(
        {
            "encoder.mask_token": torch.zeros(1, 1, SWIN_FS),
            "encoder.norm.weight": torch.ones(16 * SWIN_FS),
            # the reconstruction head, shaped like the 2-class network's head: only the filter keeps it out
            "out.conv.conv.weight": torch.randn(2, SWIN_FS, 1, 1, 1),
            "out.conv.conv.bias": torch.ones(2),
        }
    )
    return {"model": state}


SWIN_DECODER_BLOCKS = (
    "encoder1, encoder2, encoder3, encoder4, encoder10, decoder5, decoder4, decoder3, decoder2, decoder1"
)


def _check_swin_encoder_load(model: torch.nn.Module, ref: dict[str, torch.Tensor], in_channels: int) -> None:
    rep = model.medtune_load_report
    encoder = _encoder(ref)
    decoder = [k for k in ref if not k.startswith(("swinViT.", "out.")) and not k.endswith("num_batches_tracked")]
    assert rep.n_loaded == len(encoder) == 126
    assert sorted(rep.loaded) == sorted(encoder)
    # the CNN decoder (not in an encoder checkpoint) and the output conv are SwinUNETR's head: re-initialized,
    # nothing the network has is reported missing, and loaded + re-initialized head cover the whole network
    assert len(decoder) == 31 and rep.reinitialized_head == decoder + ["out.conv.conv.weight", "out.conv.conv.bias"]
    assert not rep.missing and not rep.shape_mismatch
    assert sorted(rep.loaded + rep.reinitialized_head) == sorted(model.state_dict())
    assert f"initialized fresh (not in the checkpoint): {SWIN_DECODER_BLOCKS} (31 tensors)" in rep.adapted
    stem = "swinViT.patch_embed.proj.weight"
    if in_channels != 1:
        assert f"{stem}: input channels 1 -> {in_channels} (tiled and rescaled filters)" in rep.adapted
    sd = model.state_dict()
    torch.testing.assert_close(sd[stem], adapt_input_conv(ref[stem], in_channels))
    for key in (
        "swinViT.layers1.0.blocks.1.mlp.linear2.weight",
        "swinViT.layers3.0.blocks.0.attn.relative_position_bias_table",
        "swinViT.layers4.0.downsample.reduction.weight",
        "swinViT.layers2.0.blocks.1.norm1.bias",
    ):
        torch.testing.assert_close(sd[key], ref[key], rtol=0, atol=0)
    assert "re-initialized head: encoder1.layer.conv1.conv.weight, " in rep.summary()
    assert "(33 tensors)" in rep.summary() and "initialized fresh" in rep.summary()


def test_swinunetr_ssl_released_file_from_hub_cache(swin_reference, torch_home, monkeypatch):
    """model_swinvit.pt already in the torch hub cache (where the loader downloads it to) is read, not fetched:
    MONAI's ``download_url`` finds it (the URL points nowhere)."""
    from medtune.weights import zoo3d

    _save(_released_format(swin_reference), torch_home / "checkpoints" / "model_swinvit.pt")
    monkeypatch.setattr(zoo3d, "SWINUNETR_SSL_URL", "http://127.0.0.1:9/model_swinvit.pt")
    model = create_model(
        "swinunetr", "swinunetr-ssl", in_channels=4, num_classes=3, spatial_dims=3, feature_size=SWIN_FS, verbose=False
    )
    _check_swin_encoder_load(model, swin_reference, in_channels=4)
    rep = model.medtune_load_report
    assert rep.remapped == 2 * 126 and not rep.unexpected  # 'module.' stripped, then all 126 renamed


@pytest.mark.parametrize("fmt", ["sslhead", "dae"])
def test_swinunetr_ssl_key_variants_from_local_file(fmt, swin_reference, tmp_path, monkeypatch):
    obj = _sslhead_format(swin_reference) if fmt == "sslhead" else _dae_format(swin_reference)
    source = swinunetr_ssl_source(_save(obj, tmp_path / f"{fmt}.pt"))
    monkeypatch.setitem(SOURCES, source.name, source)
    model = create_model(
        "swinunetr", source.name, in_channels=1, num_classes=2, spatial_dims=3, feature_size=SWIN_FS, verbose=False
    )
    _check_swin_encoder_load(model, swin_reference, in_channels=1)
    rep = model.medtune_load_report
    if fmt == "sslhead":  # pretext heads stay visible as unexpected
        assert sorted(rep.unexpected) == [
            "contrastive_head.weight",
            "conv.0.weight",
            "rotation_head.bias",
            "rotation_head.weight",
        ]
    else:  # MONAI's filter_swinunetr dropped mask token, norm and reconstruction head
        assert not rep.unexpected
        assert not torch.equal(model.state_dict()["out.conv.conv.weight"], obj["model"]["out.conv.conv.weight"])


def test_swinunetr_key_variants():
    want = "swinViT.layers2.0.blocks.1.mlp.linear1.weight"
    for key in (
        "module.layers2.0.blocks.1.mlp.fc1.weight",
        "module.swin_vit.layers2.0.blocks.1.mlp.linear1.weight",
        "swin_vit.layers2.0.blocks.1.mlp.fc1.weight",
        "layers.1.blocks.1.mlp.fc1.weight",
        want,
    ):
        assert swinunetr_key(key) == want
    assert swinunetr_key("module.patch_embed.proj.bias") == "swinViT.patch_embed.proj.bias"
    assert swinunetr_key("decoder1.transp_conv.conv.weight") == "decoder1.transp_conv.conv.weight"
    assert swinunetr_key("encoder10.layer.conv1.conv.weight") == "encoder10.layer.conv1.conv.weight"


def test_full_swinunetr_bundle_checkpoint_adapts_both_input_paths(swin_reference, tmp_path, monkeypatch):
    """A whole SwinUNETR (a Model Zoo bundle such as swin_unetr_btcv_segmentation) into 2 channels, 3 classes:
    the patch embedding and encoder1's two input convs are adapted, only ``out`` starts fresh."""
    _save(swin_reference, tmp_path / "swin_bundle" / "models" / "model.pt")
    source = zoo_source(tmp_path / "swin_bundle", "swinunetr")
    monkeypatch.setitem(SOURCES, source.name, source)
    model = create_model(
        "swinunetr", source.name, in_channels=2, num_classes=3, spatial_dims=3, feature_size=SWIN_FS, verbose=False
    )
    rep = model.medtune_load_report
    assert rep.n_loaded == len(swin_reference) - 2 == 157 and not rep.skipped()
    assert rep.reinitialized_head == ["out.conv.conv.weight", "out.conv.conv.bias"]
    assert [a.split(":")[0] for a in rep.adapted] == list(get_architecture("swinunetr").stem_key)
    for key in ("encoder1.layer.conv3.conv.weight", "encoder1.layer.conv1.conv.weight"):
        torch.testing.assert_close(model.state_dict()[key], swin_reference[key].repeat(1, 2, 1, 1, 1) / 2)
    torch.testing.assert_close(
        model.decoder2.transp_conv.conv.weight, swin_reference["decoder2.transp_conv.conv.weight"]
    )


def test_swinunetr_ssl_feature_size_mismatch_says_what_to_build(swin_reference, tmp_path, monkeypatch):
    source = swinunetr_ssl_source(_save(_released_format(swin_reference), tmp_path / "model_swinvit.pt"))
    monkeypatch.setitem(SOURCES, source.name, source)
    with pytest.raises(MedTuneError) as excinfo:
        create_model("swinunetr", source.name, spatial_dims=3, feature_size=24, verbose=False)
    assert "feature_size=12" in _one_line_error(excinfo)


def test_swinunetr_ssl_download_is_checked_against_its_hash(swin_reference, torch_home, tmp_path, monkeypatch):
    """The real download (MONAI's ``download_url``, here from a file:// URL) lands in the hub cache when the file
    has the declared SHA-256; another hash gives one line and leaves no file in the cache."""
    from medtune.weights import zoo3d
    from medtune.weights.astra import sha256_file

    served = _save(_released_format(swin_reference), tmp_path / "served" / "model_swinvit.pt")
    monkeypatch.setattr(zoo3d, "SWINUNETR_SSL_URL", served.as_uri())
    cached = torch_home / "checkpoints" / "model_swinvit.pt"
    monkeypatch.setattr(zoo3d, "SWINUNETR_SSL_SHA256", "0" * 64)
    with pytest.raises(MedTuneError) as excinfo:
        create_model("swinunetr", "swinunetr-ssl", spatial_dims=3, feature_size=SWIN_FS, verbose=False)
    assert "sha256" in _one_line_error(excinfo).lower() and not cached.exists()
    monkeypatch.setattr(zoo3d, "SWINUNETR_SSL_SHA256", sha256_file(served))
    model = create_model("swinunetr", "swinunetr-ssl", spatial_dims=3, feature_size=SWIN_FS, verbose=False)
    _check_swin_encoder_load(model, swin_reference, in_channels=1)
    assert sha256_file(cached) == sha256_file(served)


def test_swinunetr_ssl_offline_is_a_one_line_error(torch_home, monkeypatch):
    from monai import apps

    monkeypatch.setattr(apps, "download_url", _no_network)
    with pytest.raises(MedTuneError) as excinfo:
        create_model("swinunetr", "swinunetr-ssl", spatial_dims=3, feature_size=SWIN_FS, verbose=False)
    text = _one_line_error(excinfo)
    assert "model_swinvit.pt" in text and "swinunetr-ssl:PATH" in text and str(torch_home / "checkpoints") in text


# --- MedicalNet 3D ResNets ------------------------------------------------------------------------------------


def _medicalnet_file(depth: int, path: Path) -> dict[str, torch.Tensor]:
    """A MedicalNet-format file: {'state_dict': {'module.conv1.weight': ...}}, 1 input channel, no fc, and (as in
    the PyTorch 0.4-era originals) no num_batches_tracked. Returns the network-named tensors."""
    torch.manual_seed(depth)
    net = medicalnet_resnet_builder(depth)(3, 1, 1, widen_factor=0.25, feed_forward=False)
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    _save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    return state


@pytest.mark.parametrize(
    ("depth", "n_tensors", "downsample_key"),
    [(10, 60, "layer4.0.downsample.0.weight"), (18, 85, None)],  # ResNet-18: MedicalNet's 'A' shortcuts (no conv)
)
def test_medicalnet_new_task_and_channels(depth, n_tensors, downsample_key, torch_home, tmp_path, monkeypatch):
    if depth == 10:  # the registered source, reading the torch hub cache
        state = _medicalnet_file(depth, torch_home / "checkpoints" / "resnet_10_23dataset.pth")
        spec = "medicalnet-resnet10"
    else:  # medicalnet:PATH
        state = _medicalnet_file(depth, tmp_path / "resnet_18_23dataset.pth")
        source = medicalnet_source(tmp_path / "resnet_18_23dataset.pth", depth)
        monkeypatch.setitem(SOURCES, source.name, source)
        spec = source.name
    model = create_model(
        f"resnet{depth}_3d", spec, in_channels=2, num_classes=5, spatial_dims=3, widen_factor=0.25, verbose=False
    )
    rep = model.medtune_load_report
    assert rep.n_loaded == len(state) == n_tensors
    assert rep.reinitialized_head == ["fc.weight", "fc.bias"]
    assert rep.adapted == ["conv1.weight: input channels 1 -> 2 (tiled and rescaled filters)"]
    assert not rep.missing and not rep.unexpected and not rep.shape_mismatch and rep.remapped == n_tensors
    sd = model.state_dict()
    torch.testing.assert_close(sd["conv1.weight"], state["conv1.weight"].repeat(1, 2, 1, 1, 1) / 2)
    for key in ("layer1.0.conv1.weight", "layer3.0.bn2.running_mean", "layer4.0.conv2.weight", downsample_key):
        if key is not None:
            torch.testing.assert_close(sd[key], state[key], rtol=0, atol=0)
    assert (downsample_key is None) == (not any("downsample" in k for k in sd))
    assert model.fc.out_features == 5


def test_medicalnet_offline_is_a_one_line_error(torch_home, monkeypatch):
    from monai.networks.nets import resnet

    calls = []

    def offline(depth, device="cpu", datasets23=True):
        calls.append((depth, datasets23))
        raise OSError("We couldn't connect to 'https://huggingface.co' to load this file")

    monkeypatch.setattr(resnet, "get_pretrained_resnet_medicalnet", offline)
    with pytest.raises(MedTuneError) as excinfo:
        create_model("resnet50_3d", "medicalnet-resnet50", spatial_dims=3, widen_factor=0.125, verbose=False)
    text = _one_line_error(excinfo)
    assert "resnet_50_23dataset.pth" in text and "medicalnet:PATH" in text and "MedicalNet-Resnet50" in text
    assert calls == [(50, True)]


def test_medicalnet_through_monai_download_function(torch_home, monkeypatch):
    """Without a cached file the loader takes what MONAI's ``get_pretrained_resnet_medicalnet`` returns (the
    checkpoint's inner ``state_dict``, keys still ``module.``-prefixed)."""
    from monai.networks.nets import resnet

    torch.manual_seed(50)
    net = medicalnet_resnet_builder(50)(3, 1, 1, widen_factor=0.125, feed_forward=False)
    state = {f"module.{k}": v for k, v in net.state_dict().items()}
    monkeypatch.setattr(resnet, "get_pretrained_resnet_medicalnet", lambda depth, device, datasets23: state)
    model = create_model(
        "resnet50_3d", "medicalnet-resnet50", num_classes=2, spatial_dims=3, widen_factor=0.125, verbose=False
    )
    rep = model.medtune_load_report
    assert rep.n_loaded == len(state) == 320 - 2 and rep.reinitialized_head == ["fc.weight", "fc.bias"]
    assert not rep.skipped() and not rep.adapted
    torch.testing.assert_close(model.layer4[2].conv3.weight, net.layer4[2].conv3.weight, rtol=0, atol=0)


# --- metadata and spec prefixes -------------------------------------------------------------------------------


def test_3d_sources_carry_metadata():
    for name, arch in [
        ("monai-zoo-spleen-ct", "unet_zoo"),
        ("swinunetr-ssl", "swinunetr"),
        ("medicalnet-resnet10", "resnet10_3d"),
        ("medicalnet-resnet18", "resnet18_3d"),
        ("medicalnet-resnet50", "resnet50_3d"),
    ]:
        src = SOURCES[name]
        assert src.arch == arch and src.spatial_dims == 3 and src.in_channels == 1
        assert src.origin and src.license and src.key_format and "Input: 1-channel" in src.description
    assert "model_swinvit.pt" in SOURCES["swinunetr-ssl"].origin and "fc1" in SOURCES["swinunetr-ssl"].key_format
    assert "spleen_ct_segmentation" in SOURCES["monai-zoo-spleen-ct"].origin
    assert "1.5x1.5x2.0" in SOURCES["monai-zoo-spleen-ct"].description


def test_spec_prefixes_resolve_through_get_source(tmp_path):
    """``zoo:PATH``, ``swinunetr-ssl:PATH`` and ``medicalnet:PATH`` (zoo3d.PREFIX_RESOLVERS via get_source)."""
    bundle = _bundle_folder(tmp_path, {"w": torch.zeros(1)})
    zoo = get_source(f"zoo:{bundle}", "unet_zoo")
    assert zoo.name == f"zoo:{bundle / 'models' / 'model.pt'}" and zoo.arch == "unet_zoo"
    ssl = get_source(f"swinunetr-ssl:{tmp_path / 'm.pt'}", "swinunetr")
    assert ssl.arch == "swinunetr" and ssl.filter_fn is not None
    med = get_source(f"medicalnet:{tmp_path / 'r.pth'}", "resnet18_3d")
    assert med.arch == "resnet18_3d" and med.name == f"medicalnet:{tmp_path / 'r.pth'}"


def test_medicalnet_shortcut_a_resnet_scripts_and_matches_monai():
    """resnet18_3d (MedicalNet's shortcut "A") scripts for the bundle's models/model.ts: MONAI's functools.partial
    shortcut is replaced by a module computing the same outputs and gradients (same state dict)."""
    from monai.networks.nets import ResNet
    from monai.networks.nets.resnet import get_inplanes, resnet_params

    from medtune.weights.zoo3d import PadShortcut

    torch.manual_seed(0)
    net = create_model("resnet18_3d", None, in_channels=1, num_classes=2, spatial_dims=3, verbose=False)
    block, layers = resnet_params["resnet18"][:2]
    monai_net = ResNet(block, list(layers), get_inplanes(), spatial_dims=3, n_input_channels=1, num_classes=2,
                       conv1_t_size=7, conv1_t_stride=2, shortcut_type="A", bias_downsample=False)  # fmt: skip
    monai_net.load_state_dict(net.state_dict())  # the same keys: the shortcut has no tensors
    assert sum(isinstance(m, PadShortcut) for m in net.modules()) == 3
    x = torch.randn(2, 1, 16, 16, 16)  # small: every stage still runs (down to 1 voxel), shortcuts included
    net(x).square().sum().backward()
    monai_net(x).square().sum().backward()
    for (name, a), b in zip(net.named_parameters(), monai_net.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name
    net.eval(), monai_net.eval()
    scripted = torch.jit.script(net)
    with torch.no_grad():
        y = torch.randn(1, 1, 24, 16, 20)  # scripted: any input size
        assert torch.allclose(scripted(y), monai_net(y), atol=1e-5)
