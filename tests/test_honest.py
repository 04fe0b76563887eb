"""Honest estimates (issue 15): internal test, k-fold CV with pooled out-of-fold predictions, fold ensembles,
test-time flips in the torch-free runtime, EMA weights. Tiny nets, tiny synthetic data, real runs, real ONNX."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from medtune.data import load_datalist, make_synthetic_classification  # noqa: E402
from medtune.errors import MedTuneError  # noqa: E402
from medtune.finetune.crossval import assign_folds, carve_holdout, crossvalidate, finetune_with_holdout  # noqa: E402

TINY = {
    "arch": "tiny_cnn",
    "pretrained": "none",
    "epochs": 1,
    "batch_size": 8,
    "num_workers": 0,
    "image_size": [32, 32],
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("honest") / "ds"
    make_synthetic_classification(out, n_train=40, n_val=10, size=32, seed=3, n_test=8)
    return out


@pytest.fixture(scope="module")
def cv_dir(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cv") / "cv"
    crossvalidate(
        dataset,
        "2d_classification",
        out,
        3,
        overrides={**TINY, "tta_flips": [[1]]},  # the members deploy the left-right flip (the preset's default: off)
        tta_flips=[[1]],
        extra_split="testing",
        pool_validation=False,  # folds over the training split only (the pooled form: its own test)
        progress_bar=False,
        n_bootstrap=200,
    )
    return out


def _rel(items, root):
    return sorted(Path(i["image"]).relative_to(root).as_posix() for i in items)


# ---------------------------------------------------------------------------------------------- splits


def test_folds_are_stratified_grouped_and_cover_everything():
    items = [{"image": f"i{i}.png", "label": int(i % 4 == 0), "group": f"p{i // 2}"} for i in range(60)]
    folds = assign_folds(items, 5, seed=0)
    assert sorted(set(folds)) == [0, 1, 2, 3, 4] and len(folds) == 60
    for g in {it["group"] for it in items}:  # a patient never spans two folds
        assert len({f for it, f in zip(items, folds, strict=True) if it["group"] == g}) == 1
    for k in range(5):
        pos = sum(it["label"] for it, f in zip(items, folds, strict=True) if f == k)
        assert 2 <= pos <= 4  # 15 positives spread over 5 folds
    assert assign_folds(items, 5, seed=0) == folds  # deterministic


def test_holdout_is_disjoint_and_skipped_when_too_small():
    items = [{"image": f"i{i}.png", "label": i % 2} for i in range(100)]
    train, test, reason = carve_holdout(items, 0.2, seed=0)
    assert reason is None and len(test) == 20 and len(train) == 80
    assert not {t["image"] for t in test} & {t["image"] for t in train}
    assert sum(t["label"] for t in test) == 10
    _, test_small, reason_small = carve_holdout(items[:20], 0.2)
    assert test_small == [] and "--folds" in reason_small


# ---------------------------------------------------------------------------------------------- cross-validation


def test_oof_predictions_cover_every_training_case_once(cv_dir, dataset):
    from medtune.evaluate import classification_metrics

    training = load_datalist(dataset, "training")
    rec = json.loads((cv_dir / "crossval.json").read_text())
    with open(cv_dir / "oof" / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["case"] for r in rows) == _rel(training, dataset)  # each case exactly once
    assert len({r["case"] for r in rows}) == len(training)
    for r in rows:
        assert int(r["fold"]) == rec["assignment"][r["case"]]
    for k in range(3):  # fold k's model never trained on fold k
        run = json.loads((cv_dir / f"fold{k}" / "run.json").read_text())
        trained = set(_rel(run["overrides"]["train_datalist"], dataset))
        held = {c for c, f in rec["assignment"].items() if f == k}
        assert trained and not trained & held and len(trained) + len(held) == len(training)
    y = np.array([int(r["label"]) for r in rows])
    p = np.array([[float(r["p_no lesion"]), float(r["p_lesion"])] for r in rows])
    pooled = classification_metrics(y, p, ["no lesion", "lesion"], n_bootstrap=200)
    assert rec["pooled"]["estimate"]["value"] == pytest.approx(pooled["auc"]["value"], abs=1e-6)
    est = json.loads((cv_dir / "estimate.json").read_text())
    assert est["kind"] == "crossval" and est["honest"]["n"] == len(training)
    assert (
        est["honest"]["estimate"]["ci_low"]
        <= est["honest"]["estimate"]["value"]
        <= est["honest"]["estimate"]["ci_high"]
    )
    assert "ensemble" in json.dumps(rec) and rec["testing_ensemble"]["n"] == 8
    assert "cross-validated, out-of-fold" in (cv_dir / "oof" / "report.md").read_text()


def test_tta_probabilities_are_the_flip_average(cv_dir, dataset):
    from medtune.finetune.crossval import predict_classification

    items = load_datalist(dataset, "testing")
    plain = predict_classification(cv_dir / "fold0", items, [])
    both = predict_classification(cv_dir / "fold0", items, [[1]])
    assert np.array_equal(predict_classification(cv_dir / "fold0", items), both)  # the run's own tta_flips
    from monai.data import Dataset

    from medtune.finetune.runner import build_network_for_run

    net, parser, _ = build_network_for_run(cv_dir / "fold0")
    ds = Dataset(items, parser.get_parsed_content("eval_transforms"))
    x = torch.stack([torch.as_tensor(np.asarray(ds[i]["image"])) for i in range(len(ds))])
    with torch.inference_mode():
        flipped = torch.softmax(net(torch.flip(x, dims=[3])), 1).numpy()
    np.testing.assert_allclose(both, (plain + flipped) / 2, atol=1e-6)


# ---------------------------------------------------------------------------------------------- internal test


@pytest.mark.slow  # in-process bundle runs: 11-16 s at load 6-7
def test_internal_test_run_reports_both_numbers(dataset, tmp_path):
    from medtune.cli import main
    from medtune.finetune.runner import evaluate_run

    bigger = tmp_path / "big"
    make_synthetic_classification(bigger, n_train=60, n_val=10, size=32, seed=4)
    out = tmp_path / "run"
    # refit_on_all off: the deployed model is the one scored on the internal test (2D classification refits by default)
    rec = finetune_with_holdout(bigger, "2d_classification", out, fraction=0.2,
                                overrides={**TINY, "refit_on_all": False}, progress_bar=False)  # fmt: skip
    split = json.loads((out / "internal_test.json").read_text())
    trained = set(_rel(rec["overrides"]["train_datalist"], bigger))
    assert len(split["cases"]) == 12 and not trained & set(split["cases"])
    assert trained | set(split["cases"]) == set(_rel(load_datalist(bigger, "training"), bigger))
    report = (out / "eval" / "report.md").read_text()
    assert "## Which number to quote" in report and "internal test (never used to train or choose)" in report
    assert "Quote the internal-test figure" in report
    est = json.loads((out / "estimate.json").read_text())
    hon = json.loads((out / "eval_internal_test" / "metrics.json").read_text())
    assert est["honest"]["estimate"]["value"] == pytest.approx(hon["auc"]["value"]) and hon["n"] == 12
    # a user's own external split still evaluates as before
    ext = evaluate_run(out, dataset=dataset, split="testing")
    assert ext["metrics"]["n"] == 8 and Path(ext["eval_dir"]).name == "eval_testing"
    # CLI: --internal-test 0 is a plain run (no estimate)
    plain = tmp_path / "plain"
    args = ["finetune", "--dataset", str(bigger), "--out", str(plain), "--internal-test", "0", "--quiet"]
    args += [f"--set={k}={v!r}" for k, v in TINY.items()]
    assert main(args) == 0 and not (plain / "estimate.json").exists()


def test_refit_on_all_deploys_a_model_trained_on_every_case_and_keeps_the_estimate(tmp_path):
    """refit_on_all: the estimate comes from a run that never saw the internal test (RUN/internal_test_run/); the
    deployed model in RUN trains on all the training cases; a resume after stage 1 trains only stage 2."""
    from medtune.cli import main
    from medtune.runfolder import ESTIMATE_RUN

    data = tmp_path / "big"
    make_synthetic_classification(data, n_train=60, n_val=10, size=32, seed=4)
    out = tmp_path / "run"
    assert "refit_on_all" not in TINY  # the 2D classification preset's default (measured: breastmnist_refit.md)
    rec = finetune_with_holdout(data, "2d_classification", out, fraction=0.2, overrides=TINY, progress_bar=False)
    split = json.loads((out / "internal_test.json").read_text())
    stage1 = json.loads((out / ESTIMATE_RUN / "run.json").read_text())
    est_trained = set(_rel(stage1["overrides"]["train_datalist"], data))
    deployed = set(_rel(rec["overrides"]["train_datalist"], data))
    every = set(_rel(load_datalist(data, "training"), data))
    assert split["refit"] is True and len(split["cases"]) == 12
    assert not est_trained & set(split["cases"]) and est_trained | set(split["cases"]) == every
    assert deployed == every  # the internal test's cases trained the deployed model
    est = json.loads((out / "estimate.json").read_text())
    hon = json.loads((out / ESTIMATE_RUN / "eval_internal_test" / "metrics.json").read_text())
    assert est["kind"] == "internal_test_refit" and hon["n"] == 12
    assert est["honest"]["estimate"]["value"] == pytest.approx(hon["auc"]["value"])
    assert est["refit"] == {"estimate_run": ESTIMATE_RUN, "n_estimate_run": 48, "n_deployed": 60}
    assert not (out / "eval_internal_test").exists()  # the deployed model trained on those cases: not scored there
    report = (out / "eval" / "report.md").read_text()
    assert "scored by the same recipe trained without it" in report and "refit_on_all" in report
    # stage 2 interrupted before it saved anything: --resume skips stage 1 (finished) and trains stage 2 again
    stage1_model = (out / ESTIMATE_RUN / "model.pt").read_bytes()
    for name in ("model.pt", "checkpoint_last.pt", "run.json", "estimate.json"):
        (out / name).unlink(missing_ok=True)
    assert main(["finetune", "--out", str(out), "--dataset", str(data), "--resume", "--quiet"]) == 0
    assert (out / ESTIMATE_RUN / "model.pt").read_bytes() == stage1_model
    again = json.loads((out / "run.json").read_text())
    assert set(_rel(again["overrides"]["train_datalist"], data)) == every
    assert json.loads((out / "estimate.json").read_text())["honest"]["n"] == 12
    # a value that is not a boolean is refused before anything is written
    with pytest.raises(Exception, match="refit_on_all must be true or false"):
        finetune_with_holdout(data, "2d_classification", tmp_path / "bad", overrides={**TINY, "refit_on_all": "yes"},
                              progress_bar=False)  # fmt: skip
    assert not (tmp_path / "bad").exists()


def test_seed_ensemble_trains_members_on_every_case_and_exports_their_mean(tmp_path, capsys):
    """seed_ensemble 2 (with refit_on_all): after the estimate's run, the other seed of the deployed recipe trains on
    every training case (RUN/seed_members/seed1/), then RUN (seed 0); export writes ONE ONNX whose output is the mean
    of the two members' probabilities; evaluate scores that ensemble; a resume retrains only an unfinished member;
    a bundle (one network) is refused; without refit_on_all it is refused before anything is written."""
    from helpers import member_mean_probabilities

    from medtune.cli import main
    from medtune.export.from_run import export_run, parity_samples
    from medtune.finetune.crossval import ensemble_runs
    from medtune.finetune.runner import build_network_for_run
    from medtune.runfolder import ESTIMATE_RUN, SEED_MEMBERS
    from medtune.runtime.model import OnnxModel

    data = tmp_path / "big"
    make_synthetic_classification(data, n_train=60, n_val=10, size=32, seed=4)
    out = tmp_path / "run"
    rec = finetune_with_holdout(data, "2d_classification", out, fraction=0.2, overrides={**TINY, "seed_ensemble": 2},
                                progress_bar=False)  # fmt: skip
    member = out / SEED_MEMBERS / "seed1"
    assert ensemble_runs(out) == [out.resolve(), member.resolve()]
    m_rec = json.loads((member / "run.json").read_text())
    every = set(_rel(load_datalist(data, "training"), data))
    assert m_rec["overrides"]["seed"] == 1 and rec["overrides"].get("seed", 0) == 0
    deployed = set(_rel(rec["overrides"]["train_datalist"], data))
    assert set(_rel(m_rec["overrides"]["train_datalist"], data)) == every == deployed
    assert (member / "model.pt").read_bytes() != (out / "model.pt").read_bytes()  # another seed, another model
    est = json.loads((out / "estimate.json").read_text())
    assert est["kind"] == "internal_test_refit" and est["refit"]["seed_ensemble"] == 2
    # export: one ONNX = mean of the members' probabilities, validated against the torch ensemble
    assert main(["export", "--run", str(out), "--out", str(tmp_path / "ens"), "--samples", "4"]) == 0
    side = json.loads((tmp_path / "ens" / "model.json").read_text())
    ens = side["ensemble"]
    assert ens["members"] == 2 and ens["kind"] == "seeds" and ens["seeds"] == [0, 1]
    assert ens["member_runs"] == [".", "seed_members/seed1"] and ens["internal_test_estimate"]["n"] == 12
    singles = [export_run(r, tmp_path / f"m{i}", n_samples=2).onnx_path for i, r in enumerate((out, member))]
    _, parser, _ = build_network_for_run(out)
    x = parity_samples(parser, 5)
    model = OnnxModel.load(tmp_path / "ens", provider="cpu")
    np.testing.assert_allclose(model.probabilities(model.predict_batch(x)), member_mean_probabilities(singles, x),
                               atol=1e-5)  # fmt: skip
    # fp16 from the same ensemble graph, checked again against PyTorch (edge boxes get ensembles too)
    assert main(["export", "--run", str(out), "--out", str(tmp_path / "ens16"), "--samples", "4", "--precision",
                 "fp16", "--max-metric-drop", "1"]) == 0  # fmt: skip
    side16 = json.loads((tmp_path / "ens16" / "model.json").read_text())
    assert side16["export"]["precision"] == "fp16" and side16["ensemble"]["members"] == 2
    capsys.readouterr()
    assert main(["evaluate", "--run", str(out)]) == 0
    assert "ensemble of 2 models (what export deploys)" in capsys.readouterr().out
    assert "seed ensemble (2 models)" in (out / "eval_validation" / "report.md").read_text()
    assert main(["export", "--run", str(out), "--out", str(tmp_path / "b"), "--format", "bundle"]) != 0
    assert "ensemble of 2 models and a bundle holds one network" in capsys.readouterr().err
    # the member stopped before it saved anything: --resume retrains it and keeps the other two runs
    kept = {p: (p / "model.pt").read_bytes() for p in (out / ESTIMATE_RUN, out)}
    shutil.rmtree(member)
    (out / "run.json").unlink()  # RUN had not started either (members train before it)
    (out / "model.pt").unlink()
    (out / "checkpoint_last.pt").unlink(missing_ok=True)
    assert main(["finetune", "--out", str(out), "--dataset", str(data), "--resume", "--quiet"]) == 0
    assert (out / ESTIMATE_RUN / "model.pt").read_bytes() == kept[out / ESTIMATE_RUN]
    assert json.loads((member / "run.json").read_text())["overrides"]["seed"] == 1 and len(ensemble_runs(out)) == 2
    # without refit_on_all (its members are the deployed recipe retrained on all cases): refused, nothing written
    with pytest.raises(Exception, match="seed_ensemble > 1 needs refit_on_all"):
        finetune_with_holdout(data, "2d_classification", tmp_path / "bad", progress_bar=False,
                              overrides={**TINY, "seed_ensemble": 2, "refit_on_all": False})  # fmt: skip
    with pytest.raises(Exception, match="seed_ensemble must be an integer >= 1"):
        finetune_with_holdout(data, "2d_classification", tmp_path / "bad", progress_bar=False,
                              overrides={**TINY, "seed_ensemble": 0})  # fmt: skip
    with pytest.raises(Exception, match="--folds K already deploys"):
        crossvalidate(data, "2d_classification", tmp_path / "bad", 2, overrides={**TINY, "seed_ensemble": 2},
                      progress_bar=False)  # fmt: skip
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------------------------------- ONNX: ensemble, TTA


def test_fold_ensemble_onnx_equals_mean_of_members(cv_dir, dataset, tmp_path):
    from helpers import member_mean_probabilities

    from medtune.export.ensemble import export_ensemble
    from medtune.export.from_run import export_run, parity_samples
    from medtune.finetune.runner import build_network_for_run
    from medtune.runtime.model import OnnxModel

    report = export_ensemble(cv_dir, tmp_path / "ens", n_samples=6)
    assert report.parity.passed and report.parity.n_samples == 12  # 6 images + their left-right flips (the runs' TTA)
    members = [export_run(cv_dir / f"fold{k}", tmp_path / f"m{k}", n_samples=4).onnx_path for k in range(3)]
    _, parser, _ = build_network_for_run(cv_dir / "fold0")
    x = parity_samples(parser, 6)
    model = OnnxModel.load(tmp_path / "ens", provider="cpu")
    got = model.probabilities(model.predict_batch(x))
    np.testing.assert_allclose(got, member_mean_probabilities(members, x), atol=1e-5)
    side = json.loads((tmp_path / "ens" / "model.json").read_text())
    assert side["ensemble"]["members"] == 3 and side["provenance"]["metrics"]["crossval_out_of_fold"]["n"] == 40
    # the runtime classifies with it like any model
    rows = model.classify([load_datalist(dataset, "testing")[0]["image"]])
    assert abs(sum(rows[0]["probabilities"].values()) - 1) < 1e-6


def test_runtime_tta_equals_manual_flip_average_and_parity_covers_flips(cv_dir, dataset, tmp_path):
    from medtune.export.from_run import export_run, parity_samples
    from medtune.finetune.runner import build_network_for_run
    from medtune.runtime.model import OnnxModel

    rep = export_run(cv_dir / "fold1", tmp_path / "tta", n_samples=5, tta_flips=[[1], [0]])
    assert rep.parity.n_samples == 15  # the gate ran the samples and both flipped copies
    side = json.loads((tmp_path / "tta" / "model.json").read_text())
    assert side["tta"] == {"flips": [[1], [0]]}
    model = OnnxModel.load(tmp_path / "tta", provider="cpu")
    _, parser, _ = build_network_for_run(cv_dir / "fold1")
    x = parity_samples(parser, 5)
    p = [model.probabilities(model.predict_batch(np.ascontiguousarray(v))) for v in (x, x[..., ::-1], x[:, :, ::-1])]
    files = [i["image"] for i in load_datalist(dataset, "validation")[:5]]
    rows = model.classify(files)
    got = np.array([[r["probabilities"][n] for n in model.labels] for r in rows])
    np.testing.assert_allclose(got, np.mean(p, axis=0), atol=1e-6)
    assert np.abs(got - p[0]).max() > 1e-6  # TTA changed something
    # a bad tta entry is a one-line error naming the sidecar
    from medtune.errors import MedTuneError
    from medtune.runtime.tta import tta_flips

    with pytest.raises(MedTuneError, match="model.json.*spatial axes in 0..1"):
        tta_flips({"tta": {"flips": [[2]]}}, 2, tmp_path / "tta" / "model.json")
    side["tta"] = {"flips": [[2]]}  # an edited sidecar is refused as a whole before its tta is even read
    (tmp_path / "tta" / "model.json").write_text(json.dumps(side))
    with pytest.raises(MedTuneError, match="model.json.*'tta' differs from the copy embedded"):
        OnnxModel.load(tmp_path / "tta", provider="cpu")


def test_volume_tta_averages_flipped_sliding_windows(tmp_path):
    from medtune.runtime.model import softmax
    from medtune.runtime.segment import load_volume_model, predict_volume
    from medtune.runtime.tta import volume_logits

    nn = torch.nn
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 3, 3, padding=1)).eval()
    onnx_path = tmp_path / "model.onnx"
    axes = {0: "b", 2: "x", 3: "y", 4: "z"}
    torch.onnx.export(
        net,
        torch.zeros(1, 1, 8, 8, 8),
        str(onnx_path),
        dynamo=False,
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": axes, "logits": axes},
    )
    side = {
        "format": "medtune.model/1",
        "task": "segmentation",
        "spatial_dims": 3,
        "channels": 1,
        "labels": {"0": "bg", "1": "a", "2": "b"},
        "preprocessing": [],
        "sliding_window": {"roi_size": [8, 8, 8], "overlap": 0.5, "mode": "gaussian"},
        "postprocessing": {"activation": "softmax", "argmax": True},
        "tta": {"flips": [[0], [1, 2]]},
        "onnx_sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
    }
    (tmp_path / "model.json").write_text(json.dumps(side))
    model = load_volume_model(tmp_path, provider="cpu")
    vol = np.random.default_rng(0).normal(size=(1, 11, 9, 10)).astype(np.float32)
    got = softmax(volume_logits(model, vol, predict_volume).astype(np.float64), axis=0)
    views = [
        softmax(predict_volume(model, vol).astype(np.float64), axis=0),
        np.flip(softmax(predict_volume(model, np.ascontiguousarray(vol[:, ::-1])).astype(np.float64), axis=0), 1),
        np.flip(softmax(predict_volume(model, np.ascontiguousarray(vol[:, :, ::-1, ::-1])), axis=0), (2, 3)),
    ]
    np.testing.assert_allclose(got, np.mean(views, axis=0), atol=1e-5)


# ---------------------------------------------------------------------------------------------- EMA


def test_ema_handler_validates_averaged_weights_and_restores_raw():
    from ignite.engine import Engine, Events

    from medtune.finetune.ema import EmaHandler

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x = torch.randn(16, 3)

    def step(engine, _):
        opt.zero_grad()
        loss = (net(x) ** 2).mean()
        loss.backward()
        opt.step()
        return loss.item()

    trainer = Engine(step)
    ema = EmaHandler(net, decay=0.5)
    ema.attach(trainer)
    manual: dict = {}
    seen = {}

    @trainer.on(Events.ITERATION_COMPLETED)
    def _manual(engine):  # AveragedModel's first update copies the weights, later ones average
        for k, v in net.state_dict().items():
            manual[k] = v.clone() if k not in manual else 0.5 * manual[k] + 0.5 * v

    @trainer.on(Events.EPOCH_COMPLETED)
    def _validate(engine):  # registered after the EMA swap-in, before its swap-back: sees EMA weights
        seen["val"] = {k: v.clone() for k, v in net.state_dict().items()}

    trainer.run([0] * 4, max_epochs=1)
    for k in manual:
        torch.testing.assert_close(seen["val"][k], manual[k])
    assert not torch.allclose(net.weight, seen["val"]["weight"])  # raw weights restored for training


def test_ema_and_strong_augmentation_config_keys_run(dataset, tmp_path):
    from medtune.finetune.runner import finetune

    rec = finetune(
        dataset,
        "2d_classification",
        tmp_path / "r",
        overrides={**TINY, "ema_decay": 0.9, "augment_extra_prob": 1.0},
        progress_bar=False,
    )
    assert rec["status"] == "completed" and rec["overrides"]["ema_decay"] == 0.9


@pytest.mark.slow  # in-process bundle runs: 11-16 s at load 6-7
def test_segmentation_crossval_pools_dice_over_every_training_case(tmp_path):
    from medtune.data.synthetic import make_synthetic_segmentation
    from medtune.evaluate.segmentation import summarise_case_dice

    make_synthetic_segmentation(tmp_path / "seg", n_train=9, n_val=3, size=32, spatial_dims=2, seed=3)
    ov = {"arch": "tiny_unet", "pretrained": "none", "epochs": 1, "num_workers": 0, "image_size": [32, 32],
          "batch_size": 4}  # fmt: skip
    rec = crossvalidate(tmp_path / "seg", "2d_segmentation", tmp_path / "cv", 3, overrides=ov, progress_bar=False,
                        n_bootstrap=100)  # fmt: skip
    pooled = json.loads((tmp_path / "cv" / "oof" / "metrics.json").read_text())
    ids = sorted(c["case"] for c in pooled["cases"])
    assert ids == [f"images/case_{i:04d}.nii.gz" for i in range(1, 10)]  # the 9 training cases, each once
    per_fold = []
    for k in range(3):
        m = json.loads((tmp_path / "cv" / f"fold{k}" / "eval_oof" / "metrics.json").read_text())
        per_fold += [c["mean_dice"] for c in m["cases"]]
    assert rec["pooled"]["estimate"]["value"] == pytest.approx(np.mean(per_fold), abs=1e-9)
    assert summarise_case_dice(pooled["cases"], n_bootstrap=0)["mean_dice"]["value"] == pytest.approx(np.mean(per_fold))
    est = json.loads((tmp_path / "cv" / "estimate.json").read_text())
    assert est["honest"]["name"] == "mean Dice" and est["honest"]["n"] == 9
    assert "## Which number to quote" in (tmp_path / "cv" / "oof" / "report.md").read_text()


@pytest.mark.slow  # 3 tiny 2D segmentation runs, 3 evaluations, one export
def test_segmentation_seed_ensemble_evaluates_what_its_export_deploys(tmp_path, capsys):
    """A segmentation seed ensemble: ``medtune evaluate`` scores the members' mean probability through the run's own
    evaluate workflow; its per-case Dice equals the Dice of the exported ONNX ensemble's masks (onnxruntime, the
    runtime's preprocessing); a one-member "ensemble" of RUN scores exactly what RUN's own evaluation does."""
    import nibabel as nib
    import onnxruntime as ort

    from medtune.cli import main
    from medtune.data.synthetic import make_synthetic_segmentation
    from medtune.evaluate.segmentation import case_mean_dice
    from medtune.export.ensemble import mean_probability_ensemble
    from medtune.finetune.runner import build_network_for_run, evaluate_run
    from medtune.runtime.preprocess import apply_preprocessing
    from medtune.runtime.readers import read_image

    data = tmp_path / "seg"
    make_synthetic_segmentation(data, n_train=26, n_val=3, size=24, spatial_dims=2, seed=5)
    ov = {"arch": "tiny_unet", "pretrained": "none", "epochs": 2, "num_workers": 0, "image_size": [24, 24],
          "batch_size": 4, "refit_on_all": True, "seed_ensemble": 2}  # fmt: skip
    out = tmp_path / "run"
    # no internal test (too few cases, or --internal-test 0): refused, not silently one model
    make_synthetic_segmentation(tmp_path / "small", n_train=10, n_val=2, size=24, spatial_dims=2, seed=5)
    with pytest.raises(MedTuneError, match="seed_ensemble 2 needs an internal test to refit after, and training "
                       "split too small"):  # fmt: skip
        finetune_with_holdout(tmp_path / "small", "2d_segmentation", out, fraction=0.2, overrides=ov)
    with pytest.raises(MedTuneError, match="keep --internal-test above 0"):
        finetune_with_holdout(data, "2d_segmentation", out, fraction=0.0, overrides=ov)
    assert not out.exists()
    finetune_with_holdout(data, "2d_segmentation", out, fraction=0.2, overrides=ov, progress_bar=False)
    capsys.readouterr()
    assert main(["evaluate", "--run", str(out)]) == 0
    assert "ensemble of 2 models (what export deploys)" in capsys.readouterr().out
    report = (out / "eval_validation" / "report.md").read_text()
    assert "seed ensemble (2 models)" in report and "mean softmax probability of the 2 seed models" in report
    ens_cases = {c["case"]: c["mean_dice"] for c in json.loads((out / "eval_validation" / "metrics.json").read_text())
                 ["cases"]}  # fmt: skip
    assert len(ens_cases) == 3
    # the injected network path equals the checkpoint path for one member
    single = {c["case"]: c["mean_dice"] for c in evaluate_run(out)["metrics"]["cases"]}
    one = evaluate_run(out, network=mean_probability_ensemble([build_network_for_run(out)[0]]),
                       eval_dir=tmp_path / "one")["metrics"]["cases"]  # fmt: skip
    assert {c["case"]: c["mean_dice"] for c in one} == pytest.approx(single, abs=1e-9)
    # what export deploys: one ONNX averaging both members, run by onnxruntime on the validation images
    assert main(["export", "--run", str(out), "--out", str(tmp_path / "ens"), "--samples", "2"]) == 0
    side = json.loads((tmp_path / "ens" / "model.json").read_text())
    assert side["ensemble"]["kind"] == "seeds" and side["ensemble"]["members"] == 2
    session = ort.InferenceSession(str(tmp_path / "ens" / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_dice = []
    for item in load_datalist(data, "validation"):  # the report names cases case_0000... in the split's order
        x = apply_preprocessing(read_image(item["image"], spatial_dims=2).array, side["preprocessing"])
        pred = session.run(None, {"image": x[None]})[0][0].argmax(0)
        onnx_dice.append(case_mean_dice(pred, np.asarray(nib.load(item["label"]).dataobj).squeeze(), [1, 2]))
    assert onnx_dice == pytest.approx([ens_cases[f"case_{i:04d}"] for i in range(3)], abs=0.02)
    assert onnx_dice != pytest.approx([single[f"case_{i:04d}"] for i in range(3)], abs=1e-4)  # not RUN alone


@pytest.mark.slow  # 3 fold runs + export + infer: 5 s at load 6-7
def test_cli_folds_export_ensemble_and_infer(dataset, tmp_path, capsys):
    from medtune.cli import main

    cv = tmp_path / "cv"
    args = ["finetune", "--dataset", str(dataset), "--out", str(cv), "--folds", "2", "--quiet"]
    args += [f"--set={k}={v!r}" for k, v in TINY.items()]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "2-fold cross-validation" in out and "honest (cross-validated, out-of-fold" in out and "Quote the" in out
    assert main(["export", "--run", str(cv), "--out", str(tmp_path / "ens"), "--samples", "4", "--tta-flips", "1"]) == 0
    side = json.loads((tmp_path / "ens" / "model.json").read_text())
    assert side["ensemble"]["members"] == 2 and side["tta"] == {"flips": [[1]]}
    assert side["export"]["parity"]["n_samples"] == 8 and side["export"]["parity"]["passed"]
    images = tmp_path / "imgs"
    images.mkdir()
    for item in load_datalist(dataset, "testing"):
        (images / Path(item["image"]).name).write_bytes(Path(item["image"]).read_bytes())
    assert main(["infer", "--model", str(tmp_path / "ens" / "model.onnx"), "--input", str(images),
                 "--out", str(tmp_path / "p.csv"), "--quiet"]) == 0  # fmt: skip
    with open(tmp_path / "p.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 8
    # int8 from the ensemble graph: calibrated on training images, checked against the PyTorch ensemble again
    assert main(["export", "--run", str(cv), "--out", str(tmp_path / "e8"), "--precision", "int8", "--samples", "4",
                 "--max-metric-drop", "1"]) == 0  # fmt: skip
    side8 = json.loads((tmp_path / "e8" / "model.json").read_text())
    assert side8["export"]["precision"] == "int8" and side8["ensemble"] == {**side["ensemble"]}
    assert side8["export"]["parity"]["passed"]


@pytest.mark.slow  # 2 fold runs + the refit run, 2 evaluations, one export
def test_folds_deploy_refit_trains_one_model_on_every_case_after_the_out_of_fold_estimate(tmp_path, capsys):
    """folds_deploy refit: the K folds give the out-of-fold estimate (over training + validation, pooled), then the
    run folder itself trains the recipe on all the training cases (validated on the validation split, as a single
    run is); export and evaluate take it as one model; a resume after the folds trains only the refit; a value
    other than ensemble / refit is refused before anything is written."""
    from MedTuneLib.finetune_logic import read_state

    from medtune.cli import main
    from medtune.export.from_run import export_run
    from medtune.finetune.crossval import ensemble_runs

    data = tmp_path / "ds"
    make_synthetic_classification(data, n_train=30, n_val=8, size=32, seed=5)
    out = tmp_path / "cv"
    args = ["finetune", "--dataset", str(data), "--out", str(out), "--folds", "2", "--quiet",
            "--set", "folds_deploy='refit'", *[f"--set={k}={v!r}" for k, v in TINY.items()]]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "model: the recipe retrained on all 30 training cases" in printed and "Quote the cross-validated" in printed
    cv = json.loads((out / "crossval.json").read_text())
    assert cv["deploy"] == "refit" and cv["status"] == "completed" and cv["refit"]["n_deployed"] == 30
    every = set(_rel(load_datalist(data, "training"), data))
    deployed = json.loads((out / "run.json").read_text())
    assert set(_rel(deployed["overrides"]["train_datalist"], data)) == every and deployed["status"] == "completed"
    for m in cv["members"]:  # the folds trained on part of training + validation (pooled), never on all of it
        assert m["n_train"] < 38
    est = json.loads((out / "estimate.json").read_text())
    assert est["kind"] == "crossval_refit" and est["honest"]["n"] == 38  # every labelled case, out of fold
    assert est["honest"]["estimate"] == cv["pooled"]["estimate"]
    val = json.loads((out / "eval" / "metrics.json").read_text())  # the deployed model on the validation split
    assert est["selection"]["n"] == 8 and est["selection"]["estimate"]["value"] == pytest.approx(val["auc"]["value"])
    assert est["selection"]["rule"] == "last" and "folds_deploy: refit" in (out / "eval" / "report.md").read_text()
    assert ensemble_runs(out) == []  # one model: export / evaluate take OUT as a run
    report = export_run(out, tmp_path / "onnx", n_samples=4)
    assert report.parity.passed
    state = read_state(out)  # the Slicer panel's view of the folder: K folds, then the refit, finished
    assert state.refit and state.fraction == 1.0 and state.text().startswith("2 folds + refit on all cases")
    assert "scored by the fold models of the same recipe" in state.estimate
    # interrupted in the refit run, before it saved anything: --resume keeps both folds and trains only the refit
    fold0 = (out / "fold0" / "model.pt").read_bytes()
    for name in ("model.pt", "checkpoint_last.pt", "run.json", "estimate.json"):
        (out / name).unlink(missing_ok=True)
    (out / "crossval.json").write_text(json.dumps({**cv, "status": "running"}))
    with pytest.raises(MedTuneError, match="refit model is not trained yet"):
        ensemble_runs(out)
    assert main(["finetune", "--out", str(out), "--resume", "--quiet"]) == 0
    assert (out / "fold0" / "model.pt").read_bytes() == fold0 and (out / "model.pt").is_file()
    assert json.loads((out / "estimate.json").read_text())["kind"] == "crossval_refit"
    with pytest.raises(MedTuneError, match="folds_deploy must be one of ensemble, refit"):
        crossvalidate(data, "2d_classification", tmp_path / "bad", 2, overrides={**TINY, "folds_deploy": "both"},
                      progress_bar=False)  # fmt: skip
    assert not (tmp_path / "bad").exists()
    (tmp_path / "used").mkdir()  # a folder holding a model: refused before any fold trains (the refit goes there)
    (tmp_path / "used" / "model.pt").write_bytes(b"x")
    with pytest.raises(MedTuneError, match="already holds a model"):
        crossvalidate(data, "2d_classification", tmp_path / "used", 2, overrides={**TINY, "folds_deploy": "refit"},
                      progress_bar=False)  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "used").iterdir()) == ["model.pt"]


def test_tampered_estimate_renders_only_known_words_and_numbers(tmp_path):
    from medtune.evaluate.report import estimates_section
    from medtune.finetune.crossval import read_estimate

    bad = {
        "format": "medtune.estimate/1", "kind": "internal_test", "quote": "$__import__('os').system('x') <b>",
        "selection": {"label": "<img src=x>", "name": "AUC", "n": 78, "estimate": {"value": 0.93, "ci_low": "@x"}},
        "honest": {"label": "evil", "name": "mean Dice", "n": "9", "estimate": {"value": 0.86}},
    }  # fmt: skip
    (tmp_path / "estimate.json").write_text(json.dumps(bad))
    text = estimates_section(read_estimate(tmp_path))
    assert "0.930" in text and "0.860" in text and "Quote the internal-test figure" in text
    for s in ("$__import__", "<img", "evil", "@x", "<b>"):
        assert s not in text
    (tmp_path / "estimate.json").write_text(json.dumps({**bad, "kind": "other"}))
    assert read_estimate(tmp_path) is None and estimates_section(None) == ""


def test_tta_run_reports_the_number_the_deployed_model_gives(dataset, tmp_path):
    """With tta_flips set, the evaluation report, the torch predictor and the exported runtime agree."""
    from medtune.evaluate import classification_metrics
    from medtune.export.from_run import export_run
    from medtune.finetune.crossval import predict_classification
    from medtune.finetune.runner import evaluate_run, finetune
    from medtune.finetune.tta import FlipInferer
    from medtune.runtime.model import OnnxModel

    run = tmp_path / "run"
    finetune(dataset, "2d_classification", run, overrides={**TINY, "tta_flips": [[1]]}, progress_bar=False)
    report_auc = evaluate_run(run)["metrics"]["auc"]["value"]
    items = load_datalist(dataset, "validation")
    y = np.array([int(i["label"]) for i in items])
    torch_p = predict_classification(run, items)  # the run's own flips
    names = ["no lesion", "lesion"]
    assert classification_metrics(y, torch_p, names, n_bootstrap=0)["auc"]["value"] == pytest.approx(report_auc)
    export_run(run, tmp_path / "model", n_samples=4)
    model = OnnxModel.load(tmp_path / "model", provider="cpu")
    assert model.tta_flips == [(1,)]
    rows = model.classify([i["image"] for i in items])
    ort_p = np.array([[r["probabilities"][n] for n in model.labels] for r in rows])
    np.testing.assert_allclose(ort_p, torch_p, atol=1e-5)
    # FlipInferer without flips is the plain network
    net = torch.nn.Conv2d(1, 2, 3, padding=1)
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(FlipInferer([])(x, net), net(x))
    both = torch.softmax(FlipInferer([[1]])(x, net), 1)
    torch.testing.assert_close(both, (torch.softmax(net(x), 1) + torch.softmax(net(x.flip(3)), 1).flip(3)) / 2)


# ---------------------------------------------------------------------------------------------- the default recipe


def test_model_selection_last_keeps_the_final_weights(dataset, tmp_path):
    """``model_selection=last``: model.pt is the last epoch's weights and its metric is the recorded one."""
    from medtune.finetune.runner import finetune
    from medtune.weights import read_checkpoint

    ov = {**TINY, "epochs": 3, "model_selection": "last", "learning_rate": 0.05}
    rec = finetune(dataset, "2d_classification", tmp_path / "r", overrides=ov, progress_bar=False)
    last = torch.load(tmp_path / "r" / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    best = read_checkpoint(tmp_path / "r" / "model.pt")
    assert rec["status"] == "completed" and rec["best_metric"]["epoch"] == 3  # the last epoch is kept
    for key, value in last["network"].items():
        torch.testing.assert_close(best[key], value)
    events = [json.loads(line) for line in (tmp_path / "r" / "progress.jsonl").read_text().splitlines()]
    metrics = [e["metric"] for e in events if e.get("event") == "epoch"]
    assert rec["best_metric"]["value"] == pytest.approx(metrics[-1])
    from medtune.errors import MedTuneError
    from medtune.finetune.runner import check_values

    with pytest.raises(MedTuneError, match="model_selection must be best or last"):
        check_values({"model_selection": "oracle"})


@pytest.mark.slow  # 3 folds; the pooled fold ensemble (the preset default) also runs in the fast set, from the CLI,
# in test_default_folds_for_small_datasets_only
def test_pooled_crossval_covers_training_and_validation_with_nothing_selected(dataset, tmp_path):
    """The preset default (fixed schedule): K folds over training + validation, each fold validated only at its
    last epoch on its own held-out fold, every labelled case predicted once, no selection figure."""
    from medtune.errors import MedTuneError
    from medtune.finetune.crossval import evaluate_ensemble, predict_classification

    out = tmp_path / "cv"
    ov = {**TINY, "epochs": 2}
    rec = crossvalidate(dataset, "2d_classification", out, 3, overrides=ov, progress_bar=False, n_bootstrap=100)
    labelled = load_datalist(dataset, "training") + load_datalist(dataset, "validation")
    assert rec["pooled_validation"] and rec["pooled"]["n"] == len(labelled) == 50
    with open(out / "oof" / "predictions.csv", newline="") as fh:
        assert sorted(r["case"] for r in csv.DictReader(fh)) == _rel(labelled, dataset)
    for k in range(3):
        run = json.loads((out / f"fold{k}" / "run.json").read_text())
        held = {c for c, f in rec["assignment"].items() if f == k}
        assert set(_rel(run["overrides"]["val_datalist"], dataset)) == held  # a monitor of the held-out fold
        trained = set(_rel(run["overrides"]["train_datalist"], dataset))
        assert run["overrides"]["val_interval"] == 2 and not held & trained
    est = json.loads((out / "estimate.json").read_text())
    assert est["selection"] is None and est["honest"]["n"] == 50
    # the fold ensemble on an external labelled split: the mean of the members' (flip-averaged) probabilities
    items = load_datalist(dataset, "testing")
    ev = evaluate_ensemble(out, split="testing")
    mean = np.mean([predict_classification(out / f"fold{k}", items) for k in range(3)], axis=0)
    from medtune.evaluate import classification_metrics

    want = classification_metrics(np.array([i["label"] for i in items]), mean, ["no lesion", "lesion"], n_bootstrap=0)
    assert ev["metrics"]["auc"]["value"] == pytest.approx(want["auc"]["value"]) and ev["metrics"]["n"] == 8
    assert "fold ensemble (3 models)" in (out / "eval_testing" / "report.md").read_text()
    assert "OPTIMISTIC" in (Path(evaluate_ensemble(out)["eval_dir"]) / "report.md").read_text()
    with pytest.raises(MedTuneError, match="model_selection=last"):
        crossvalidate(dataset, "2d_classification", tmp_path / "bad", 3, overrides={**TINY, "model_selection": "best"},
                      pool_validation=True, progress_bar=False)  # fmt: skip


def test_fold_seed_fixes_the_fold_assignment_whatever_the_training_seed(dataset, tmp_path):
    """fold_seed (benchmarks average several training seeds' OOF probabilities per case): the folds come from it,
    not from the training seed, and crossval.json records both."""
    labelled = load_datalist(dataset, "training") + load_datalist(dataset, "validation")
    assert assign_folds(labelled, 2, seed=0) != assign_folds(labelled, 2, seed=1)  # the check below can fail
    out = tmp_path / "cv"
    rec = crossvalidate(dataset, "2d_classification", out, 2, overrides={**TINY, "seed": 1}, fold_seed=0,
                        progress_bar=False, n_bootstrap=0)  # fmt: skip
    assert list(rec["assignment"].values()) == assign_folds(labelled, 2, seed=0)
    saved = json.loads((out / "crossval.json").read_text())
    assert (saved["seed"], saved["fold_seed"]) == (1, 0) and saved["assignment"] == rec["assignment"]
    run = json.loads((out / "fold0" / "run.json").read_text())
    assert run["overrides"]["seed"] == 1  # the members still train with the training seed


def test_default_folds_for_small_datasets_only(dataset, tmp_path, capsys):
    from medtune.cli import main
    from medtune.finetune.crossval import default_folds

    five = {"default_folds": 5}
    assert default_folds(dataset, "2d_classification") == 0  # the shipped preset: one run (Slicer, --resume)
    assert default_folds(dataset, "2d_classification", five) == 5  # 50 labelled images, both classes >= 5
    assert default_folds(dataset, "2d_classification", {**five, "default_folds_max_images": 20}) == 0
    assert default_folds(dataset, "2d_segmentation") == 0  # no default_folds in that preset
    tiny = tmp_path / "tiny"
    make_synthetic_classification(tiny, n_train=4, n_val=4, size=32, seed=5)
    assert default_folds(tiny, "2d_classification", five) == 0  # a class with fewer than 5 images
    # the CLI without --folds runs the fold ensemble; `medtune evaluate` on it evaluates the ensemble
    cv = tmp_path / "cv"
    args = ["finetune", "--dataset", str(dataset), "--out", str(cv), "--quiet", "--set=default_folds=2"]
    args += [f"--set={k}={v!r}" for k, v in TINY.items()]
    assert main(args) == 0 and (cv / "crossval.json").is_file() and (cv / "fold1" / "model.pt").is_file()
    assert "2-fold cross-validation" in capsys.readouterr().out
    assert main(["evaluate", "--run", str(cv), "--split", "testing"]) == 0
    printed = capsys.readouterr().out
    assert "on 8 testing cases" in printed and "ensemble of 2 models (what export deploys)" in printed
    assert (cv / "eval_testing" / "report.md").is_file()


def test_lite_head_starts_with_small_logits():
    """The classifier of the Lite builders starts at PyTorch's Linear range (MONAI's TF init gave +-0.71)."""
    import math

    from medtune.weights.architectures import build_efficientnet_lite0

    net = build_efficientnet_lite0(2, 1, 2)
    assert float(net._fc.weight.detach().abs().max()) <= 1 / math.sqrt(1280) + 1e-7
    assert float(net._fc.bias.detach().abs().max()) == 0.0
