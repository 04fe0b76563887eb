"""Files MedTune is handed are data (issue 12, items 1 and 3): a MONAI config expression in run.json, a datalist,
dataset.json, a model sidecar or a bundle's metadata is refused with one line naming the file and the key, and
never runs; an edited sidecar is refused before any prediction. Real run folders, models and commands; plus a
Hypothesis pass over dataset and sidecar JSON fields (one-line errors, nothing written)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from medtune.errors import MedTuneError


def _files(root: Path) -> dict[str, tuple[int, int]]:
    """Every file below ``root`` with (size, mtime_ns): to show that nothing was written."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err[-2000:]
    return lines[0]


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _pwned(tmp_path: Path) -> tuple[Path, str]:
    marker = tmp_path / "PWNED"
    return marker, f"$__import__('os').system('touch {marker}') and 'tiny_cnn' or 'tiny_cnn'"


# -- run.json ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["evaluate", "export", "resume"])
def test_expression_in_run_json_never_runs(trained_run, tmp_path, cli, command):
    _, run0, _ = trained_run
    run = tmp_path / "run"
    shutil.copytree(run0, run)
    marker, payload = _pwned(tmp_path)
    _edit_json(run / "run.json", lambda d: d["overrides"].update(arch=payload))
    before = _files(run)
    args = {
        "evaluate": ["evaluate", "--run", run],
        "export": ["export", "--run", run, "--out", tmp_path / "model"],
        "resume": ["finetune", "--resume", "--out", run, "--quiet"],
    }[command]
    code, _, err = cli(*args)
    line = _one_error_line(err)
    assert code == 1 and "run.json" in line and "overrides.arch" in line and "expression" in line
    assert not marker.exists() and _files(run) == before and not (tmp_path / "model").exists()


@pytest.mark.parametrize("command", ["evaluate", "export", "bundle"])
def test_users_own_set_replaces_a_recorded_expression(trained_run, tmp_path, cli, command):
    """A run trained with ``--set 'learning_rate=$...'`` records that expression: evaluate/export refuse it from
    the file, but the user's own ``--set`` on those commands replaces it (and may itself be an expression); every
    key the user does not set is still read from run.json as data."""
    _, run0, _ = trained_run
    run = tmp_path / "run"
    shutil.copytree(run0, run)
    _edit_json(run / "run.json", lambda d: d["overrides"].update(learning_rate="$0.001 * 2"))
    args = {
        "evaluate": ["evaluate", "--run", run],
        "export": ["export", "--run", run, "--out", tmp_path / "model", "--samples", "2"],
        "bundle": ["export", "--run", run, "--format", "bundle", "--out", tmp_path / "bundle", "--samples", "2"],
    }[command]
    code, _, err = cli(*args)
    assert code == 1 and "overrides.learning_rate" in _one_error_line(err) and "expression" in err
    extra = ["--set", "tta_flips=[[0], [1]]"] if command == "export" else []
    code, out, err = cli(*args, "--set", "learning_rate=$0.001 * 2", *extra)
    assert code == 0, err[-2000:]
    if command == "evaluate":
        assert (run / "eval" / "metrics.json").is_file()
    elif command == "export":  # the user's keys reach the config: the sidecar holds their test-time flips
        assert json.loads((tmp_path / "model" / "model.json").read_text())["tta"]["flips"] == [[0], [1]]
    else:
        assert (tmp_path / "bundle" / "configs" / "inference.json").is_file()
    marker, payload = _pwned(tmp_path)  # a key the user does not set is still refused from the file
    _edit_json(run / "run.json", lambda d: d["overrides"].update(arch=payload))
    code, _, err = cli(*args, "--set", "learning_rate=0.002")
    assert code == 1 and "overrides.arch" in _one_error_line(err) and not marker.exists()
    code, _, err = cli(*args, "--set", "learning_rate=-1")  # the user's values get the CLI's number checks
    assert code == 1 and "learning_rate" in _one_error_line(err)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("@dataset_dir", "reference"),
        ("%/etc/passwd#root", "macro"),
        ({"_target_": "os.system", "command": "touch PWNED"}, "'_target_'"),
        ([1, "$print(1)"], "expression"),
    ],
)
def test_other_config_syntax_in_run_json_is_refused(trained_run, tmp_path, cli, value, expected):
    _, run0, _ = trained_run
    run = tmp_path / "run"
    shutil.copytree(run0, run)
    _edit_json(run / "run.json", lambda d: d["overrides"].update(arch=value))
    code, _, err = cli("evaluate", "--run", run)
    line = _one_error_line(err)
    assert code == 1 and "run.json" in line and "overrides.arch" in line and expected in line


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda d: d["overrides"].update(logging_file="/tmp/x.conf"), "overrides.logging_file: not a config key"),
        (lambda d: d["overrides"].update(epochs="10"), "overrides.epochs = '10' has the wrong type"),
        (lambda d: d["overrides"].update(epochs=0), "overrides.epochs must be an integer >= 1"),
        (lambda d: d["overrides"].update(learning_rate=float("nan")), "learning_rate must be a finite number"),
        (lambda d: d.pop("overrides"), "no 'overrides' entry"),
        (lambda d: d.update(overrides=[1, 2]), "'overrides' must be a JSON object"),
        (lambda d: d.update(preset="../../etc"), "key 'preset'"),
    ],
)
def test_bad_run_json_is_one_line_for_export(trained_run, tmp_path, cli, edit, expected):
    _, run0, _ = trained_run
    run = tmp_path / "run"
    shutil.copytree(run0, run)
    _edit_json(run / "run.json", edit)
    code, _, err = cli("export", "--run", run, "--out", tmp_path / "model")
    line = _one_error_line(err)
    assert code == 1 and "run.json" in line and expected in line, line
    assert not (tmp_path / "model").exists()


