"""Fine-tuning strategies: which parameters train, with which learning rate, and BatchNorm behaviour.

Strategies (config key ``strategy``):

- ``full``: every parameter trains;
- ``linear_probe``: only the classification head trains (backbone frozen, BatchNorm in eval mode);
- ``freeze_then_unfreeze``: linear probe for ``unfreeze_epoch`` epochs, then full fine-tuning
  (:class:`medtune.finetune.handlers.FreezeScheduleHandler` switches it);
- ``last_stages``: the head and the last ``train_stages`` backbone stages train (their BatchNorm adapts), the
  earlier stages stay frozen with fixed BatchNorm statistics: what fits a 117 M-parameter 3D encoder on a CPU.

With ``linear_probe`` the frozen backbone's features can be computed once and cached
(:mod:`medtune.finetune.feature_cache`, config key ``feature_cache``).

Independent switches: ``layer_decay`` < 1 gives layer-wise learning-rate decay (the head gets the base
rate times ``head_lr_mult``, each earlier stage ``layer_decay`` times less), ``freeze_bn_stats`` keeps the
pretrained BatchNorm running statistics fixed while the affine parameters still train.
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from typing import Any

from torch import nn

from medtune import names
from medtune.errors import MedTuneError
from medtune.weights import get_architecture

STRATEGIES = names.STRATEGIES  # the names' one owner
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise MedTuneError(f"unknown fine-tuning strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")


def is_head(name: str, head_prefixes: Sequence[str]) -> bool:
    """Whether a parameter/module name belongs to the classification head."""
    return any(name.startswith(p) for p in head_prefixes)


def set_backbone_trainable(model: nn.Module, head_prefixes: Sequence[str], trainable: bool) -> None:
    """(Un)freeze every parameter outside the head; the head always trains."""
    for name, param in model.named_parameters():
        param.requires_grad_(trainable or is_head(name, head_prefixes))
    model.medtune_backbone_frozen = not trainable  # type: ignore[assignment]  # a plain attribute on the module (torch types it Tensor | Module)


def _bn_eval_train(self: nn.Module, mode: bool = True) -> nn.Module:
    # BatchNorm whose running statistics stay fixed: always behaves as in eval mode
    return nn.Module.train(self, False)


def freeze_batchnorm_stats(model: nn.Module, frozen: bool = True, only_backbone_of: Sequence[str] = ()) -> int:
    """Keep BatchNorm layers in eval mode even when ``model.train()`` is called (running stats fixed).

    Works through ``model.train()`` (which MONAI's trainer calls every iteration) by overriding ``train`` on
    each BatchNorm instance. Returns the number of layers changed.
    """
    n = 0
    for name, module in model.named_modules():
        if isinstance(module, _BN_TYPES) and not is_head(name, only_backbone_of):
            if frozen:
                module.train = types.MethodType(_bn_eval_train, module)  # type: ignore[method-assign]  # per instance, on purpose
                module.eval()
            elif "train" in module.__dict__:
                del module.train
            n += 1
    return n


def _depth_groups(model: nn.Module, head_prefixes: Sequence[str]) -> list[list[tuple[str, nn.Parameter]]]:
    """Group backbone parameters by depth: top-level children in order, blocks of a stage list unrolled."""
    groups: list[list[tuple[str, nn.Parameter]]] = []
    order: dict[str, int] = {}
    for name, param in model.named_parameters():
        if is_head(name, head_prefixes):
            continue
        parts = name.split(".")
        # `_blocks.3.7.x` (MONAI EfficientNet) / `layer2.1.x` (ResNet) / `features.denseblock2.x` (DenseNet)
        key = ".".join(parts[:2]) if len(parts) > 2 and (parts[1].isdigit() or parts[0] == "features") else parts[0]
        if key not in order:
            order[key] = len(groups)
            groups.append([])
        groups[order[key]].append((name, param))
    return groups


def param_groups(
    model: nn.Module,
    arch: str,
    lr: float,
    layer_decay: float = 1.0,
    head_lr_mult: float = 1.0,
) -> list[dict]:
    """Optimizer parameter groups: head at ``lr * head_lr_mult``, backbone depth ``d`` of ``D`` at
    ``lr * layer_decay ** (D - d)`` (layer-wise learning-rate decay; ``layer_decay = 1`` disables it).

    Frozen parameters are included (they receive no gradient, so the optimizer skips them) so that
    unfreezing later needs no new optimizer.
    """
    head_prefixes = get_architecture(arch).head_prefixes
    head = [p for n, p in model.named_parameters() if is_head(n, head_prefixes)]
    groups = _depth_groups(model, head_prefixes)
    out: list[dict] = []
    depth = len(groups)
    for d, group in enumerate(groups):
        scale = layer_decay ** (depth - d)
        out.append({"params": [p for _, p in group], "lr": lr * scale, "name": group[0][0].rsplit(".", 1)[0]})
    out.append({"params": head, "lr": lr * head_lr_mult, "name": "head"})
    return out


def backbone_stages(model: nn.Module, arch: str) -> list[tuple[str, ...]]:
    """The backbone's stages first to last, as name-prefix tuples: the architecture's declared ``stages``, else
    its top-level children holding parameters (head excluded)."""
    spec = get_architecture(arch)
    if spec.stages:
        return [(s,) if isinstance(s, str) else tuple(s) for s in spec.stages]
    out: list[tuple[str, ...]] = []
    for name, child in model.named_children():
        prefix = name + "."
        if not is_head(prefix, spec.head_prefixes) and any(True for _ in child.parameters()):
            out.append((prefix,))
    return out


def train_last_stages(model: nn.Module, arch: str, n: int, freeze_bn_stats: bool = False) -> list[str]:
    """Freeze everything but the head and the last ``n`` stages; earlier stages keep fixed BatchNorm statistics.
    Returns the trained stages' prefixes."""
    stages = backbone_stages(model, arch)
    if not 1 <= n <= len(stages):
        raise MedTuneError(f"train_stages must be 1..{len(stages)} for {arch}, got {n}")
    head_prefixes = tuple(get_architecture(arch).head_prefixes)
    trained = tuple(p for stage in stages[-n:] for p in stage)
    for name, param in model.named_parameters():
        param.requires_grad_(is_head(name, head_prefixes) or is_head(name, trained))
    model.medtune_backbone_frozen = True  # type: ignore[assignment]  # a plain attribute on the module (torch types it Tensor | Module)
    frozen_bn = head_prefixes if freeze_bn_stats else head_prefixes + trained
    freeze_batchnorm_stats(model, frozen=True, only_backbone_of=frozen_bn)
    return list(trained)


def setup_finetuning(
    model: nn.Module,
    arch: str,
    strategy: str = "full",
    lr: float = 1e-3,
    layer_decay: float = 1.0,
    head_lr_mult: float = 1.0,
    freeze_bn_stats: bool = False,
    train_stages: int = 1,
) -> list[dict]:
    """Apply a strategy to ``model`` (freezing, BatchNorm mode) and return its optimizer parameter groups."""
    _check_strategy(strategy)
    head_prefixes = get_architecture(arch).head_prefixes
    trained: list[str] = []
    if strategy == "last_stages":
        trained = train_last_stages(model, arch, int(train_stages), freeze_bn_stats)
    else:
        set_backbone_trainable(model, head_prefixes, trainable=strategy == "full")
        # a frozen backbone must not drift through its BatchNorm statistics either
        freeze_batchnorm_stats(model, frozen=freeze_bn_stats or strategy != "full", only_backbone_of=head_prefixes)
    record: dict[str, Any] = {
        "strategy": strategy,
        "layer_decay": layer_decay,
        "head_lr_mult": head_lr_mult,
        "freeze_bn_stats": freeze_bn_stats,
    }
    if strategy == "last_stages":
        record.update(train_stages=int(train_stages), trained_stages=trained)
    model.medtune_strategy = record  # type: ignore[assignment]  # a plain attribute on the module (torch types it Tensor | Module)
    return param_groups(model, arch, lr, layer_decay, head_lr_mult)


def unfreeze(model: nn.Module, arch: str, freeze_bn_stats: bool = False) -> None:
    """End of the frozen phase of ``freeze_then_unfreeze``: the whole network trains."""
    head_prefixes = get_architecture(arch).head_prefixes
    set_backbone_trainable(model, head_prefixes, trainable=True)
    freeze_batchnorm_stats(model, frozen=freeze_bn_stats, only_backbone_of=head_prefixes)
