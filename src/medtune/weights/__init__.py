"""Pretrained weights: sources with metadata, network builders, and one call that builds and loads."""

from __future__ import annotations

import logging

from torch import nn

from medtune.errors import MedTuneError
from medtune.weights.architectures import ARCHITECTURES, get_architecture
from medtune.weights.loading import adapt_input_conv, load_with_report, read_checkpoint
from medtune.weights.report import LoadReport
from medtune.weights.sources import SOURCES, PretrainedSource, get_source, list_sources

logger = logging.getLogger("medtune.weights")

__all__ = [
    "ARCHITECTURES",
    "SOURCES",
    "LoadReport",
    "PretrainedSource",
    "adapt_input_conv",
    "create_model",
    "get_source",
    "list_sources",
    "load_with_report",
    "read_checkpoint",
]


def create_model(
    arch: str,
    pretrained: str | None = None,
    in_channels: int = 1,
    num_classes: int = 2,
    spatial_dims: int = 2,
    verbose: bool = True,
    **arch_kwargs,
) -> nn.Module:
    """Build ``arch``, load ``pretrained`` weights, adapt input channels, re-initialize the head, report.

    Like timm's ``create_model``: one call. The :class:`LoadReport` is printed (``verbose``) and kept on
    the returned module as ``model.medtune_load_report`` (``None`` when training from scratch).
    """
    spec = get_architecture(arch)
    if spatial_dims not in spec.spatial_dims:
        raise MedTuneError(f"architecture {arch} supports spatial_dims {spec.spatial_dims}, not {spatial_dims}")
    model = spec.build(spatial_dims, in_channels, num_classes, **arch_kwargs)
    source = get_source(pretrained, arch)
    report: LoadReport | None = None
    if source is not None:
        if source.arch is not None and source.arch != arch:
            raise MedTuneError(f"pretrained source {source.name} is for {source.arch}, not {arch}")
        if source.spatial_dims and spatial_dims != source.spatial_dims and source.arch is not None:
            raise MedTuneError(
                f"{source.name} holds {source.spatial_dims}D weights, the network is {spatial_dims}D "
                "(use a matching source, or an '-inflated' ImageNet source for 3D)"
            )
        report = load_with_report(
            model,
            source.state_dict(),
            source=source.name,
            head_prefixes=spec.head_prefixes,
            stem_key=spec.stem_key,
            filter_fn=source.filter_fn,
        )
        if report.n_loaded == 0:
            raise MedTuneError(f"no tensor of {source.name} fits {arch}: wrong architecture or key format?")
        if source.strict and (report.missing or report.unexpected or report.shape_mismatch):
            key, reason = report.skipped()[0]
            raise MedTuneError(
                f"{source.name} must load every tensor of {arch} but {len(report.skipped())} did not "
                f"(first: {key}: {reason})"
            )
        if verbose:
            print(report.summary())
        logger.info(report.summary())
    model.medtune_load_report = report  # type: ignore[assignment]  # a plain attribute on the module (torch types it Tensor | Module)
    model.medtune_arch = arch  # type: ignore[assignment]  # a plain attribute on the module (torch types it Tensor | Module)
    return model


# architectures and sources registered by their own modules (3D, segmentation, inflation)
from medtune.weights import astra as _astra  # noqa: E402,F401
from medtune.weights import flexunet as _flexunet  # noqa: E402,F401
from medtune.weights import inflation as _inflation  # noqa: E402,F401
from medtune.weights import zoo3d as _zoo3d  # noqa: E402,F401
