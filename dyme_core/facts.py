"""Visual facts read from the image, for rows that have neither facts nor a hint (DESIGN.md sections 2 and 3).

A Hugging Face ChartQA folder gives image, question and answer only: without facts the rule refiner can
only restate the question and the answer, and the checker has nothing to score thinking against. The
official code had a large VLM write the missing facts (``visual_fact``, Qwen2.5-VL-32B); here, with
``refine.facts_from: vlm``, the refine step sends each such row's image (a base64 data URL in an
``image_url`` content part) and question to an OpenAI-compatible vision endpoint through the project's
bounded :class:`~dyme_core.llm.ChatClient` (deadline, retries, reply cap, circuit breaker), asks for the
chart's data as a JSON table, and parses the reply into the ``visual_facts`` table of the data contract
(``{"title", "columns", "rows"}``; a markdown table is accepted too). Results are cached on disk as JSON by
the sha256 of the image bytes, the prompt (question included) and the model, so a rerun costs no call.

Where the facts go: the refine step writes them into each such row of ``refined/targets.jsonl``
(``"visual_facts"``), beside the trace the rule refiner wrote from them; training reads them back with
:func:`load_facts` and :func:`attach_facts` for its checker. The targets file already flows from refine to
train in DVC and in Kubeflow, so no new artifact or stage is needed, and a dataset without such rows
gives the same targets file as before.

A row whose call fails or whose reply is not a table keeps no facts: counted (``facts/failed``), one
warning line for the step, never a crash (or one error line with ``llm.on_failure: fail``).
Tested against a loopback fake endpoint: ``tests/core/test_facts.py``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dyme_core.data.loaders import DataError, Dataset, decode_image, safe_image_file
from dyme_core.data.schema import Sample
from dyme_core.llm import ChatClient, LLMError, image_part

log = logging.getLogger(__name__)

FACTS_SYSTEM_PROMPT = "You transcribe the data that charts and other images show. Reply with JSON only."

FACTS_PROMPT = """Transcribe the data this image shows as a table, so that the question below can be answered from
the table alone.

Question: {question}

Reply with one JSON object and nothing else, in this form:
{{"title": "<the chart's title, or empty>", "columns": ["<label column>", "<series 1>", ...],
 "rows": [["<label>", <value>, ...], ...]}}
One row per category or x-axis position, one column per data series. Write the values as the image
states them (numbers without units or thousands separators). Do not compute or add anything the image
does not show."""

MAX_REPLY_TOKENS = 1024  # a table of a few dozen rows
MAX_ROWS = 200  # a chart's table; more is a runaway reply
MAX_CELL_CHARS = 200
# Image formats every OpenAI-compatible vision endpoint accepts as they are; others are sent as PNG.
_SENT_AS_IS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}
_FENCE = re.compile(r"^```[\w-]*\s*|\s*```$")
_PLAIN_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?:\D|$))")
_SEPARATOR_ROW = re.compile(r"^\|?\s*:?-{3,}:?\s*(?:\|\s*:?-{3,}:?\s*)*\|?$")
_BOLD = re.compile(r"^\*\*(.*)\*\*$")
_DATA_URL = re.compile(r"data:[\w/+.-]+;base64,[A-Za-z0-9+/=]+")


class FactsError(ValueError):
    """A reply that is not a usable table; the message says why."""


# ---------------------------------------------------------------------------------------------- parsing


def _value(cell: Any, where: str) -> str | int | float:
    """A value cell: a finite number, or text (a text that is a plain number becomes that number)."""
    if isinstance(cell, bool) or cell is None or isinstance(cell, list | dict):
        raise FactsError(f"{where} is {json.dumps(cell)}, not a number or text")
    if isinstance(cell, int | float):
        if not math.isfinite(cell):
            raise FactsError(f"{where} is not a finite number")
        return cell
    text = str(cell).strip()
    if len(text) > MAX_CELL_CHARS:
        raise FactsError(f"{where} has {len(text)} characters (at most {MAX_CELL_CHARS})")
    plain = _THOUSANDS.sub("", text)
    if _PLAIN_NUMBER.fullmatch(plain):
        number = float(plain)
        return int(number) if number.is_integer() and "." not in plain else number
    return text


def _table(columns: Any, rows: Any, title: Any = "") -> dict:
    """The checked ``visual_facts`` table; :class:`FactsError` naming the first problem."""
    if not isinstance(columns, list) or len(columns) < 2:
        raise FactsError("'columns' must list a label column and at least one series")
    if not isinstance(rows, list) or not rows:
        raise FactsError("'rows' must be a non-empty list")
    if len(rows) > MAX_ROWS:
        raise FactsError(f"{len(rows)} rows (at most {MAX_ROWS})")
    names = [str(c).strip() for c in columns]
    if any(not n or len(n) > MAX_CELL_CHARS for n in names):
        raise FactsError("a column name is empty or too long")
    table_rows = []
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != len(names):
            n = len(row) if isinstance(row, list) else type(row).__name__
            raise FactsError(f"row {i} has {n} cells, expected {len(names)} (one per column)")
        _value(row[0], f"row {i} label")  # the same type checks; the label keeps its text ("007", "2019")
        label = str(row[0]).strip()
        if not label:
            raise FactsError(f"row {i} has an empty label")
        table_rows.append([label, *(_value(c, f"row {i} cell {j}") for j, c in enumerate(row[1:], 1))])
    facts: dict[str, Any] = {"columns": names, "rows": table_rows}
    if isinstance(title, str) and title.strip():
        facts["title"] = title.strip()[:MAX_CELL_CHARS]
    return facts


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number")


def _json_object(text: str) -> dict | None:
    """The JSON object in ``text`` (bare, fenced, or the outermost ``{...}`` inside prose), else None."""
    candidates = [_FENCE.sub("", text.strip())]
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        candidates.append(text[start:end + 1])
    for candidate in candidates:
        try:
            found = json.loads(candidate, parse_constant=_reject_constant)
        except ValueError:
            continue
        if isinstance(found, dict):
            return found
    return None


def _markdown_table(text: str) -> dict | None:
    """A markdown table's header and rows (cells split on ``|``), or None if ``text`` holds none."""
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("|")]
    if len(lines) < 2:
        return None
    cells = [[_BOLD.sub(r"\1", c.strip()) for c in line.strip("|").split("|")]
             for line in lines if not _SEPARATOR_ROW.match(line)]
    return {"columns": cells[0], "rows": cells[1:]} if len(cells) >= 2 else None


