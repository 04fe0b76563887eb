"""The names of the files in a run folder (``RUN/``), one list for the CLI, the trainer and the Slicer module.

Torch-free: the Slicer extension and the runtime import it.
"""

from __future__ import annotations

RUN_JSON = "run.json"  # what was run: preset, overrides, dataset, status (format ``medtune.run/1``)
CHECKPOINT_LAST = "checkpoint_last.pt"  # network + optimizer + schedule + run state after the last epoch
BEST_MODEL = "model.pt"  # weights of the best validated epoch
PROGRESS = "progress.jsonl"  # the JSON-lines progress stream (docs/formats.md §2)
EVAL_DIR = "eval"  # evaluation of the validation split (other splits: ``eval_<split>``)
RUN_FILES = (RUN_JSON, CHECKPOINT_LAST, BEST_MODEL, PROGRESS)
CROSSVAL_JSON = "crossval.json"  # a ``--folds K`` run folder: K fold runs ``fold<k>/`` (format ``medtune.crossval/1``)
ESTIMATE_JSON = "estimate.json"  # the selection and the honest figure side by side (``medtune.estimate/1``)
ESTIMATE_RUN = "internal_test_run"  # refit_on_all: the run trained without the internal test (it gives the estimate)
SEED_MEMBERS = "seed_members"  # seed_ensemble > 1: the other members ``seed_members/seed<s>/`` (RUN is the first)
