"""The sample schema of DESIGN.md section 3 and the project's own file format.

A dataset is a folder (the dataset root) holding ``samples.jsonl`` (or ``samples.parquet``) and the
images it names by paths relative to that root. One row is one :class:`Sample`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

SPLITS = ("train", "val", "test")

# visual_facts is either a table {"columns": [str, ...], "rows": [[cell, ...], ...], "title": str?}
# or a list of objects [{"name": ..., "<attribute>": value, ...}, ...]
VisualFacts = dict[str, Any] | list[dict[str, Any]] | None


@dataclass
class Sample:
    """One image + question + answer, with optional reasoning hint and structured visual facts."""

    id: str
    image: str  # path relative to the dataset root
    question: str
    answer: str
    hint: str | None = None  # reference reasoning trace, if the dataset has one
    visual_facts: VisualFacts = None
    direct_answers: list[str] | None = None  # VQA-style list of accepted answers
    task: str = "chart"
    split: str = "train"
    qtype: str | None = None  # question type, for per-type metrics
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> Sample:
        known = {f.name for f in fields(cls)}
        unknown = set(row) - known
        if unknown:
            raise ValueError(f"sample {row.get('id')!r}: unknown field(s) {sorted(unknown)}")
        return cls(**row)

    def references(self) -> list[str]:
        """Accepted answers: the direct answers when present, else the answer."""
        return list(self.direct_answers) if self.direct_answers else [self.answer]


def write_jsonl(samples: list[Sample], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for s in samples:
            f.write(json.dumps(s.to_dict(), sort_keys=True) + "\n")


def jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
    """(line number, row, "") for every JSON object line of a JSONL file, or (line number, None, reason)
    for a line that is not one; blank lines are skipped. Text is decoded as UTF-8 with
    ``surrogateescape``: bytes that are not UTF-8 survive as lone surrogates, so the row that holds them
    can be named later instead of the whole file failing."""
    with path.open(encoding="utf-8", errors="surrogateescape") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, None, f"not valid JSON ({e.msg})"
                continue
            if isinstance(row, dict):
                yield lineno, row, ""
            else:
                yield lineno, None, f"a JSON {type(row).__name__}, not an object"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for lineno, row, reason in jsonl_rows(path):
        if row is None:
            raise ValueError(f"{path}:{lineno}: {reason}")
        rows.append(row)
    return rows
