"""OpenAI-compatible chat client plus the LLM options of the visual checker and the visual refiner.

DESIGN.md section 2: the thinking reward may come from an LLM judge that rates how well the thinking
uses the image's facts as low/medium/high -> 0/0.5/1 (:func:`judge_thinking`), and the refiner may be an
LLM that first extracts the visual facts stated in a hint, then rewrites a reference trace following the
current template (:func:`refine_with_llm`). Both talk to any ``/v1/chat/completions`` endpoint (vLLM,
TGI, llama.cpp server, OpenAI) through :class:`ChatClient`, which retries connection errors, timeouts,
429 and 5xx with exponential backoff and turns every other failure into one :class:`LLMError`, so callers
(the rule-based fallbacks) catch exactly one exception type.

Only the standard library and ``requests``. Tested against a local fake server: ``tests/core/test_llm.py``.
"""

from __future__ import annotations

import json
import re
import threading
import time

import requests

from dyme_core.config import LLMConfig

JUDGE_SYSTEM_PROMPT = (
    "You grade the reasoning of a vision-language model. You cannot see the image; you are given the "
    "facts that are true about it. Reply with exactly one word: low, medium or high."
)

JUDGE_PROMPT = """Visual facts of the image:
{facts}

Question: {question}
Answer given: {answer}

Thinking to grade:
{thinking}

How well does the thinking state and use the image's facts that matter for the question?
- high: states the relevant facts correctly and reasons from them to the answer.
- medium: uses some relevant facts, or has minor errors or omissions.
- low: states no relevant facts, wrong facts, or does not use the image at all.
Reply with exactly one word: low, medium or high."""

EXTRACT_SYSTEM_PROMPT = "You extract visual facts from text about an image. Be brief and exact."

EXTRACT_PROMPT = """Question about an image: {question}

Reasoning written by someone who saw the image:
{hint}

List every visual fact about the image that this reasoning states (values, labels, colours, counts,
objects and their attributes), one short bullet per fact starting with "- ". Copy numbers exactly.
Do not add facts that are not stated. Output only the bullet list."""

REWRITE_SYSTEM_PROMPT = (
    "You write short, grounded step-by-step reasoning for questions about images, following a given "
    "template exactly."
)

REWRITE_PROMPT = """Question about an image: {question}
Correct answer: {answer}

Visual facts of the image:
{facts}

Original reasoning (may be vague or incomplete):
{hint}

Template:
{template}

Rewrite the reasoning so that it follows the template's sections, in the same order, each section on
its own line starting with the section name and a colon. State the visual facts needed for the
question explicitly, with their exact values, and reason from them so that the conclusion is the
correct answer. Do not write an "Answer:" line. Output only the reasoning."""

_JUDGE_SCORES = {"low": 0.0, "medium": 0.5, "high": 1.0}
_JUDGE_WORD = re.compile(r"\b(low|medium|high)\b", re.IGNORECASE)
# A line that is an answer flag, allowing markdown around it: "Answer: 42", "**Answer:** 42".
_ANSWER_LINE = re.compile(r"^[\s*_#>]*answer[\s*_]*:", re.IGNORECASE)
_SECTION = re.compile(r"^\s*([^:\n]+?)\s*:")


