"""Facts from the image for rows with neither facts nor hint (dyme_core/facts.py, `refine.facts_from: vlm`).

Against the loopback fake endpoint (fake_llm.py), which decodes every image_url data URL it receives:
the dataset's image bytes arrive, the reply is parsed into visual_facts, the rule refiner's trace states
those values, a second run is all cache hits, a failing or garbage endpoint is a counted fallback with one
warning line, and the facts reach training's checker. The last test takes a hint-less Hugging Face ChartQA
folder through `dyme ingest` and `dyme refine` to grounded targets.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path

import pytest
from fake_llm import FakeLLM, text_of
from PIL import Image

from dyme_core import steps
from dyme_core.checker import rule_thinking_score
from dyme_core.config import Config, load_config
from dyme_core.data.ingest import open_dataset
from dyme_core.data.schema import Sample, write_jsonl
from dyme_core.facts import FactsError, attach_facts, load_facts, parse_facts
from dyme_core.llm import ChatClient, LLMError

# Two charts (one image each) and the table the fake "reads" from each, keyed by the question's chart.
FRUIT = {"title": "Boxes sold", "columns": ["Fruit", "Boxes"], "rows": [["Pears", 78], ["Apples", 56], ["Limes", 12]]}
CITIES = {"columns": ["City", "2019", "2020"], "rows": [["Oslo", 4.5, 5.25], ["Rome", 7, 6.5]]}
ROWS = [  # id, image colour, question, answer
    ("q1", "red", "How many more boxes of Pears than Apples were sold?", "22"),
    ("q2", "red", "What is the total number of boxes sold?", "146"),
    ("q3", "blue", "What was the value for Rome in 2020?", "6.5"),
]


def _png(color: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, format="PNG")
    return buf.getvalue()


def _table_reply(messages: list[dict]) -> str:
    """The JSON table of the chart the question is about, as a vision model would write it."""
    question = text_of(messages[-1])
    table = FRUIT if "boxes" in question.lower() else CITIES
    return "```json\n" + json.dumps(table) + "\n```"


def _cfg(tmp_path: Path, base_url: str, *overrides: str) -> Config:
    return load_config(None, [
        f"data.path={tmp_path / 'src'}", f"data.out_dir={tmp_path / 'dataset'}",
        f"data.report={tmp_path / 'reports/ingest.json'}", "data.val_fraction=0", "data.test_fraction=0",
        f"refine.out={tmp_path / 'refined/targets.jsonl'}",
        f"refine.template_pool={tmp_path / 'refined/templates.json'}",
        f"refine.cache_dir={tmp_path / 'cache'}", f"model.name_or_path={tmp_path / 'no-model'}",
        "refine.facts_from=vlm", f"refine.llm.base_url={base_url}", "refine.llm.backoff_s=0.01",
        "refine.llm.timeout_s=5", *overrides])


def _hintless_dataset(tmp_path: Path, base_url: str, *overrides: str) -> Config:
    """A project-format folder of hint-less rows (plus one row with a hint), ingested."""
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    for color in ("red", "blue"):
        (src / f"images/{color}.png").write_bytes(_png(color))
    samples = [Sample(id=i, image=f"images/{c}.png", question=q, answer=a) for i, c, q, a in ROWS]
    samples.append(Sample(id="h1", image="images/red.png", question="How many Limes?", answer="12",
                          hint="The Limes bar reads 12."))
    write_jsonl(samples, src / "samples.jsonl")
    cfg = _cfg(tmp_path, base_url, *overrides)
    steps.ingest(cfg)
    return cfg


def _targets(cfg: Config) -> dict[str, dict]:
    return {row["id"]: row for row in map(json.loads, Path(cfg.refine.out).read_text().splitlines())}


def _stats(cfg: Config) -> dict:
    return json.loads(Path(cfg.refine.out).with_name("refine_stats.json").read_text())


def _client(cfg: Config) -> ChatClient:
    return ChatClient(cfg.refine.llm)


# ---------------------------------------------------------------------------------------------- parsing

TABLE = {"columns": ["Fruit", "Boxes"], "rows": [["Pears", 78], ["Apples", 56]]}


@pytest.mark.parametrize("reply, expected", [
    # bare JSON, numbers kept
    (json.dumps(TABLE), TABLE),
    # fenced, inside prose, with a title
    ("Here is the data:\n```json\n" + json.dumps({**TABLE, "title": " Sales "}) + "\n```\nDone.",
     {**TABLE, "title": "Sales"}),
    # numbers written as text (thousands separator, decimal) become numbers; other text stays text
    ('{"columns": ["Year", "Revenue"], "rows": [["2019", "1,234"], ["2020", "12.5"], ["2021", "n/a"]]}',
     {"columns": ["Year", "Revenue"], "rows": [["2019", 1234], ["2020", 12.5], ["2021", "n/a"]]}),
    # a markdown table (the fallback), separator row skipped, several series
    ("| City | 2019 | 2020 |\n|---|---:|---|\n| Oslo | 4.5 | 5.25 |\n| Rome | 7 | 6.5 |", CITIES),
    # a percentage stays as the chart states it; bold is markup, not text; a label keeps its digits as written
    ("| Party | Share |\n| --- | --- |\n| **Red** | 45% |\n| 007 | 5 |",
     {"columns": ["Party", "Share"], "rows": [["Red", "45%"], ["007", 5]]}),
])
def test_replies_parse_into_a_visual_facts_table(reply: str, expected: dict) -> None:
    assert parse_facts(reply) == expected


@pytest.mark.parametrize("reply", [
    "I cannot see any chart in this image.",  # prose
    '{"columns": ["Fruit", "Boxes"], "rows": [["Pears", 78, 3]]}',  # a row longer than the header
    '{"columns": ["Fruit", "Boxes"], "rows": [["Pears", NaN]]}',  # not a finite number
    '{"columns": ["Fruit", "Boxes"], "rows": [["Pears", 1e999]]}',  # overflows to infinity
    '{"columns": ["Fruit"], "rows": [["Pears"]]}',  # no series
    '{"columns": ["Fruit", "Boxes"], "rows": []}',  # no rows
    '{"columns": ["Fruit", "Boxes"], "rows": [["Pears", null]]}',  # an empty cell
    "| Fruit | Boxes |\n|---|---|",  # a header without rows
])
def test_unusable_replies_are_refused_with_a_reason(reply: str) -> None:
    with pytest.raises(FactsError):
        parse_facts(reply)


# ---------------------------------------------------------------------------------------------- refine


def test_refine_sends_the_image_parses_the_table_and_writes_grounded_traces(tmp_path: Path, fake_llm: FakeLLM) -> None:
    fake_llm.reply = _table_reply
    cfg = _hintless_dataset(tmp_path, fake_llm.base_url)
    ds = open_dataset(cfg.data.out_dir)
    stats = steps.refine(cfg, _client(cfg))

    # one request per hint-less row, each carrying that row's image, byte for byte, and its question
    assert fake_llm.count == 3 and len(fake_llm.images) == 3
    want = {s.id: hashlib.sha256(ds.image_path(s).read_bytes()).hexdigest() for s in ds.samples}
    got = {}
    for request, image in zip(fake_llm.requests, fake_llm.images, strict=True):
        body = request["body"]
        assert body["model"] == cfg.refine.facts_model
        question = text_of(body["messages"][-1])
        (row_id,) = [i for i, _, q, _ in ROWS if q in question]
        got[row_id] = hashlib.sha256(image).hexdigest()
    assert got == {i: want[i] for i in ("q1", "q2", "q3")}

    targets = _targets(cfg)
    assert targets["q1"]["visual_facts"] == FRUIT and targets["q3"]["visual_facts"] == CITIES
    assert "visual_facts" not in targets["h1"]  # had a hint: not asked, nothing added
    # the rule refiner wrote the traces from the chart's values, its arithmetic included
    assert "Pears = 78" in targets["q1"]["trace"] and "Apples = 56" in targets["q1"]["trace"]
    assert "78 - 56 = 22" in targets["q1"]["trace"]
    assert "78 + 56 + 12 = 146" in targets["q2"]["trace"]
    assert "Rome: 2019 = 7, 2020 = 6.5" in targets["q3"]["trace"]
    assert stats["refiner/ungrounded"] == 0
    assert {k: v for k, v in _stats(cfg).items() if k.startswith("facts/")} == {
        "facts/rows": 3, "facts/got": 3, "facts/cache_hits": 0, "facts/failed": 0}

    # a second run asks nothing: every row's facts come from the on-disk JSON cache
    first = Path(cfg.refine.out).read_bytes()
    steps.refine(cfg, _client(cfg))
    assert fake_llm.count == 3
    assert _stats(cfg)["facts/cache_hits"] == 3 and _stats(cfg)["facts/got"] == 3
    assert Path(cfg.refine.out).read_bytes() == first
    cached = sorted((tmp_path / "cache/facts").rglob("*.json"))
    assert len(cached) == 3 and all(isinstance(json.loads(p.read_text()), dict) for p in cached)


def test_the_llm_refiner_rewrites_from_the_facts_the_image_gave(tmp_path: Path, fake_llm: FakeLLM) -> None:
    def reply(messages: list[dict]) -> str:
        if isinstance(messages[-1]["content"], list):  # the vision request
            return _table_reply(messages)
        return "Goal: compare.\nObservation: Pears 78, Apples 56.\nReasoning: 78 - 56 = 22.\nConclusion: 22."

    fake_llm.reply = reply
    cfg = _hintless_dataset(tmp_path, fake_llm.base_url, "refine.backend=llm")
    steps.refine(cfg, _client(cfg))
    text_requests = [r["body"] for r in fake_llm.requests if isinstance(r["body"]["messages"][-1]["content"], str)]
    # one rewrite per row (hint-less rows now have facts: no extraction call), shown the chart's table
    rewrites = [b for b in text_requests if "Pears | 78" in b["messages"][-1]["content"]]
    assert len(rewrites) == 2 and all(b["model"] == cfg.refine.llm.model for b in rewrites)
    assert _targets(cfg)["q1"]["backend"] == "llm" and _targets(cfg)["q1"]["visual_facts"] == FRUIT


def test_another_model_or_a_corrupt_entry_is_asked_again(tmp_path: Path, fake_llm: FakeLLM) -> None:
    fake_llm.reply = _table_reply
    cfg = _hintless_dataset(tmp_path, fake_llm.base_url)
    steps.refine(cfg, _client(cfg))
    next((tmp_path / "cache/facts").rglob("*.json")).write_text("{not json")
    steps.refine(cfg, _client(cfg))
    assert fake_llm.count == 4 and _stats(cfg)["facts/cache_hits"] == 2
    other = _cfg(tmp_path, fake_llm.base_url, "refine.facts_model=other-vlm")
    steps.refine(other, _client(other))
    assert fake_llm.count == 7 and _stats(other)["facts/cache_hits"] == 0


# HTTP 500 on every attempt; a 200 whose reply holds no table; a body that is no completion and echoes the image
@pytest.mark.parametrize("mode", ["error", "ok", "garbage"])
def test_a_failing_or_garbage_endpoint_is_a_counted_fallback_with_one_warning(
        tmp_path: Path, fake_llm: FakeLLM, caplog: pytest.LogCaptureFixture, mode: str) -> None:
    fake_llm.mode = mode
    fake_llm.reply = "Sorry, I can't help with that."
    fake_llm.garbage_body = b'{"detail": "cannot read data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAACgAAAAe"}'
    cfg = _hintless_dataset(tmp_path, fake_llm.base_url, "refine.llm.max_retries=0", "refine.llm.breaker_failures=0")
    with caplog.at_level(logging.WARNING, logger="dyme_core.facts"):
        stats = steps.refine(cfg, _client(cfg))
    warnings = [r for r in caplog.records if r.name == "dyme_core.facts"]
    assert len(warnings) == 1 and "failed for 3 of 3 rows" in warnings[0].getMessage()
    assert "iVBOR" not in warnings[0].getMessage()  # never the image's data
    assert stats["facts/failed"] == 3 and stats["facts/got"] == 0 and stats["refiner/ungrounded"] == 3
    targets = _targets(cfg)
    assert not any("visual_facts" in row for row in targets.values())
    assert targets["q1"]["trace"].endswith("The answer is 22.")  # the honest restatement
    assert not list((tmp_path / "cache").rglob("*.json"))  # a failure is never cached


def test_on_failure_fail_stops_with_one_line(tmp_path: Path, fake_llm: FakeLLM) -> None:
    fake_llm.reply = "no table here"
    cfg = _hintless_dataset(tmp_path, fake_llm.base_url, "refine.llm.on_failure=fail")
    with pytest.raises(LLMError, match=r"facts from the image failed .*sample 'q\d'.*neither a JSON table") as e:
        steps.refine(cfg, _client(cfg))
    assert "\n" not in str(e.value)


def test_facts_from_vlm_without_an_endpoint_is_a_clear_error(
        tmp_path: Path, fake_llm: FakeLLM, capsys: pytest.CaptureFixture) -> None:
    from dyme_core.cli import main

    cfg = _hintless_dataset(tmp_path, fake_llm.base_url)
    with pytest.raises(ValueError, match="refine.facts_from=vlm needs a vision endpoint"):
        steps.refine(cfg, None)
    assert main(["refine", f"data.out_dir={cfg.data.out_dir}", "refine.facts_from=vlm"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "dyme refine: error: refine.facts_from=vlm needs a vision endpoint: set refine.llm.base_url"]


def test_training_reads_the_facts_and_its_checker_scores_against_them(
        tmp_path: Path, fake_llm: FakeLLM, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_llm.reply = _table_reply
    cfg = _hintless_dataset(tmp_path, fake_llm.base_url)
    steps.refine(cfg, _client(cfg))
    train_cfg = load_config(None, [f"data.out_dir={cfg.data.out_dir}", f"train.refined={cfg.refine.out}"])
    seen = {}
    monkeypatch.setattr(steps, "check_validated", lambda cfg: None)
    monkeypatch.setattr("dyme_core.trainer.train", lambda cfg, dataset, refined, **kw: seen.update(
        samples={s.id: s for s in dataset.samples}, refined=refined) or {})
    steps.train(train_cfg)

    samples = seen["samples"]
    assert samples["q1"].visual_facts == FRUIT and samples["h1"].visual_facts is None
    assert load_facts(cfg.refine.out) == {"q1": FRUIT, "q2": FRUIT, "q3": CITIES}
    thinking = "Pears sold 78 boxes and Apples 56, so 78 - 56 = 22."
    assert rule_thinking_score(thinking, samples["q1"].visual_facts, "22") > 0.6
    # without the facts the hint-less row has nothing to score against
    assert rule_thinking_score(thinking, None, "22", None) == 0.0
    # facts a row already has are never replaced
    own = Sample(id="q1", image="x.png", question="?", answer="1", visual_facts=CITIES)
    assert attach_facts([own], {"q1": FRUIT})[0].visual_facts == CITIES


# ---------------------------------------------------------------------------------------------- end to end


def test_hintless_chartqa_folder_ingest_then_refine_gives_grounded_targets(tmp_path: Path, fake_llm: FakeLLM) -> None:
    import datasets

    from dyme_core.cli import main

    features = datasets.Features({"query": datasets.Value("string"),
                                  "label": datasets.Sequence(datasets.Value("string")), "image": datasets.Image()})
    folder = tmp_path / "ChartQA"
    (folder / "data").mkdir(parents=True)
    for split, rows in {"train": ROWS, "test": ROWS[2:]}.items():
        records = {"query": [q for _, _, q, _ in rows], "label": [[a] for *_, a in rows],
                   "image": [{"bytes": _png(c), "path": None} for _, c, _, _ in rows]}
        part = datasets.Dataset.from_dict(records, features=features)
        part.to_parquet(str(folder / f"data/{split}-00000-of-00001.parquet"))
    fake_llm.reply = _table_reply
    args = [f"data.path={folder}", f"data.out_dir={tmp_path / 'dataset'}", f"data.report={tmp_path / 'ingest.json'}",
            "data.val_fraction=0", f"refine.out={tmp_path / 'refined/targets.jsonl'}",
            f"refine.template_pool={tmp_path / 'refined/templates.json'}", f"refine.cache_dir={tmp_path / 'cache'}",
            f"model.name_or_path={tmp_path / 'no-model'}", "refine.facts_from=vlm",
            f"refine.llm.base_url={fake_llm.base_url}"]
    assert main(["ingest", *args]) == 0
    assert main(["refine", *args]) == 0

    questions = {s.id: s.question for s in open_dataset(tmp_path / "dataset").samples}
    lines = (tmp_path / "refined/targets.jsonl").read_text().splitlines()
    targets = {questions[t["id"]]: t for t in map(json.loads, lines)}
    assert len(targets) == 3 and len(fake_llm.images) == 3
    assert set(fake_llm.images) == {_png("red"), _png("blue")}  # the chart bytes the folder holds
    difference = targets[ROWS[0][2]]
    assert difference["visual_facts"] == FRUIT and "78 - 56 = 22" in difference["trace"]
    assert "Rome: 2019 = 7, 2020 = 6.5" in targets[ROWS[2][2]]["trace"]
    stats = json.loads((tmp_path / "refined/refine_stats.json").read_text())
    assert stats["refiner/ungrounded"] == 0 and stats["facts/got"] == 3