def test_users_own_set_may_use_an_expression(tiny_dataset, tmp_path):
    """Only the command line may use ``$``: the user's ``--set`` is evaluated; the same value read back from
    run.json is refused."""
    from medtune.finetune.runner import finetune, read_run

    marker = tmp_path / "mine"
    ov = {"arch": "tiny_cnn", "pretrained": "none", "epochs": 1, "batch_size": 8, "num_workers": 0,
          "image_size": [32, 32], "seed": f"$int(open({str(marker)!r}, 'w').write('x') and 0)"}  # fmt: skip
    finetune(tiny_dataset, "2d_classification", tmp_path / "run", overrides=ov)
    assert marker.read_text() == "x"
    with pytest.raises(MedTuneError, match=r"overrides\.seed .* is an expression"):
        read_run(tmp_path / "run")
    # resuming, the user gives the expression again on the command line: the file's copy is not used
    marker.unlink()
    rec = finetune(tiny_dataset, "2d_classification", tmp_path / "run", resume=True, overrides={**ov, "epochs": 2})
    assert rec["status"] == "completed" and marker.read_text() == "x"


# -- dataset files -------------------------------------------------------------------------------------------


def test_expression_in_datalist_is_refused(tiny_dataset, tmp_path, cli):
    ds = tmp_path / "ds"
    shutil.copytree(tiny_dataset, ds)
    marker, payload = _pwned(tmp_path)
    _edit_json(ds / "datalist.json", lambda d: d["training"][2].update(image=payload))
    code, _, err = cli("finetune", "--dataset", ds, "--out", tmp_path / "run", "--quiet")
    line = _one_error_line(err)
    assert code == 1 and "datalist.json" in line and "training[2].image" in line and not marker.exists()
    assert not (tmp_path / "run").exists()


def test_expression_in_dataset_json_is_refused(tiny_dataset, tmp_path, cli):
    ds = tmp_path / "ds"
    shutil.copytree(tiny_dataset, ds)
    marker, payload = _pwned(tmp_path)
    _edit_json(ds / "dataset.json", lambda d: d.update(name=payload))
    code, _, err = cli("finetune", "--dataset", ds, "--out", tmp_path / "run", "--quiet")
    line = _one_error_line(err)
    assert code == 1 and "dataset.json" in line and "name" in line and "expression" in line
    assert not marker.exists() and not (tmp_path / "run").exists()


