"""docs/formats.md against what the code writes: the model sidecar example (§4), the progress stream's event
table (§2) and the run folder / ``run.json`` keys (§3), compared with a real fine-tune + export (``trained_run``)."""

from __future__ import annotations

import json
import re
from typing import Any

from helpers import REPO

from medtune.finetune.progress import read_progress
from medtune.runfolder import RUN_FILES, RUN_JSON

FORMATS = (REPO / "docs" / "formats.md").read_text(encoding="utf-8")
ELIDED = "..."  # in the examples, a key "..." marks an object that lists only some of its keys


def _section(number: int) -> str:
    start = FORMATS.index(f"\n## {number}. ")
    end = FORMATS.find("\n## ", start + 1)
    return FORMATS[start : end if end > 0 else None]


def _json_blocks(text: str) -> list[Any]:
    return [json.loads(block) for block in re.findall(r"```json\n(.*?)```", text, flags=re.S)]


def _paths(value: Any, prefix: str = "", skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """``{"a.b": value}`` for every key path below ``value`` (lists and keys named in ``skip`` are leaves)."""
    out: dict[str, Any] = {}
    if isinstance(value, dict) and prefix.rpartition(".")[2] not in skip:
        for key, sub in value.items():
            path = f"{prefix}.{key}" if prefix else key
            out[path] = sub
            out.update(_paths(sub, path, skip))
    return out


def test_sidecar_example_has_the_keys_the_export_writes(trained_run):
    _, _, model_dir = trained_run
    written = json.loads((model_dir / "model.json").read_text(encoding="utf-8"))
    (example,) = [b for b in _json_blocks(_section(4)) if b.get("format") == "medtune.model/1"]
    skip = ("labels", "class_counts")  # data (class value -> name / count), not keys
    doc, real = _paths(example, skip=skip), _paths(written, skip=skip)

    documented = {p for p in doc if not p.endswith(ELIDED)}
    if written["provenance"]["metrics"] == {}:  # §4: "{} until `medtune evaluate` has run" (this run: not yet)
        documented = {p for p in documented if not p.startswith("provenance.metrics.")}
    if "tta" not in written:  # §4: `"tta"` (optional) is written only when test-time flips are set (default: off)
        documented = {p for p in documented if p.split(".")[0] != "tta"}
    assert documented - set(real) == set(), "docs/formats.md §4 shows keys the export does not write"
    closed = [""] + [
        p for p, v in doc.items() if isinstance(v, dict) and ELIDED not in v and p.rpartition(".")[2] not in skip
    ]
    for path in (p for p in closed if not p or p in documented):  # objects shown whole: exactly those keys
        doc_keys = set(example if not path else doc[path])
        if not path and "tta" not in written:
            doc_keys.discard("tta")  # optional (above)
        real_value = written if not path else real[path]
        if isinstance(real_value, dict):
            assert set(real_value) == doc_keys, f"§4 example, {path or 'top level'}: keys differ from the export's"
    # the names the old example used (issue 14): gone from the example and the text
    assert "max_abs" not in example["export"]["parity"] and "spatial_size" not in example["input"]


def test_progress_event_table_matches_the_stream(trained_run):
    _, run, _ = trained_run
    table = {}
    for event, fields in re.findall(r"^\| `(\w+)` \| (.+) \|$", _section(2), flags=re.M):
        table[event] = set(re.findall(r"`(\w+)`", re.sub(r"\([^)]*\)", "", fields)))
    assert {"start", "step", "epoch", "done"} <= set(table)
    records = read_progress(run / "progress.jsonl")
    assert {r["event"] for r in records} >= {"start", "step", "epoch", "done"}
    for rec in records:
        extra = set(rec) - {"event", "time"} - table[rec["event"]]
        assert not extra, f"§2: {rec['event']} writes undocumented {sorted(extra)}"
    for event in ("start", "epoch"):  # every documented field of these is always written
        (first,) = [r for r in records if r["event"] == event][:1]
        assert table[event] <= set(first), f"§2: {event} lacks documented {sorted(table[event] - set(first))}"


def test_run_folder_and_run_json_keys(trained_run):
    _, run, _ = trained_run
    section = _section(3)
    listed = set(re.findall(r"^  ([\w.]+)\s", section.split("```")[1], flags=re.M))
    assert set(RUN_FILES) <= listed and all((run / name).is_file() for name in RUN_FILES)
    sentence = section[section.index(f"`{RUN_JSON}` (format") :].split("; a failed")[0]
    documented = set(re.findall(r"`(\w+)`", re.sub(r"\([^)]*\)", "", sentence))) - {"run"}
    record = json.loads((run / RUN_JSON).read_text(encoding="utf-8"))
    assert record["status"] == "completed" and set(record) == documented
    assert set(record["best_metric"]) == {"name", "value", "epoch"}
