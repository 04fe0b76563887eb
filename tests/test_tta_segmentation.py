"""Test-time flips for 3D segmentation (issue 15): the bundle's evaluation (``FlipInferer`` around the sliding
window, key ``tta_flips``) and the torch-free runtime (sidecar ``tta``) give the same probabilities and Dice.
A real tiny run, a real ONNX file run by onnxruntime, synthetic volumes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

FLIPS = [[0], [1, 2]]
TINY = {"arch": "tiny_unet", "pretrained": "none", "epochs": 2, "num_workers": 0, "patch_size": [16] * 3,
        "min_train_steps": 0, "learning_rate": 0.01, "tta_flips": FLIPS}  # fmt: skip


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory) -> tuple[Path, Path]:
    from medtune.data.synthetic import make_synthetic_segmentation
    from medtune.finetune.runner import finetune

    root = tmp_path_factory.mktemp("tta3d")
    make_synthetic_segmentation(root / "data", n_train=3, n_val=2, size=20, seed=2)
    finetune(root / "data", "3d_segmentation", root / "run", overrides=TINY, progress_bar=False)
    return root / "run", root / "data"


def test_flip_inferer_runs_each_view_through_the_sliding_window():
    from monai.inferers import SlidingWindowInferer

    from medtune.finetune.tta import FlipInferer

    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 3, 3, padding=1)
    x = torch.randn(1, 1, 11, 9, 10)
    sw = SlidingWindowInferer(roi_size=[8, 8, 8], sw_batch_size=2, overlap=0.5, mode="gaussian")
    with torch.no_grad():
        torch.testing.assert_close(FlipInferer([], sw)(x, net), sw(x, net))  # no flips: the sliding window alone
        got = torch.softmax(FlipInferer(FLIPS, sw)(x, net), 1)
        views = [torch.softmax(sw(x, net), 1)]
        views += [torch.softmax(sw(x.flip(dims), net), 1).flip(dims) for dims in ([2], [3, 4])]
    torch.testing.assert_close(got, sum(views) / 3)
    assert (got - views[0]).abs().max() > 1e-4  # the flips changed the probabilities


def test_3d_tta_evaluation_equals_the_onnx_runtime(seg_run, tmp_path):
    """The Dice ``medtune evaluate`` reports with ``tta_flips`` is the Dice of the exported model's label maps."""
    import nibabel as nib

    from medtune.data import load_datalist
    from medtune.evaluate.segmentation import case_mean_dice
    from medtune.export.from_run import export_run
    from medtune.finetune.runner import build_network_for_run, evaluate_run
    from medtune.runtime.model import softmax
    from medtune.runtime.segment import load_volume_model, predict_volume, segment_file
    from medtune.runtime.tta import volume_logits

    run, data = seg_run
    with_tta = evaluate_run(run)["metrics"]
    rep = export_run(run, tmp_path / "model", n_samples=2)
    assert rep.parity.n_samples == 2 * (1 + len(FLIPS))  # the gate ran every flipped copy too
    side = json.loads((tmp_path / "model" / "model.json").read_text())
    assert side["tta"] == {"flips": FLIPS}
    model = load_volume_model(tmp_path / "model", provider="cpu")
    assert model.tta_flips == [(0,), (1, 2)]

    # same probabilities: the bundle's eval_inferer vs the runtime, on one model-space volume
    net, parser, _ = build_network_for_run(run)
    inferer = parser.get_parsed_content("eval_inferer")
    vol = np.random.default_rng(1).normal(size=(1, 19, 21, 20)).astype(np.float32)
    with torch.no_grad():
        p_torch = torch.softmax(inferer(torch.from_numpy(vol)[None], net.eval()), 1)[0].numpy()
    p_ort = softmax(volume_logits(model, vol, predict_volume).astype(np.float64), axis=0)
    np.testing.assert_allclose(p_ort, p_torch, atol=2e-4)
    net_plain, parser_plain, _ = build_network_for_run(run, {"tta_flips": []})
    with torch.no_grad():
        p_plain = torch.softmax(
            parser_plain.get_parsed_content("eval_inferer")(torch.from_numpy(vol)[None], net_plain.eval()), 1
        )[0].numpy()
    assert np.abs(p_plain - p_torch).max() > 1e-4  # the run's flips are what changed them

    # same Dice per case: the report's (with flips) and the runtime's label maps
    items = load_datalist(data, "validation")
    reported = {c["case"]: c["mean_dice"] for c in with_tta["cases"]}
    assert len(reported) == len(items) == 2
    values = sorted(int(k) for k in side["labels"] if int(k) > 0)
    got = []
    for i, item in enumerate(items):
        segment_file(model, item["image"], tmp_path / f"seg{i}.nii.gz")
        pred = np.asarray(nib.load(str(tmp_path / f"seg{i}.nii.gz")).dataobj)
        label = np.asarray(nib.load(str(item["label"])).dataobj).reshape(pred.shape)
        got.append(case_mean_dice(pred, label, values))
    np.testing.assert_allclose(sorted(got), sorted(reported.values()), atol=1e-3)