def parse_facts(reply: str) -> dict:
    """The ``visual_facts`` table a vision model's reply states: a JSON object with ``columns`` and ``rows``
    (optionally fenced or surrounded by prose), else a markdown table. :class:`FactsError` otherwise."""
    found = _json_object(reply)
    if found is not None and "columns" in found and "rows" in found:
        return _table(found["columns"], found["rows"], found.get("title", ""))
    table = _markdown_table(reply)
    if table is not None:
        return _table(table["columns"], table["rows"])
    shown = " ".join(reply.split())[:120]
    raise FactsError(f"reply is neither a JSON table (columns, rows) nor a markdown table: {shown!r}")


# ---------------------------------------------------------------------------------------------- requests


def image_payload(dataset: Dataset, sample: Sample) -> tuple[bytes, bytes, str]:
    """(the image file's bytes, the bytes to send, their MIME type); DataError naming the sample.

    The file's own bytes are sent when the endpoint accepts the format (PNG, JPEG, WebP, GIF); any other
    format is re-encoded as PNG. The file is opened as every step opens images (inside the dataset root,
    a regular file, under the pixel limit)."""
    try:
        data = safe_image_file(dataset.root, sample.image).read_bytes()
        with decode_image(data, dataset.max_pixels) as image:
            mime = _SENT_AS_IS.get(image.format or "")
            if mime:
                return data, data, mime
            out = io.BytesIO()
            image.convert("RGB").save(out, format="PNG")
            return data, out.getvalue(), "image/png"
    except DataError as e:
        raise DataError(f"sample {sample.id!r}: {e}") from None


def facts_messages(sent: bytes, mime: str, question: str) -> list[dict]:
    """The chat messages that ask for the image's data: the image as a data URL, then the question."""
    return [{"role": "system", "content": FACTS_SYSTEM_PROMPT},
            {"role": "user", "content": [image_part(sent, mime),
                                         {"type": "text", "text": FACTS_PROMPT.format(question=question)}]}]


def cache_key(image_bytes: bytes, question: str, model: str) -> str:
    """sha256 of the image's bytes, the prompt (the question in it) and the model."""
    payload = json.dumps([hashlib.sha256(image_bytes).hexdigest(), FACTS_SYSTEM_PROMPT,
                          FACTS_PROMPT.format(question=question), model])
    return hashlib.sha256(payload.encode()).hexdigest()


