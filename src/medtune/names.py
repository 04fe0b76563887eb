"""The lists of names a user chooses from, one owner each (torch-free, no imports: the Slicer extension and the
edge runtime read them too).

The CLI's choices (:mod:`medtune.cli`), the Slicer panel's combo boxes (``MedTuneLib/panel_state.py``), MedTune
Studio's lists and the code that checks a choice (presets: :mod:`medtune.finetune.runner`, strategies:
:mod:`medtune.finetune.strategies`, precisions: :mod:`medtune.export.from_run`, providers:
:mod:`medtune.runtime.providers`) all take them from here; ``tests/test_names.py`` checks that the docs list the
same names.
"""

from __future__ import annotations

#: bundle presets: ``monai_bundle/configs/<name>.json``; the name says the spatial dims and the task
PRESETS = ("2d_classification", "2d_segmentation", "3d_segmentation", "3d_classification")
#: fine-tuning strategies (bundle key ``strategy``), see :mod:`medtune.finetune.strategies`
STRATEGIES = ("full", "linear_probe", "freeze_then_unfreeze", "last_stages")
#: ``medtune export --precision``: fp32 first, then the precisions derived from a validated fp32 export
PRECISIONS = ("fp32", "fp16", "int8")
DERIVED_PRECISIONS = PRECISIONS[1:]
#: ``medtune infer --provider``: execution providers, ``auto`` first
PROVIDERS = ("auto", "cpu", "cuda", "tensorrt", "openvino")
