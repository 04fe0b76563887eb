"""Every ``# type: ignore`` in the type-checked code names its error code and says why on the same line
(``# type: ignore[code]  # reason``); mypy's ``warn_unused_ignores`` (pyproject) makes sure each is still needed."""

from __future__ import annotations

import re

import pytest
from helpers import REPO

tomllib = pytest.importorskip("tomllib", reason="Python < 3.11 has no tomllib")

IGNORE = re.compile(r"#\s*type:\s*ignore\b(?P<rest>.*)$")
EXPLAINED = re.compile(r"^\[[a-z-]+(,[a-z-]+)*\]\s+#\s*\S.{3,}")


def test_every_type_ignore_names_its_code_and_says_why() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["mypy"]
    assert config["warn_unused_ignores"] is True
    files = [p for root in config["files"] for p in sorted((REPO / root).rglob("*.py"))]
    assert len(files) > 50  # the package, the exporters and MedTuneLib
    bad, seen = [], 0
    for path in files:
        for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            m = IGNORE.search(line)
            if m:
                seen += 1
                if not EXPLAINED.match(m.group("rest").strip()):
                    bad.append(f"{path.relative_to(REPO)}:{no}: {line.strip()}")
    assert seen and not bad, "\n".join(bad)
