"""ChatClient retries and errors, the LLM judge's mapping and the LLM refiner, against a fake server.

Every endpoint fault class with its time bound lives in tests/reliability/test_llm_faults.py."""

from __future__ import annotations

import asyncio
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fake_llm import FakeLLM

from dyme_core.config import LLMConfig
from dyme_core.llm import ChatClient, LLMError, _retry_after_s, judge_thinking, redact_url, refine_with_llm

pytestmark = pytest.mark.server

TEMPLATE = "Goal: what is asked\nObservation: the facts\nReasoning: the steps\nConclusion: the result"
MSG = [{"role": "user", "content": "hi"}]


def client_for(fake: FakeLLM, api_key: str | None = None, **kw: float) -> ChatClient:
    cfg = LLMConfig(base_url=fake.base_url, model="fake-model",
                    **{"timeout_s": 0.2, "max_retries": 1, "backoff_s": 0.01, **kw})
    return ChatClient(cfg, api_key=api_key)


def test_ok_returns_content_and_sends_model(fake_llm: FakeLLM) -> None:
    fake_llm.reply = lambda messages: "echo: " + messages[-1]["content"]
    assert client_for(fake_llm).chat(MSG, max_tokens=7) == "echo: hi"
    body = fake_llm.requests[0]["body"]
    assert (body["model"], body["max_tokens"], body["temperature"]) == ("fake-model", 7, 0.0)


def test_concurrent_requests_from_threads(fake_llm: FakeLLM) -> None:
    fake_llm.reply = lambda messages: messages[-1]["content"].upper()
    client = client_for(fake_llm, timeout_s=5.0)
    with ThreadPoolExecutor(max_workers=4) as pool:
        out = list(pool.map(lambda i: client.chat([{"role": "user", "content": f"q{i}"}]), range(16)))
    assert out == [f"Q{i}" for i in range(16)]


def test_api_key_sent_as_bearer(fake_llm: FakeLLM) -> None:
    client_for(fake_llm, api_key="s3cret").chat(MSG)
    client_for(fake_llm).chat(MSG)
    assert fake_llm.requests[0]["headers"]["Authorization"] == "Bearer s3cret"
    assert "Authorization" not in fake_llm.requests[1]["headers"]


def test_500_retried_then_error(fake_llm: FakeLLM) -> None:
    fake_llm.mode = "error"
    with pytest.raises(LLMError, match=r"chat/completions.*3 attempt.*HTTP 500"):
        client_for(fake_llm, max_retries=2).chat(MSG)
    assert fake_llm.count == 3  # 1 + max_retries


def test_500_once_then_ok_succeeds(fake_llm: FakeLLM) -> None:
    fake_llm.queue = ["error"]
    fake_llm.reply = "fine"
    assert client_for(fake_llm).chat(MSG) == "fine"
    assert fake_llm.count == 2


def test_4xx_not_retried() -> None:
    with FakeLLM() as fake:
        client = ChatClient(LLMConfig(base_url=fake.base_url + "/wrong", max_retries=3, backoff_s=0.01))
        with pytest.raises(LLMError, match="HTTP 404"):
            client.chat(MSG)
        assert fake.count == 1


def test_hang_times_out_within_budget(fake_llm: FakeLLM) -> None:
    fake_llm.mode = "hang"
    start = time.monotonic()
    with pytest.raises(LLMError, match="timed out"):
        client_for(fake_llm).chat(MSG)
    assert time.monotonic() - start < 0.2 * 2 + 0.6  # timeout * (retries + 1) plus slack
    assert fake_llm.count == 2


def test_connection_refused() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = ChatClient(LLMConfig(base_url=f"http://127.0.0.1:{port}/v1", timeout_s=0.5,
                                  max_retries=1, backoff_s=0.01))
    with pytest.raises(LLMError, match=f"127.0.0.1:{port}.*connection error"):
        client.chat(MSG)


@pytest.mark.parametrize("body", [b"<html>oops</html>", b'{"object": "error"}', b'{"choices": []}'])
def test_garbage_raises(fake_llm: FakeLLM, body: bytes) -> None:
    fake_llm.mode = "garbage"
    fake_llm.garbage_body = body
    with pytest.raises(LLMError, match="unexpected body"):
        client_for(fake_llm).chat(MSG)


