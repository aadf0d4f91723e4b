"""Endpoint faults replayed against a loopback fake OpenAI-compatible server (issue 10, item 4).

For each fault (connection refused, HTTP 500, a hang, a 1 byte/s drip, garbage JSON, a reply without the
fields, a 50 MB body without a Content-Length, to the connection's end or in HTTP/1.1 chunks, 429 with
Retry-After) the LLM refiner must: finish within a bound derived from the client's configuration
(attempts x deadline + waits, plus generous slack: never the fault's own duration), fall back to the
rule refiner, count it and say so in the log. The circuit breaker stops calling a failing endpoint and
says so once; `llm.on_failure=fail` turns a fault into a one-line CLI
error with a non-zero exit, and the API key never reaches the output.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from dyme_core import cli
from dyme_core.config import LLMConfig
from dyme_core.data.schema import Sample, write_jsonl
from dyme_core.llm import ChatClient, LLMError
from dyme_core.refiner import DEFAULT_TEMPLATE, Refiner, rule_refine
from tests.core.fake_llm import FakeLLM

pytestmark = pytest.mark.server

DEADLINE = 0.5  # seconds: small, so a test that waits out a deadline stays fast
RETRIES = 1
BACKOFF = 0.05
SLACK = 2.0  # generous: thread start-up, a loaded CI machine; the faults themselves last 10 s or more
HINT = "Apples sold 12 boxes and Pears 7 boxes, so Apples sold 5 more."
SAMPLE = Sample(id="s1", image="images/s1.png", question="How many more boxes of Apples than Pears?",
                answer="5", hint=HINT)
GOOD_REPLY = "Goal: the gap.\nObservation: Apples = 12, Pears = 7.\nReasoning: 12 - 7 = 5.\nConclusion: 5."


def bound(cfg: LLMConfig) -> float:
    """The most one request may take: every attempt's deadline and every wait (each capped by the deadline)."""
    attempts = 1 + cfg.max_retries
    return attempts * cfg.timeout_s + cfg.max_retries * cfg.timeout_s + SLACK


def config(base_url: str, **kw) -> LLMConfig:
    settings = {"timeout_s": DEADLINE, "max_retries": RETRIES, "backoff_s": BACKOFF, "breaker_failures": 0,
                "max_response_bytes": 100_000, **kw}
    return LLMConfig(base_url=base_url, model="fake", **settings)


@pytest.fixture
def fake() -> Iterator[FakeLLM]:
    with FakeLLM(reply=GOOD_REPLY) as server:
        server.hang_s = 30.0  # far past any bound below
        server.drip_s = 0.05  # a ~300-byte reply takes about 15 s to drip in full
        yield server


def _closed_port_url() -> str:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


FAULTS = [
    # (fault, fake server mode, attempts that reach the server, what the log names)
    ("refused", None, 0, "connection error"),
    ("http_500", "error", 1 + RETRIES, "HTTP 500"),
    ("hang", "hang", 1 + RETRIES, "timed out"),
    ("drip", "drip", 1 + RETRIES, "timed out"),
    ("garbage_json", "garbage", 1, "unexpected body"),  # not retried: the same server answers the same
    ("missing_fields", "missing", 1, "unexpected body"),
    ("huge_body", "huge", 1, "max_response_bytes"),
    ("huge_chunked_body", "chunked", 1, "max_response_bytes"),  # HTTP/1.1 chunks: no Content-Length either
    ("429_retry_after", "ratelimit", 1 + RETRIES, "HTTP 429"),
]


@pytest.mark.parametrize(("fault", "mode", "requests", "reason"), FAULTS, ids=[f[0] for f in FAULTS])
def test_fault_is_bounded_and_visible(fake: FakeLLM, caplog: pytest.LogCaptureFixture, fault: str,
                                      mode: str | None, requests: int, reason: str) -> None:
    cfg = config(_closed_port_url() if mode is None else fake.base_url)
    fake.mode = mode or "ok"
    refiner = Refiner("llm", client=ChatClient(cfg))
    start = time.monotonic()
    with caplog.at_level(logging.WARNING):
        (trace, fell_back), = refiner.refine([SAMPLE], DEFAULT_TEMPLATE)
    elapsed = time.monotonic() - start
    assert elapsed < bound(cfg), f"{fault}: {elapsed:.2f} s, bound {bound(cfg):.2f} s"
    assert fell_back and trace == rule_refine(SAMPLE, DEFAULT_TEMPLATE)
    assert refiner.stats.fallbacks == 1 and refiner.fallback_log.count == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("1 fallback(s)" in w and reason in w for w in warnings), warnings
    assert fake.count == requests


def test_retry_after_is_honoured_and_capped_by_the_deadline(fake: FakeLLM) -> None:
    fake.mode = "ratelimit"
    fake.retry_after = "0.3"  # below the deadline: waited in full, although the backoff is shorter
    with pytest.raises(LLMError, match="HTTP 429"):
        ChatClient(config(fake.base_url)).chat([{"role": "user", "content": "hi"}])
    first, second = (r["at"] for r in fake.requests)
    assert second - first >= 0.3
    fake.requests.clear()
    fake.retry_after = "3600"  # an hour: capped by the deadline, so the request still ends in its bound
    cfg = config(fake.base_url)
    start = time.monotonic()
    with pytest.raises(LLMError, match="HTTP 429"):
        ChatClient(cfg).chat([{"role": "user", "content": "hi"}])
    assert time.monotonic() - start < bound(cfg) and fake.count == 2