class FactsCache:
    """Parsed facts on disk, one JSON file per key (never pickle); an unreadable entry is a miss."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root) / "facts"

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            stored = json.loads(path.read_text(), parse_constant=_reject_constant)
            return _table(stored["columns"], stored["rows"], stored.get("title", ""))
        except (ValueError, KeyError, TypeError):  # FactsError is a ValueError
            log.info("facts cache entry %s is unreadable; asking again", path)
            return None

    def put(self, key: str, facts: dict) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(facts, sort_keys=True))
        tmp.replace(path)  # atomic: a killed run never leaves half an entry


# ---------------------------------------------------------------------------------------------- the step


def needs_facts(sample: Sample) -> bool:
    """A row the refiner could only restate: no visual facts and no hint."""
    return not sample.visual_facts and not (sample.hint and sample.hint.strip())


@dataclass
class FactsStats:
    rows: int = 0  # rows with neither facts nor hint
    got: int = 0  # of them, rows that got facts (from the endpoint or the cache)
    cache_hits: int = 0
    failed: int = 0
    first_failure: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, *, got: int = 0, cache_hits: int = 0, failed: int = 0, reason: str = "") -> None:
        with self._lock:
            self.got += got
            self.cache_hits += cache_hits
            self.failed += failed
            self.first_failure = self.first_failure or reason

    def as_dict(self) -> dict[str, int]:
        return {"facts/rows": self.rows, "facts/got": self.got, "facts/cache_hits": self.cache_hits,
                "facts/failed": self.failed}


def _short_reason(error: Exception) -> str:
    """One line, data URLs cut (a server may echo the request in its error)."""
    text = _DATA_URL.sub(lambda m: m.group(0)[:m.group(0).index(",") + 1] + "...", str(error))
    text = " ".join(text.split())
    return text if len(text) <= 200 else text[:197] + "..."


def facts_from_images(dataset: Dataset, samples: list[Sample], client: ChatClient, *, model: str,
                      cache_dir: str | Path | None, max_workers: int) -> tuple[dict[str, dict], FactsStats]:
    """Facts for every sample of ``samples`` that has neither facts nor hint: (id -> visual_facts, stats).

    Each image + question is asked once (concurrently, ``max_workers`` at a time) unless the cache has it.
    A failed call or an unusable reply is counted and logged once for the whole run (one warning line,
    with the first reason); with ``llm.on_failure: fail`` it raises :class:`LLMError` instead.
    """
    todo = [s for s in samples if needs_facts(s)]
    stats = FactsStats(rows=len(todo))
    cache = FactsCache(cache_dir) if cache_dir else None

    def one(sample: Sample) -> tuple[str, dict | None]:
        try:
            original, sent, mime = image_payload(dataset, sample)
            key = cache_key(original, sample.question, model)
            if cache is not None and (hit := cache.get(key)) is not None:
                stats.add(got=1, cache_hits=1)
                return sample.id, hit
            reply = client.chat(facts_messages(sent, mime, sample.question), max_tokens=MAX_REPLY_TOKENS,
                                model=model)
            facts = parse_facts(reply)
        except (LLMError, FactsError, DataError) as e:
            reason = f"sample {sample.id!r}: {_short_reason(e)}"
            if client.cfg.on_failure == "fail":
                raise LLMError(f"facts from the image failed (llm.on_failure=fail): {reason}") from None
            stats.add(failed=1, reason=reason)
            return sample.id, None
        if cache is not None:
            cache.put(key, facts)
        stats.add(got=1)
        return sample.id, facts

    with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
        found = dict(pool.map(one, todo))
    if stats.failed:
        log.warning("refine: facts from the image failed for %d of %d rows without facts or hint (first: %s)",
                    stats.failed, stats.rows, stats.first_failure)
    return {k: v for k, v in found.items() if v is not None}, stats


def attach_facts(samples: list[Sample], facts: dict[str, dict]) -> list[Sample]:
    """``samples`` with ``facts[id]`` as the visual facts of each row that has none (others unchanged)."""
    return [replace(s, visual_facts=facts[s.id]) if s.id in facts and not s.visual_facts else s for s in samples]


def load_facts(targets: str | Path) -> dict[str, dict]:
    """id -> visual_facts that the refine step read from the image, from its targets JSONL ('' or missing: none)."""
    path = Path(targets) if targets else None
    if path is None or not path.is_file():
        return {}
    with path.open() as f:
        rows = (json.loads(line) for line in f if line.strip())
        return {row["id"]: row["visual_facts"] for row in rows if row.get("visual_facts")}

