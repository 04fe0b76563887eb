"""The lists of names users choose from have one owner (``medtune.names``): the CLI's choices are that list, and
every place the docs list them names exactly the owner's names (torch-free: runs in the py312 job too)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from medtune import names
from medtune.cli import build_parser

REPO = Path(__file__).resolve().parents[1]


def _choices(parser: argparse.ArgumentParser, command: str, option: str) -> tuple[str, ...]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return tuple(next(a for a in sub._actions if option in a.option_strings).choices)


@pytest.mark.parametrize(
    ("command", "option", "owner"),
    [
        ("finetune", "--preset", names.PRESETS),
        ("finetune", "--strategy", names.STRATEGIES),
        ("pretrain", "--strategy", names.STRATEGIES),
        ("export", "--precision", names.PRECISIONS),
        ("infer", "--provider", names.PROVIDERS),
    ],
)
def test_cli_choices_are_the_owners_lists(command: str, option: str, owner: tuple[str, ...]) -> None:
    assert _choices(build_parser(), command, option) == owner


def _text(path: str) -> str:
    return (REPO / path).read_text(encoding="utf-8")


def _one(pattern: str, text: str, where: str) -> str:
    found = re.findall(pattern, text)
    assert len(found) == 1, f"{where}: expected one match of {pattern!r}, found {len(found)}"
    return found[0]


def _ticked(text: str) -> list[str]:
    return re.findall(r"`([a-z0-9_]+)`", text)


#: (file, what the list looks like there, how to split it, the owner): every place the docs list these names
DOC_LISTS = [
    ("README.md", r"--strategy ([a-z_|]+)\]", lambda s: s.split("|"), names.STRATEGIES),
    ("README.md", r"--provider ([a-z_|]+)\]", lambda s: s.split("|"), names.PROVIDERS),
    ("README.md", r"(?s)Presets: (.+?)\. Pretrained", lambda s: [n for n in _ticked(s) if n[:3] in ("2d_", "3d_")],
     names.PRESETS),
    ("monai_bundle/docs/README.md", r"\n\| `strategy` \|[^|]*\|([^|]*)\|",
     lambda s: [n for n in _ticked(s) if n not in ("unfreeze_epoch", "train_stages")], names.STRATEGIES),
    ("slicer_extension/README.md", r"provider ([a-z /]+);", lambda s: s.split(" / "), names.PROVIDERS),
    ("docs/formats.md", r"--precision ([a-z0-9 |]+)`\)", lambda s: s.split(" | "), names.DERIVED_PRECISIONS),
]  # fmt: skip


@pytest.mark.parametrize(("path", "pattern", "split", "owner"), DOC_LISTS, ids=[f"{d[0]}:{d[3][0]}" for d in DOC_LISTS])
def test_docs_list_the_owners_names(path: str, pattern: str, split, owner: tuple[str, ...]) -> None:
    listed = [s.strip() for s in split(_one(pattern, _text(path), path))]
    assert sorted(listed) == sorted(owner), f"{path} lists {listed}, the owner {list(owner)}"


def test_preset_files_are_the_preset_names() -> None:
    """Each preset name has its config file, and no preset file lacks a name."""
    configs = REPO / "monai_bundle" / "configs"
    on_disk = sorted(p.stem for p in configs.glob("[23]d_*.json"))
    assert on_disk == sorted(names.PRESETS)
