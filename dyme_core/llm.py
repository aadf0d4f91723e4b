"""OpenAI-compatible chat client plus the LLM options of the visual checker and the visual refiner.

DESIGN.md section 2: the thinking reward may come from an LLM judge that rates how well the thinking
uses the image's facts as low/medium/high -> 0/0.5/1 (:func:`judge_thinking`), and the refiner may be an
LLM that first extracts the visual facts stated in a hint, then rewrites a reference trace following the
current template (:func:`refine_with_llm`). Both talk to any ``/v1/chat/completions`` endpoint (vLLM,
TGI, llama.cpp server, OpenAI) through :class:`ChatClient`.

The client is built for an endpoint that misbehaves (issue 10): every attempt has ONE total deadline
(connect, send, wait and read the whole reply: a server that drips one byte a second is cut off at the
deadline, which a per-read socket timeout would never do), the reply is streamed and abandoned past
``max_response_bytes``, connection errors, timeouts, 429 and 5xx are retried by ``tenacity`` with
exponential backoff and jitter (a ``Retry-After`` header is honoured, capped by the deadline), and after
``breaker_failures`` consecutive failed requests a circuit breaker stops calling the endpoint for
``breaker_cooldown_s`` (logged once when it opens). Every failure is one :class:`LLMError`, so callers
(the rule-based fallbacks) catch exactly one exception type; :class:`FallbackLog` makes their fallbacks
visible in the log. ``httpx`` (async, so the deadline cancels the request wherever it is) and ``tenacity``.

Tested against loopback fake servers: ``tests/core/test_llm.py`` and ``tests/reliability/test_llm_faults.py``.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import logging
import math
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import tenacity

from dyme_core.config import LLMConfig, redact_credentials

log = logging.getLogger(__name__)

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


class _Retryable(LLMError):
    """A failure worth another attempt (connection, deadline, 429, 5xx), with the server's Retry-After."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def redact_url(url: str) -> str:
    """The URL without user:password@ (with or without a scheme) and with *** for the value of every secret
    query or fragment parameter: what may be shown in a message or a log (config.credential_spans)."""
    return redact_credentials(url)


def image_part(data: bytes, mime: str) -> dict:
    """An OpenAI ``image_url`` content part carrying ``data`` inline as a base64 data URL."""
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{base64.b64encode(data).decode()}"}}