class LLMError(RuntimeError):
    """The endpoint failed after all retries, refused the request, or answered something unusable."""


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ChatClient:
    """Thread-safe client for ``{base_url}/chat/completions``; one ``requests.Session`` per thread."""

    def __init__(self, cfg: LLMConfig, api_key: str | None = None) -> None:
        if not cfg.base_url:
            raise ValueError("llm.base_url is empty: set it to an OpenAI-compatible endpoint (.../v1)")
        self.cfg = cfg
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._local = threading.local()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

    def chat(self, messages: list[dict], *, max_tokens: int = 512, temperature: float = 0.0) -> str:
        """Send one chat completion request and return ``choices[0].message.content``.

        Retries ``cfg.max_retries`` times on connection errors, timeouts, 429 and 5xx, sleeping
        ``backoff_s * 2**attempt`` between attempts; other 4xx and malformed bodies fail at once.
        Raises :class:`LLMError` with a one-line message naming the URL and the reason.
        """
        payload = {"model": self.cfg.model, "messages": messages,
                   "max_tokens": max_tokens, "temperature": temperature}
        attempts = 1 + max(0, self.cfg.max_retries)
        reason = ""
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.cfg.backoff_s * 2 ** (attempt - 1))
            try:
                resp = self._session().post(self.url, json=payload, headers=self._headers,
                                            timeout=self.cfg.timeout_s)
            except requests.Timeout:
                reason = f"timed out after {self.cfg.timeout_s:g}s"
                continue
            except requests.ConnectionError as e:
                reason = f"connection error: {_one_line(str(e))}"
                continue
            except requests.RequestException as e:  # bad URL and the like: retrying will not help
                raise LLMError(f"POST {self.url} failed: {_one_line(str(e))}") from e
            if resp.status_code == 429 or resp.status_code >= 500:
                reason = f"HTTP {resp.status_code}: {_one_line(resp.text)}"
                continue
            if resp.status_code >= 400:
                raise LLMError(f"POST {self.url} failed: HTTP {resp.status_code}: {_one_line(resp.text)}")
            return self._content(resp)
        raise LLMError(f"POST {self.url} failed after {attempts} attempt(s): {reason}")

    def _content(self, resp: requests.Response) -> str:
        try:
            content = resp.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise LLMError(f"POST {self.url} returned an unexpected body: {_one_line(resp.text)}") from e
        if not isinstance(content, str):
            raise LLMError(f"POST {self.url} returned no text content: {_one_line(json.dumps(content))}")
        return content


def judge_thinking(client: ChatClient, facts: str, question: str, answer: str, thinking: str) -> float:
    """LLM visual checker: rate the thinking's use of the image's facts; low/medium/high -> 0/0.5/1.

    The reply may carry case, punctuation and surrounding text, but must name exactly one of the three
    words; otherwise (none, or several different ones) raises :class:`LLMError`.
    """
    prompt = JUDGE_PROMPT.format(facts=facts, question=question, answer=answer, thinking=thinking)
    reply = client.chat([{"role": "system", "content": JUDGE_SYSTEM_PROMPT},
                         {"role": "user", "content": prompt}], max_tokens=8)
    words = {w.lower() for w in _JUDGE_WORD.findall(reply)}
    if len(words) != 1:
        raise LLMError(f"judge reply is not one of low/medium/high: {_one_line(reply)!r}")
    return _JUDGE_SCORES[words.pop()]


def template_sections(template: str) -> list[str]:
    """Section names of a template, in order: "Goal: ...\\nObservation: ..." -> ["Goal", "Observation"]."""
    return [m.group(1) for line in template.splitlines() if (m := _SECTION.match(line))]


def strip_answer_lines(trace: str) -> str:
    """Drop "Answer: ..." lines (the training target appends its own single answer flag)."""
    lines = [line for line in trace.splitlines() if not _ANSWER_LINE.match(line)]
    return "\n".join(lines).strip()


def refine_with_llm(client: ChatClient, *, question: str, answer: str, template: str,
                    facts: str | None, hint: str | None) -> str:
    """LLM visual refiner: a reference trace in the template's sections, stating the facts.

    With ``facts`` None, one call first extracts the visual facts stated in ``hint`` as a bullet list;
    a second call rewrites the trace. The result carries no "Answer:" line. Raises :class:`LLMError`
    when a reply is empty or the trace lacks the template's first section; ``ValueError`` when neither
    facts nor a hint is given (there is nothing to ground the trace in).
    """
    sections = template_sections(template)
    if not sections:
        raise ValueError(f"template has no 'Name:' sections: {_one_line(template)!r}")
    if facts is None:
        if not hint:
            raise ValueError("refine_with_llm needs visual facts or a hint to extract them from")
        extract = EXTRACT_PROMPT.format(question=question, hint=hint)
        facts = client.chat([{"role": "system", "content": EXTRACT_SYSTEM_PROMPT},
                             {"role": "user", "content": extract}]).strip()
        if not facts:
            raise LLMError("fact extraction returned an empty reply")
    prompt = REWRITE_PROMPT.format(question=question, answer=answer, facts=facts,
                                   hint=hint or "(none)", template=template)
    reply = client.chat([{"role": "system", "content": REWRITE_SYSTEM_PROMPT},
                         {"role": "user", "content": prompt}])
    trace = strip_answer_lines(reply)
    if not trace:
        raise LLMError("rewrite returned an empty trace")
    if sections[0].lower() not in trace.lower():
        raise LLMError(f"rewrite lacks the template's first section {sections[0]!r}: {_one_line(trace)!r}")
    return trace
