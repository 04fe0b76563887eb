"""A study's plan: which arms (source x strategy x label budget x seed) run, with which overrides.

Every arm runs the same preset, epochs, optimizer, validation split and common overrides; an arm differs only by
its initialisation (``pretrained``), the network that source needs (``arch``), the strategy, and the labeled
subset (``label_fraction`` + ``seed``: arms of one budget and seed train on the very same cases).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from medtune.errors import MedTuneError

SCRATCH = "scratch"
_ALIAS = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class ArmSpec:
    """One source line of the study: ``[ALIAS=]SOURCE[:STRATEGY]``."""

    alias: str
    source: str  # "scratch" or a pretrained spec
    strategy: str
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Budget:
    """A label budget: a fraction of the training labels (``10%``) or a number of cases (``16``)."""

    text: str
    fraction: float

    @property
    def tag(self) -> str:
        return re.sub(r"[^0-9A-Za-z]+", "", self.text.replace("%", "pct")) or "all"


@dataclass(frozen=True)
class Run:
    """One training run of the study."""

    arm: ArmSpec
    budget: Budget
    seed: int
    fold: int | None = None  # ``--folds K``: the held-out fold of this run

    @property
    def key(self) -> str:
        key = f"{self.arm.alias}/{self.budget.tag}/seed{self.seed}"
        return key if self.fold is None else f"{key}/fold{self.fold}"

    def to_dict(self) -> dict[str, Any]:
        return {"arm": asdict(self.arm), "budget": asdict(self.budget), "seed": self.seed, "fold": self.fold,
                "key": self.key}  # fmt: skip


def parse_sources(text: str, default_strategy: str, scratch_strategy: str = "full") -> list[ArmSpec]:
    """``scratch,astra-ct-resnet152:linear_probe,ct64=astra-ct-resnet152`` -> arm specs (aliases unique)."""
    from medtune.finetune.strategies import STRATEGIES

    arms: list[ArmSpec] = []
    for item in [t.strip() for t in text.split(",") if t.strip()]:
        alias, _, rest = item.partition("=") if "=" in item.split(":", 1)[0] else ("", "", item)
        source, strategy = rest, ""
        if ":" in rest and rest.rsplit(":", 1)[1] in STRATEGIES:  # SOURCE:STRATEGY (local:PATH stays whole)
            source, strategy = rest.rsplit(":", 1)
        strategy = strategy or (scratch_strategy if source == SCRATCH else default_strategy)
        alias = alias or source
        if not _ALIAS.match(alias):
            raise MedTuneError(f"--sources {item!r}: name {alias!r} must be letters, digits, '_', '-', '.' (use NAME=)")
        if any(a.alias == alias for a in arms):
            raise MedTuneError(f"--sources: {alias!r} appears twice (give one of them a name: NAME=SOURCE)")
        arms.append(ArmSpec(alias, source, strategy))
    if not arms:
        raise MedTuneError("--sources is empty")
    return arms


def parse_budgets(text: str, n_train: int) -> list[Budget]:
    """``10%,25%,100%`` or case counts ``8,16,32`` (of ``n_train`` training cases) -> budgets, ascending."""
    budgets: list[Budget] = []
    for item in [t.strip() for t in text.split(",") if t.strip()]:
        try:
            if item.endswith("%"):
                frac = float(item[:-1]) / 100.0
            else:
                count = int(item)
                if count < 1 or count > n_train:
                    raise ValueError
                frac = count / n_train
        except ValueError:
            raise MedTuneError(
                f"--labels {item!r}: give a percentage (10%) or a number of cases (1..{n_train})"
            ) from None
        if not 0.0 < frac <= 1.0:
            raise MedTuneError(f"--labels {item!r}: must be in (0%, 100%]")
        budgets.append(Budget(item, min(frac, 1.0)))
    if len({b.tag for b in budgets}) != len(budgets):
        raise MedTuneError("--labels lists a budget twice")
    return sorted(budgets, key=lambda b: b.fraction)


def parse_arm_sets(pairs: list[str] | None, arms: list[ArmSpec]) -> list[ArmSpec]:
    """``ALIAS:KEY=VALUE`` overrides for one arm (values as Python literals, else strings; never evaluated)."""
    import ast

    extra: dict[str, dict[str, Any]] = {a.alias: {} for a in arms}
    for pair in pairs or []:
        alias, _, kv = pair.partition(":")
        if alias not in extra or "=" not in kv:
            raise MedTuneError(f"--arm-set {pair!r}: expected ARM:KEY=VALUE with ARM one of {', '.join(extra)}")
        key, value = kv.split("=", 1)
        try:
            extra[alias][key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            extra[alias][key.strip()] = value
    return [ArmSpec(a.alias, a.source, a.strategy, {**a.overrides, **extra[a.alias]}) for a in arms]


def plan_runs(arms: list[ArmSpec], budgets: list[Budget], seeds: int, folds: int = 0) -> list[Run]:
    """Every run, smallest budget first (its results come first), then seed, (fold,) then arm."""
    if seeds < 1:
        raise MedTuneError(f"--seeds must be >= 1, got {seeds}")
    if folds:
        return [Run(arm, b, s, k) for b in budgets for s in range(seeds) for k in range(folds) for arm in arms]
    return [Run(arm, b, s) for b in budgets for s in range(seeds) for arm in arms]
