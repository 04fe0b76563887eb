"""The load report: what a pretrained load matched, skipped (and why), adapted and re-initialized."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class LoadReport:
    """Outcome of loading a pretrained state dict into a network."""

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the network, absent from the checkpoint
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, absent from the network
    shape_mismatch: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)  # e.g. stem conv 3->1 channels
    reinitialized_head: list[str] = field(default_factory=list)
    remapped: int = 0  # number of checkpoint keys renamed by the source's key map

    @property
    def n_loaded(self) -> int:
        return len(self.loaded)

    def skipped(self) -> list[tuple[str, str]]:
        """Every network/checkpoint key not loaded, with its reason."""
        out = [(k, "missing in checkpoint") for k in self.missing]
        out += [(k, "unexpected (not in network)") for k in self.unexpected]
        out += [(k, f"shape {tuple(c)} in checkpoint vs {tuple(n)} in network") for k, c, n in self.shape_mismatch]
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["n_loaded"] = self.n_loaded
        d["skipped"] = [{"key": k, "reason": r} for k, r in self.skipped()]
        return d

    def summary(self, max_items: int = 6) -> str:
        """A short human-readable summary (printed on every load)."""
        lines = [
            f"pretrained load from {self.source}: {self.n_loaded} tensors loaded"
            + (f" ({self.remapped} keys remapped)" if self.remapped else ""),
        ]
        for text in self.adapted:
            lines.append(f"  adapted: {text}")
        if self.reinitialized_head:
            head = self.reinitialized_head
            shown = ", ".join(head[:max_items]) + (f" ... ({len(head)} tensors)" if len(head) > max_items else "")
            lines.append(f"  re-initialized head: {shown}")
        skipped = self.skipped()
        if skipped:
            lines.append(f"  skipped {len(skipped)}:")
            for key, reason in skipped[:max_items]:
                lines.append(f"    {key}: {reason}")
            if len(skipped) > max_items:
                lines.append(f"    ... and {len(skipped) - max_items} more")
        return "\n".join(lines)