# -- model sidecar -------------------------------------------------------------------------------------------


def _copy_model(trained_run, tmp_path: Path) -> Path:
    model = tmp_path / "model"
    shutil.copytree(trained_run[2], model)
    return model


def test_expression_in_sidecar_is_refused(trained_run, tmp_path, cli):
    model = _copy_model(trained_run, tmp_path)
    _edit_json(model / "model.json", lambda d: d["labels"].update({"1": "$__import__('os').getcwd()"}))
    code, _, err = cli("infer", "--model", model, "--input", trained_run[0] / "images", "--out", tmp_path / "p.csv")
    line = _one_error_line(err)
    assert code == 1 and "model.json" in line and "labels.1" in line and not (tmp_path / "p.csv").exists()


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda d: d.update(labels={"0": d["labels"]["1"], "1": d["labels"]["0"]}), "labels"),  # swapped
        (lambda d: d["preprocessing"][-1].update(mean=[0.4]), "preprocessing"),  # shifted normalisation
        (lambda d: d.update(task="classification", note="added"), "note"),
    ],
)
def test_edited_sidecar_is_refused_before_any_prediction(trained_run, tmp_path, cli, edit, key):
    model = _copy_model(trained_run, tmp_path)
    _edit_json(model / "model.json", edit)  # onnx_sha256 still matches: only the embedded copy can tell
    code, _, err = cli("infer", "--model", model, "--input", trained_run[0] / "images", "--out", tmp_path / "p.csv")
    line = next(ln for ln in err.splitlines() if "error" in ln)
    assert code == 1 and "model.json" in line and f"key {key!r} differs" in line
    assert not (tmp_path / "p.csv").exists() and not list(tmp_path.glob(".p.csv*"))


def test_unedited_model_is_verified(trained_run):
    from medtune.runtime.model import OnnxModel

    model = OnnxModel.load(trained_run[2], provider="cpu")
    assert model.sidecar_verified and model.labels == ["no lesion", "lesion"]


# -- a bundle handed to MedTune -----------------------------------------------------------------------------


def test_bundle_metadata_is_data_and_its_configs_never_run(tmp_path):
    torch = pytest.importorskip("torch")
    from medtune.weights.zoo3d import zoo_source

    marker, payload = _pwned(tmp_path)
    bundle = tmp_path / "bundle"
    (bundle / "models").mkdir(parents=True)
    (bundle / "configs").mkdir()
    torch.save({"w": torch.zeros(2)}, bundle / "models" / "model.pt")
    (bundle / "configs" / "inference.json").write_text(json.dumps({"network_def": payload, "x": payload}))
    (bundle / "configs" / "metadata.json").write_text(json.dumps({"version": "1.0", "name": payload}))
    with pytest.raises(MedTuneError) as err:
        zoo_source(bundle, arch="tiny_cnn")
    text = str(err.value)
    assert "metadata.json" in text and "'name'" in text.replace("name =", "'name'") and "\n" not in text
    (bundle / "configs" / "metadata.json").write_text(json.dumps({"version": "1.0", "name": "ok"}))
    zoo_source(bundle, arch="tiny_cnn")  # inference.json is never parsed
    assert not marker.exists()


def test_malicious_pickle_is_refused_with_torchs_reason(tmp_path):
    torch = pytest.importorskip("torch")
    import os

    from medtune.weights import read_checkpoint

    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"w": torch.zeros(1), "evil": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(MedTuneError) as err:
        read_checkpoint(tmp_path / "evil.pt")
    text = str(err.value)
    assert "evil.pt" in text and "GLOBAL" in text and "system" in text and "weights_only=True" in text
    assert "\n" not in text and not marker.exists()


# -- property-style pass: random field values --------------------------------------------------------------

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=True) | st.text(max_size=12)
    | st.sampled_from(["$1", "@x", "%a#b", "images/../../x.png", "/etc/passwd", "", "é\u0000"]),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
    max_leaves=6,
)  # fmt: skip
DATASET_KEYS = ["format", "name", "task", "spatial_dims", "channels", "labels", "modality", "description",
                "synthetic", "positive_label", "license", "extra"]  # fmt: skip