def _retry_after_s(value: str | None) -> float | None:
    """Seconds a Retry-After header asks for (delta-seconds or an HTTP date); None if absent or unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


class ChatClient:
    """Thread-safe client for ``{base_url}/chat/completions`` with a deadline, retries and a circuit breaker.

    Each :meth:`chat` runs its attempts on a private event loop in the calling thread, so a thread pool of
    callers (the checker and refiner) gets concurrent requests; the breaker's state is shared by all.
    """

    def __init__(self, cfg: LLMConfig, api_key: str | None = None) -> None:
        if not cfg.base_url:
            raise ValueError("llm.base_url is empty: set it to an OpenAI-compatible endpoint (.../v1)")
        self.cfg = cfg
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self.shown_url = redact_url(self.url)
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._ssl = httpx.create_ssl_context()  # once: building it costs milliseconds per request
        self._backoff = tenacity.wait_exponential_jitter(initial=cfg.backoff_s, jitter=cfg.backoff_s,
                                                         max=max(cfg.backoff_s, cfg.timeout_s))
        self._lock = threading.Lock()
        self._failures = 0  # consecutive failed requests
        self._open_until = 0.0  # monotonic time the breaker lets one probe through again
        self._probing = False
        self._breaker_opened = 0  # how often it opened (the first time is a warning, later ones info)

    # ------------------------------------------------------------------ public
    def chat(self, messages: list[dict], *, max_tokens: int = 512, temperature: float = 0.0,
             model: str | None = None) -> str:
        """Send one chat completion request and return ``choices[0].message.content``.

        A message's ``content`` is a string or a list of OpenAI content parts (``{"type": "text", ...}``,
        ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}``: see
        :func:`image_part`); ``model`` replaces ``cfg.model`` for this request (a vision model served by
        the same endpoint).

        Up to ``1 + cfg.max_retries`` attempts, each bounded by ``cfg.timeout_s`` in total; connection
        errors, deadlines, 429 and 5xx are retried after an exponential backoff with jitter (or the
        server's Retry-After, capped by the deadline); other 4xx, malformed and oversized replies fail at
        once. Raises :class:`LLMError` with a one-line message naming the URL and the reason, also
        without calling while the circuit breaker is open.
        """
        self._before_call()
        payload = {"model": model or self.cfg.model, "messages": messages,
                   "max_tokens": max_tokens, "temperature": temperature}
        try:
            content = self._run(payload)
        except LLMError as e:
            self._after_call(failure=str(e))
            raise
        except BaseException:
            self._after_call(failure="interrupted")
            raise
        self._after_call(failure=None)
        return content

    # ------------------------------------------------------------------ one request
    def _run(self, payload: dict) -> str:
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # the usual case: no event loop in this thread
            return asyncio.run(self._chat(payload))
        # called from inside a running event loop (a notebook): a private loop in a helper thread
        with ThreadPoolExecutor(max_workers=1) as pool:
            return pool.submit(asyncio.run, self._chat(payload)).result()

    async def _chat(self, payload: dict) -> str:
        attempts = 1 + max(0, self.cfg.max_retries)
        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(attempts),
            wait=self._wait,
            retry=tenacity.retry_if_exception_type(_Retryable),
            before_sleep=lambda s: log.debug("LLM %s: attempt %d failed (%s); retrying", self.shown_url,
                                             s.attempt_number, s.outcome.exception() if s.outcome else ""),
            reraise=True,
        )
        async with httpx.AsyncClient(verify=self._ssl, timeout=self.cfg.timeout_s) as http:
            try:
                async for attempt in retrying:
                    with attempt:
                        return await self._attempt(http, payload)
            except _Retryable as e:
                raise LLMError(f"POST {self.shown_url} failed after {attempts} attempt(s): {e}") from None
        raise AssertionError("unreachable: tenacity returns or raises")

    async def _attempt(self, http: httpx.AsyncClient, payload: dict) -> str:
        deadline = self.cfg.timeout_s
        try:
            # One deadline over the whole exchange: asyncio cancels connect, send, wait and read alike.
            async with asyncio.timeout(deadline):
                async with http.stream("POST", self.url, json=payload, headers=self._headers) as resp:
                    body = await self._read_capped(resp)
        except (TimeoutError, httpx.TimeoutException):
            raise _Retryable(f"timed out: no complete reply within the {deadline:g} s deadline") from None
        except (httpx.UnsupportedProtocol, httpx.InvalidURL) as e:  # retrying will not help
            raise LLMError(f"POST {self.shown_url} failed: {_one_line(str(e))}") from None
        except httpx.TransportError as e:
            raise _Retryable(f"connection error: {_one_line(str(e) or type(e).__name__)}") from None
        text = body.decode("utf-8", errors="replace")
        if resp.status_code == 429 or resp.status_code >= 500:
            raise _Retryable(f"HTTP {resp.status_code}: {_one_line(text)}",
                             _retry_after_s(resp.headers.get("retry-after")))
        if resp.status_code >= 400:
            raise LLMError(f"POST {self.shown_url} failed: HTTP {resp.status_code}: {_one_line(text)}")
        return self._content(body)

    async def _read_capped(self, resp: httpx.Response) -> bytes:
        """The body, streamed; abandoned as soon as it passes ``max_response_bytes`` (decoded size)."""
        limit = self.cfg.max_response_bytes
        declared = resp.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise LLMError(f"POST {self.shown_url}: reply of {declared} bytes exceeds "
                           f"llm.max_response_bytes={limit}")
        body = bytearray()
        async for chunk in resp.aiter_bytes():
            body += chunk
            if len(body) > limit:
                raise LLMError(f"POST {self.shown_url}: reply exceeds llm.max_response_bytes={limit}; "
                               "stopped reading")
        return bytes(body)

    def _content(self, body: bytes) -> str:
        try:
            content = json.loads(body)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            shown = _one_line(body.decode("utf-8", errors="replace"))
            raise LLMError(f"POST {self.shown_url} returned an unexpected body: {shown}") from e
        if not isinstance(content, str):
            raise LLMError(f"POST {self.shown_url} returned no text content: {_one_line(json.dumps(content))}")
        return content

    def _wait(self, state: tenacity.RetryCallState) -> float:
        backoff = self._backoff(state)
        error = state.outcome.exception() if state.outcome else None
        if isinstance(error, _Retryable) and error.retry_after is not None:
            # The server said when to come back; honour it, but never wait longer than one deadline.
            return min(max(backoff, error.retry_after), self.cfg.timeout_s)
        return backoff

    # ------------------------------------------------------------------ circuit breaker
    def _before_call(self) -> None:
        limit = self.cfg.breaker_failures
        if limit <= 0:
            return
        with self._lock:
            if self._failures < limit:
                return
            now = time.monotonic()
            if now >= self._open_until and not self._probing:
                self._probing = True  # cooled down: exactly one request probes the endpoint
                return
            wait = max(0.0, self._open_until - now)
        raise LLMError(f"circuit breaker open after {self._failures} consecutive failed requests to "
                       f"{self.shown_url}; not calling it for {wait:.0f} s")

    def _after_call(self, failure: str | None) -> None:
        with self._lock:
            self._probing = False
            if failure is None:
                if self._breaker_opened and self._failures >= self.cfg.breaker_failures > 0:
                    log.info("LLM %s answers again; circuit breaker closed", self.shown_url)
                self._failures = 0
                return
            self._failures += 1
            limit = self.cfg.breaker_failures
            if limit <= 0 or self._failures < limit:
                return
            self._open_until = time.monotonic() + self.cfg.breaker_cooldown_s
            self._breaker_opened += 1
            first = self._breaker_opened == 1
        (log.warning if first else log.info)(
            "LLM %s: %d consecutive failed requests (last: %s); circuit breaker open, not calling it for "
            "%g s (callers fall back or fail per llm.on_failure)", self.shown_url, self._failures,
            _one_line(failure, 160), self.cfg.breaker_cooldown_s)


class FallbackLog:
    """Counts one LLM use's fallbacks and keeps them visible: a warning at the 1st, 10th, 100th, ...

    Each warning carries the count so far and the first reason, so a run that fell back is never silent
    and a run that falls back on every call does not flood the log.
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self.count = 0
        self.first_reason = ""
        self._lock = threading.Lock()

    def record(self, reason: str) -> None:
        with self._lock:
            self.count += 1
            self.first_reason = self.first_reason or _one_line(reason)
            count, first = self.count, self.first_reason
        if math.log10(count).is_integer():
            log.warning("%s: %d fallback(s) so far; first reason: %s", self.what, count, first)

    def summary(self) -> str:
        return f"{self.what}: {self.count} fallback(s); first reason: {self.first_reason}" if self.count else ""


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