def test_huge_declared_body_is_refused_without_reading(fake: FakeLLM) -> None:
    fake.reply = "x" * 200_000  # a normal reply with a Content-Length past the cap
    with pytest.raises(LLMError, match="max_response_bytes=100000"):
        ChatClient(config(fake.base_url)).chat([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("mode", ["huge", "chunked"])
def test_an_oversized_reply_without_content_length_is_cut_off_at_the_cap(fake: FakeLLM, mode: str) -> None:
    """50 MB sent without a Content-Length (to the connection's end, or in HTTP/1.1 chunks): reading stops just
    past the cap, in one line, long before the body could arrive whole; not retried."""
    fake.mode = mode
    cfg = config(fake.base_url)
    start = time.monotonic()
    with pytest.raises(LLMError) as e:
        ChatClient(cfg).chat([{"role": "user", "content": "hi"}])
    assert time.monotonic() - start < cfg.timeout_s + SLACK
    assert str(e.value).endswith("reply exceeds llm.max_response_bytes=100000; stopped reading")
    assert "\n" not in str(e.value) and fake.count == 1


def test_circuit_breaker_stops_calling_and_says_so_once(fake: FakeLLM, caplog: pytest.LogCaptureFixture) -> None:
    fake.mode = "error"
    cfg = config(fake.base_url, breaker_failures=2, breaker_cooldown_s=0.5)
    refiner = Refiner("llm", client=ChatClient(cfg), max_workers=1)
    samples = [Sample(**{**SAMPLE.to_dict(), "id": f"s{i}", "answer": str(i)}) for i in range(6)]
    with caplog.at_level(logging.WARNING):
        results = refiner.refine(samples, DEFAULT_TEMPLATE)
    assert all(fell_back for _, fell_back in results) and refiner.stats.fallbacks == 6
    assert fake.count == 2 * (1 + RETRIES)  # two failed requests, then no more calls
    opened = [r for r in caplog.records if "circuit breaker open" in r.getMessage() and r.levelno == logging.WARNING]
    assert len(opened) == 1 and "2 consecutive failed requests" in opened[0].getMessage()
    time.sleep(cfg.breaker_cooldown_s)
    fake.mode = "ok"  # the endpoint is back: after the cool-down one probe goes through and closes the breaker
    (trace, fell_back), = refiner.refine([samples[5]], DEFAULT_TEMPLATE)
    assert not fell_back and trace == GOOD_REPLY
    assert fake.count == 2 * (1 + RETRIES) + 2  # the probe (extract the hint's facts), then the rewrite


def _write_dataset(root: Path) -> Path:
    """A hint-only project-format dataset (no visual facts), as data.out_dir holds it."""
    (root / "images").mkdir(parents=True)
    samples = []
    for i, split in enumerate(["train", "train", "test"]):
        Image.new("RGB", (32, 32), (40 * i, 90, 160)).save(root / "images" / f"s{i}.png")
        samples.append(Sample(**{**SAMPLE.to_dict(), "id": f"s{i}", "image": f"images/s{i}.png", "split": split}))
    write_jsonl(samples, root / "samples.jsonl")
    return root


def _refine_args(tmp_path: Path, base_url: str, *extra: str) -> list[str]:
    return ["refine", f"data.out_dir={_write_dataset(tmp_path / 'data')}", "refine.backend=llm",
            f"refine.llm.base_url={base_url}", f"refine.llm.timeout_s={DEADLINE}", f"refine.llm.max_retries={RETRIES}",
            f"refine.llm.backoff_s={BACKOFF}", f"refine.out={tmp_path / 'refined' / 'targets.jsonl'}",
            f"refine.template_pool={tmp_path / 'refined' / 'templates.json'}",
            f"refine.cache_dir={tmp_path / 'cache'}", f"model.name_or_path={tmp_path / 'no-model'}", *extra]


def test_cli_on_failure_fail_is_one_line_and_keeps_the_key_secret(
        fake: FakeLLM, tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers.utils.logging  # noqa: F401 (the CLI's start-up import, outside the timed part)

    monkeypatch.setenv("DYME_LLM_API_KEY", "sk-test-do-not-print")
    fake.mode = "hang"
    start = time.monotonic()
    rc = cli.main(_refine_args(tmp_path, fake.base_url, "refine.llm.on_failure=fail"))
    assert time.monotonic() - start < bound(config(fake.base_url)) + 1.0  # + reading the dataset
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and err.startswith("dyme refine: error: ")
    assert "on_failure=fail" in err and "timed out" in err
    assert not (tmp_path / "refined" / "targets.jsonl").exists()  # nothing half-written
    assert fake.requests[0]["headers"]["Authorization"] == "Bearer sk-test-do-not-print"
    assert "sk-test-do-not-print" not in err + caplog.text


def test_cli_fallback_is_counted_and_logged(fake: FakeLLM, tmp_path: Path, capsys: pytest.CaptureFixture,
                                             caplog: pytest.LogCaptureFixture) -> None:
    fake.mode = "error"
    with caplog.at_level(logging.WARNING):
        rc = cli.main(_refine_args(tmp_path, fake.base_url))
    assert rc == 0
    stats = json.loads((tmp_path / "refined" / "refine_stats.json").read_text())
    assert stats["refiner/fallbacks"] == 2 and stats["n"] == 2  # the two train samples
    rows = [json.loads(line) for line in (tmp_path / "refined" / "targets.jsonl").read_text().splitlines()]
    assert [r["backend"] for r in rows] == ["rule", "rule"]
    assert any("2 of 2 samples refined by the rule refiner" in r.getMessage() and "HTTP 500" in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)
