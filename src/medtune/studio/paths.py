"""Which files the browser may name: the dataset folder and the folders the user named at start, nothing else."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from medtune.errors import MedTuneError
from medtune.untrusted import inside


class PathGuard:
    """Resolves paths typed in the page; anything outside the allowed roots is refused with a one-line message.

    Relative paths are taken relative to the first root (the dataset). ``..`` components are refused outright
    (even when they would land inside a root), symlinks are resolved before the check, so a link inside the
    dataset that points elsewhere is refused too.
    """

    def __init__(self, roots: Sequence[str | Path]) -> None:
        if not roots:
            raise MedTuneError("the studio needs at least one allowed folder (the dataset)")
        self.roots = [Path(r).expanduser().resolve() for r in roots]

    def describe(self) -> str:
        return ", ".join(str(r) for r in self.roots)

    def resolve(self, text: str | Path, *, must_exist: bool = False, kind: str = "path") -> Path:
        """The absolute, symlink-free path of ``text``; a :class:`MedTuneError` when it is outside every root."""
        raw = str(text).strip()
        if not raw:
            raise MedTuneError(f"choose a {kind}")
        if "\x00" in raw:
            raise MedTuneError(f"{kind} {raw!r} holds a NUL character")
        path = Path(raw).expanduser()
        if ".." in path.parts:
            raise MedTuneError(f"refused: {raw!r} contains '..'; give a path inside {self.describe()}")
        if not path.is_absolute():
            path = self.roots[0] / path
        resolved = path.resolve()  # follows symlinks
        if not any(inside(resolved, root) for root in self.roots):
            via_link = " (through a symbolic link)" if resolved != Path(path).absolute() else ""
            raise MedTuneError(
                f"refused: {raw!r}{via_link} is outside the folders this session may use ({self.describe()}); "
                "restart `medtune studio` with --allow-root DIR to add a folder"
            )
        if must_exist and not resolved.exists():
            raise MedTuneError(f"{kind} not found", resolved)
        return resolved
