"""3D presets apply the pretrained source's own input statistics (issue 11: the source owns its preprocessing).

2D ImageNet weights inflated to 3D expect ``(x - 0.5) / 0.5`` on [0, 1] input, as the 2D presets give them; the 3D
presets used to feed them [0, 1]. Checked on the real preset configs (MONAI's bundle parser), real MONAI transforms
and the torch-free runtime on a real NIfTI file.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("monai", reason="monai (training extra) not installed")

from monai.bundle import ConfigParser  # noqa: E402

from medtune.finetune.bundle_glue import volume_norm  # noqa: E402
from medtune.finetune.runner import config_files  # noqa: E402
from medtune.runtime.volume import read_volume, to_model_space  # noqa: E402
from medtune.weights.sources import get_source  # noqa: E402

CT = {"intensity": "ct", "ct_window": [-1000, 200], "spacing": None}


def _parser(preset: str, **over) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(config_files(preset))
    parser.update(over)
    return parser


@pytest.mark.parametrize(
    "source,intensity,expected",
    [
        ("imagenet-efficientnet-lite0-inflated", "ct", (0.5, 0.5)),
        ("imagenet-flexunet-lite0-inflated", "minmax", (0.5, 0.5)),
        ("imagenet-efficientnet-lite0-inflated", "mr", (0.0, 1.0)),  # z-scored input: already centred
        ("imagenet-efficientnet-lite0-inflated", "none", (0.0, 1.0)),
        ("astra-ct-resnet152", "ct", (0.0, 1.0)),  # a 3D source stating mean 0 / std 1
        ("imagenet-efficientnet-lite0", "ct", (0.0, 1.0)),  # 2D weights: the 2D presets normalize them
        (None, "ct", (0.0, 1.0)),  # scratch
        ("local:/nonexistent/model.pt", "ct", (0.0, 1.0)),  # a local checkpoint states no statistics
    ],
)
def test_volume_norm_follows_the_source(source, intensity, expected):
    norm = volume_norm(get_source(source), intensity)
    assert (norm["mean"], norm["std"]) == expected


def test_inflated_source_gets_a_normalize_op_after_the_ct_window_and_scratch_none():
    ops = _parser("3d_classification", pretrained="imagenet-efficientnet-lite0-inflated", **CT).get_parsed_content(
        "preprocessing_spec"
    )["ops"]
    names = [op["op"] for op in ops]
    assert names[-2:] == ["ct_window", "normalize"]
    assert ops[-1] == {"op": "normalize", "mean": [0.5], "std": [0.5]}
    for pretrained in ("none", "astra-ct-resnet152"):
        spec = _parser("3d_classification", pretrained=pretrained, **CT).get_parsed_content("preprocessing_spec")
        assert "normalize" not in [op["op"] for op in spec["ops"]]


def test_eval_transforms_and_runtime_agree_with_the_source_norm(tmp_path: Path):
    """The 3D segmentation preset's MONAI evaluation transforms and the runtime's sidecar ops give the same array,
    in [-1, 1] for the inflated ImageNet encoder (was [0, 1])."""
    rng = np.random.default_rng(0)
    affine = np.array([[0.0, -1.0, 0.0, 30.0], [-1.0, 0.0, 0.0, 20.0], [0.0, 0.0, 2.0, -10.0], [0, 0, 0, 1]])
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(rng.uniform(-1200, 400, size=(12, 10, 8)).astype(np.float32), affine), str(path))
    parser = _parser("3d_segmentation", pretrained="imagenet-flexunet-lite0-inflated", arch="flexunet_lite0",
                     patch_size=[32, 32, 32], **CT)  # fmt: skip
    transforms = parser.get_parsed_content("eval_transforms")
    spec = parser.get_parsed_content("preprocessing_spec")
    monai_out = np.asarray(transforms({"image": str(path)})["image"])
    runtime_out, _ = to_model_space(read_volume(path), spec["ops"])
    assert monai_out.shape == runtime_out.shape == (1, 10, 12, 8)
    np.testing.assert_allclose(monai_out, runtime_out, atol=1e-5)
    assert monai_out.min() == pytest.approx(-1.0) and monai_out.max() == pytest.approx(1.0)  # clipped window
    scratch = _parser("3d_segmentation", pretrained="none", **CT)
    plain = np.asarray(scratch.get_parsed_content("eval_transforms")({"image": str(path)})["image"])
    np.testing.assert_allclose(monai_out, (plain - 0.5) / 0.5, atol=1e-6)
