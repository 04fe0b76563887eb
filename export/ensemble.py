"""Ensembles exported as ONE ONNX model: the K fold models of a cross-validation (``medtune finetune --folds K``) or
the N seeds of a ``seed_ensemble`` run (the deployed recipe retrained on all the cases with N seeds).

Decision: one ONNX graph that averages the K members, not a sidecar listing K files for the runtime to average.

- Every consumer (``medtune infer``, the Slicer module, Studio, edge boxes, TensorRT/OpenVINO providers) already
  runs one ``model.onnx`` + ``model.json``: nothing in them changes, one sha256 covers the whole ensemble, and a
  copied model folder cannot lose a member.
- The parity gate checks exactly what is deployed: the ensemble graph against the PyTorch ensemble on real
  images (and their TTA flips), with the same tolerance as a single model.
- onnxruntime runs the members inside one session (one thread pool, one memory arena, graph optimizations
  across members); K separate sessions would each hold their own.
- Cost: the file is K times one member (5 x 13 MB for EfficientNet-Lite0), as K files would be.

The graph outputs ``log(mean_k softmax(z_k))`` (computed as ``logsumexp_k(log_softmax(z_k)) - log K``), so the
sidecar keeps ``activation: softmax``: the runtime's softmax of the output is exactly the mean of the members'
probabilities, for classification (over classes) and segmentation (over the channel axis of every voxel).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from medtune.errors import MedTuneError

from .onnx_export import ExportReport
from .optimize import PrecisionReport


def mean_probability_ensemble(members: list[Any]) -> Any:
    """A torch module whose output is ``log`` of the members' mean softmax probability (channel axis 1)."""
    import torch
    from torch import nn

    if not members:
        raise MedTuneError("an ensemble needs at least one member")

    class MeanProbabilityEnsemble(nn.Module):
        def __init__(self, nets: list[nn.Module]):
            super().__init__()
            self.members = nn.ModuleList(nets)
            self.log_k = math.log(len(nets))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            logp = torch.stack([torch.log_softmax(m(x), dim=1) for m in self.members])
            return torch.logsumexp(logp, dim=0) - self.log_k

    return MeanProbabilityEnsemble(members).eval()


def export_ensemble(
    crossval_dir: str | Path,
    out: str | Path,
    n_samples: int = 16,
    tta_flips: list[list[int]] | None = None,
    precision: str = "fp32",
    max_metric_drop: float | None = None,
) -> ExportReport | PrecisionReport:
    """Export the members of ``crossval_dir`` (a ``--folds K`` folder or a ``seed_ensemble`` run) as one validated
    ONNX ensemble into ``out`` (fp32; fp16/int8 are derived from it and checked again, as for one run).

    The sidecar is the first member's (labels, preprocessing, sliding window) plus ``ensemble`` (members, rule,
    kind, the folder's honest estimate). Parity samples are real validation images of the first member's dataset.
    """
    from medtune.finetune.crossval import ensemble_runs, read_estimate
    from medtune.finetune.runner import build_network_for_run

    from .from_run import build_sidecar, export_network, tta_field

    crossval_dir = Path(crossval_dir).resolve()
    runs = ensemble_runs(crossval_dir)
    if not runs:
        raise MedTuneError("not an ensemble: no fold runs (crossval.json) and no seed members", crossval_dir)
    folds = (crossval_dir / "crossval.json").is_file()
    nets = []
    built = [build_network_for_run(run) for run in runs]
    parser, rec = built[0][1], built[0][2]
    for run, (net, p, r) in zip(runs, built, strict=True):
        nets.append(net)
        if r.get("preset") != rec.get("preset") or p.get_parsed_content("arch") != parser.get_parsed_content("arch"):
            raise MedTuneError("member runs differ in preset or architecture; cannot ensemble them", run)
    sidecar = build_sidecar(parser, rec, runs[0])
    if tta_flips is not None:
        sidecar.pop("tta", None)
        sidecar.update(tta_field(tta_flips))
    estimate = read_estimate(crossval_dir)
    sidecar["ensemble"] = {
        "members": len(nets),
        "rule": "mean of member softmax probabilities (graph output = log of the mean; runtime softmax recovers it)",
        "kind": "folds" if folds else "seeds",
        "member_runs": [r.relative_to(crossval_dir).as_posix() if r != crossval_dir else "." for r in runs],
    }
    prov = sidecar.setdefault("provenance", {})
    if folds:
        sidecar["ensemble"]["crossval_estimate"] = (estimate or {}).get("honest")
        prov["metrics"] = {"crossval_out_of_fold": (estimate or {}).get("honest")}
    else:  # the single-seed recipe's internal-test figure: the ensemble of its seeds does as well or better
        sidecar["ensemble"]["seeds"] = [int(p.get_parsed_content("seed")) for _, p, _ in built]
        sidecar["ensemble"]["internal_test_estimate"] = (estimate or {}).get("honest")
    prov["best_validation"] = [json.loads((r / "run.json").read_text()).get("best_metric") for r in runs]
    return export_network(mean_probability_ensemble(nets), parser, sidecar, out, precision, n_samples, max_metric_drop)