@pytest.mark.parametrize("reply, score", [
    ("low", 0.0),
    ("medium", 0.5),
    ("high", 1.0),
    ("High.", 1.0),                          # case and punctuation
    ("Rating: **MEDIUM**", 0.5),             # surrounding text with exactly one word
    ("The grounding is low\n", 0.0),
    ("excellent", None),                     # garbage: none of the words
    ("", None),                              # empty
    ("medium or high", None),                # ambiguous: two different words
])
def test_judge_mapping(fake_llm: FakeLLM, reply: str, score: float | None) -> None:
    fake_llm.reply = reply
    client = client_for(fake_llm)
    if score is None:
        with pytest.raises(LLMError):
            judge_thinking(client, "A=3", "What is A?", "3", "A is 3")
    else:
        assert judge_thinking(client, "A=3", "What is A?", "3", "A is 3") == score
    prompt = fake_llm.requests[0]["body"]["messages"][-1]["content"]
    assert "A=3" in prompt and "What is A?" in prompt and "A is 3" in prompt


def _refiner_reply(messages: list[dict]) -> str:
    if "bullet" in messages[-1]["content"]:
        return "- Apples: 30\n- Pears: 20"
    return ("Goal: find which fruit sold more.\nObservation: Apples 30, Pears 20.\n"
            "Reasoning: 30 > 20.\nConclusion: Apples sold more.\nAnswer: Apples")


def test_refine_extracts_then_rewrites(fake_llm: FakeLLM) -> None:
    fake_llm.reply = _refiner_reply
    trace = refine_with_llm(client_for(fake_llm), question="Which sold more?", answer="Apples",
                            template=TEMPLATE, facts=None, hint="Apples bar is 30, pears 20.")
    assert fake_llm.count == 2
    assert trace.startswith("Goal:") and trace.endswith("Conclusion: Apples sold more.")
    assert "Answer:" not in trace
    rewrite_prompt = fake_llm.requests[1]["body"]["messages"][-1]["content"]
    assert "- Apples: 30" in rewrite_prompt and TEMPLATE in rewrite_prompt


def test_refine_with_facts_single_call(fake_llm: FakeLLM) -> None:
    fake_llm.reply = _refiner_reply
    trace = refine_with_llm(client_for(fake_llm), question="Which sold more?", answer="Apples",
                            template=TEMPLATE, facts="Apples=30; Pears=20", hint=None)
    assert fake_llm.count == 1
    assert "Observation: Apples 30" in trace and "Answer" not in trace


@pytest.mark.parametrize("reply", ["", "Answer: Apples", "Sure! Apples sold more."])
def test_refine_garbage_raises(fake_llm: FakeLLM, reply: str) -> None:
    fake_llm.reply = reply
    with pytest.raises(LLMError):
        refine_with_llm(client_for(fake_llm), question="q", answer="a", template=TEMPLATE,
                        facts="x=1", hint=None)


def test_credentials_in_the_url_never_reach_a_message() -> None:
    assert redact_url("https://bob:hunter2@llm.example:8443/v1?x=1") == "https://llm.example:8443/v1?x=1"
    assert redact_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"
    assert redact_url("http://bob:hunter2@[::1]:8000/v1") == "http://[::1]:8000/v1"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = ChatClient(LLMConfig(base_url=f"http://bob:hunter2@127.0.0.1:{port}/v1", timeout_s=0.5,
                                  max_retries=0))
    with pytest.raises(LLMError) as e:
        client.chat(MSG)
    assert "hunter2" not in str(e.value) and f"127.0.0.1:{port}" in str(e.value)


@pytest.mark.parametrize(("header", "seconds"), [
    ("2", 2.0),                                  # delta-seconds
    ("0.5", 0.5),
    ("-3", 0.0),                                 # never negative
    ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),      # an HTTP date in the past: go now
    ("soon", None),                              # unreadable: the backoff decides
    (None, None),
])
def test_retry_after_header(header: str | None, seconds: float | None) -> None:
    assert _retry_after_s(header) == seconds


def test_chat_from_inside_a_running_event_loop(fake_llm: FakeLLM) -> None:
    fake_llm.reply = "from a notebook"

    async def notebook_cell() -> str:  # a notebook runs cells inside an event loop
        return client_for(fake_llm).chat(MSG)

    assert asyncio.run(notebook_cell()) == "from a notebook"
