"""The source bundle's docs and metadata say what the configs hold: every config key is in the key table (and
nothing else), the metadata names MONAI's published schema and covers 2D and 3D."""

from __future__ import annotations

import json
import re
from pathlib import Path

from medtune.export.bundle import MONAI_META_SCHEMA_URL

BUNDLE = Path(__file__).resolve().parents[1] / "monai_bundle"


def _config_keys() -> dict[str, set[str]]:
    keys: dict[str, set[str]] = {}
    for path in sorted((BUNDLE / "configs").glob("*.json")):
        if path.name != "metadata.json":
            for key in json.loads(path.read_text()):
                keys.setdefault(key, set()).add(path.stem)
    return keys


def _documented() -> dict[str, str]:
    text = (BUNDLE / "docs" / "README.md").read_text()
    table = text[text.index("## Keys") :]
    rows = re.findall(r"^\| `([^`]+)` \| ([^|]*) \|", table, flags=re.M)
    return dict(rows)


def test_key_table_lists_every_config_key_and_its_files():
    keys, documented = _config_keys(), _documented()
    missing = sorted(set(keys) - set(documented))
    stale = sorted(set(documented) - set(keys))
    assert not missing, f"config keys missing from monai_bundle/docs/README.md's key table: {missing}"
    assert not stale, f"keys in the table that no config holds: {stale}"
    for key, files in keys.items():
        named = {cell.split(":")[0].strip() for cell in documented[key].split(";")}
        assert named == files, f"{key}: the table names {sorted(named)}, the key is in {sorted(files)}"


def test_metadata_names_the_published_schema_and_covers_2d_and_3d():
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    assert meta["schema"] == MONAI_META_SCHEMA_URL
    assert meta["version"] in meta["changelog"]
    for text in (meta["task"], meta["data_type"]):
        assert "2D" in text and "3D" in text, text
    readme = (BUNDLE / "docs" / "README.md").read_text()
    assert "2D and 3D" in readme