SIDECAR_KEYS = ["format", "task", "labels", "channels", "spatial_dims", "preprocessing", "postprocessing",
                "input", "output", "onnx_sha256", "provenance", "extra"]  # fmt: skip
FAST = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))


def _assert_one_line(exc: MedTuneError, name: str) -> None:
    text = str(exc)
    assert "\n" not in text and name in text, text


@pytest.fixture(scope="module")
def fuzz_dataset(tiny_dataset, tmp_path_factory) -> Path:
    ds = tmp_path_factory.mktemp("fuzz") / "ds"
    shutil.copytree(tiny_dataset, ds)
    return ds


@FAST
@given(key=st.sampled_from(DATASET_KEYS), value=JSON_VALUES)
def test_dataset_json_fields_give_one_line_errors_and_no_writes(fuzz_dataset, key, value):
    from medtune.data import read_dataset_json, validate_dataset

    path = fuzz_dataset / "dataset.json"
    original = path.read_text()
    try:
        _edit_json(path, lambda d: d.update({key: value}))
        before = _files(fuzz_dataset)
        try:
            read_dataset_json(fuzz_dataset)
            validate_dataset(fuzz_dataset, check_images=False)
        except MedTuneError as exc:
            _assert_one_line(exc, "ds")
        assert _files(fuzz_dataset) == before
    finally:
        path.write_text(original)


@FAST
@given(split=st.sampled_from(["training", "validation"]), index=st.integers(0, 3),
       key=st.sampled_from(["image", "label", "fold"]), value=JSON_VALUES)  # fmt: skip
def test_datalist_fields_give_one_line_errors_and_no_writes(fuzz_dataset, split, index, key, value):
    from medtune.data import validate_dataset

    path = fuzz_dataset / "datalist.json"
    original = path.read_text()
    try:
        _edit_json(path, lambda d: d[split][index].update({key: value}))
        before = _files(fuzz_dataset)
        try:
            validate_dataset(fuzz_dataset, check_images=False)
        except MedTuneError as exc:
            _assert_one_line(exc, "ds")
            if isinstance(value, str) and value.startswith(("$", "@", "%")) and key == "image":
                assert "datalist.json" in str(exc)
        assert _files(fuzz_dataset) == before
    finally:
        path.write_text(original)


@pytest.fixture(scope="module")
def fuzz_model(trained_run, tmp_path_factory) -> Path:
    model = tmp_path_factory.mktemp("fuzzmodel") / "model"
    shutil.copytree(trained_run[2], model)
    return model


@FAST
@given(key=st.sampled_from(SIDECAR_KEYS), value=JSON_VALUES)
def test_sidecar_fields_give_one_line_errors_and_no_writes(fuzz_model, key, value):
    from medtune.runtime.model import OnnxModel

    path = fuzz_model / "model.json"
    original = path.read_text()
    try:
        _edit_json(path, lambda d: d.update({key: value}))
        before = _files(fuzz_model)
        unchanged = json.loads(path.read_text()) == json.loads(original)
        try:
            OnnxModel.load(fuzz_model, provider="cpu")
            assert unchanged, "an edited sidecar was accepted"
        except MedTuneError as exc:
            _assert_one_line(exc, "model")
        assert _files(fuzz_model) == before
    finally:
        path.write_text(original)


@FAST
@given(key=st.sampled_from(["arch", "epochs", "learning_rate", "image_size", "device", "nope", "train#dataloader"]),
       value=JSON_VALUES)  # fmt: skip
def test_run_json_overrides_give_one_line_errors(trained_run, tmp_path_factory, key, value):
    from medtune.finetune.runner import read_run

    run = tmp_path_factory.mktemp("fuzzrun")
    rec = json.loads((trained_run[1] / "run.json").read_text())
    rec["overrides"][key] = value
    (run / "run.json").write_text(json.dumps(rec))
    try:
        read_run(run)
    except MedTuneError as exc:
        _assert_one_line(exc, "run.json")
    else:  # accepted: a plain value of the key's type, never config syntax
        assert not (isinstance(value, str) and value.startswith(("$", "@", "%")))
