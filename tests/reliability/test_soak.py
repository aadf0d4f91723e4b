"""A long run under repeated faults (issue 22, item 6): 200 short steps of the tiniest model with the LLM
judge (train.checker=llm, tests/core/fake_llm.py) failing on a schedule and MLflow (real, on SQLite) failing
on a schedule, then `sync`. Checked: the run finishes; every LLM failure is a counted fallback (the breaker
opens and closes again as the endpoint comes and goes); every step's metrics end up in MLflow exactly once,
also when the first `sync` is cut off half-way by another outage (buffered rows carry their own timestamps,
so a repeated send is the same row, not a second one).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

from dyme_core.config import load_config
from dyme_core.llm import ChatClient
from dyme_core.trainer import DymeTrainer
from tests.core.fake_llm import FakeLLM

STEPS = 200


class LLMSchedule:
    """The judge endpoint over time: down (HTTP 500) for 0.8 s of every 2.5 s, a garbage body every 37th
    request; `modes` records what each request got."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.modes: list[str] = []

    def __call__(self, n: int) -> str:
        down = (time.monotonic() - self.start) % 2.5 > 1.7
        mode = "error" if down else "garbage" if n % 37 == 36 else "ok"
        self.modes.append(mode)
        return mode


class FlakyMlflow:
    """MlflowClient.log_batch failing at the scheduled call numbers (1-based), as a server that goes away."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.calls, self.failed, self.fail_at = 0, 0, set()
        real = MlflowClient.log_batch

        def log_batch(client, run_id, *args, **kwargs):
            self.calls += 1
            if self.calls in self.fail_at:
                self.failed += 1
                raise MlflowException("simulated outage: 503 Service Unavailable")
            return real(client, run_id, *args, **kwargs)

        monkeypatch.setattr(MlflowClient, "log_batch", log_batch)


@pytest.mark.slow
@pytest.mark.server
def test_soak_200_steps_with_llm_and_mlflow_failing(tiny: dict, overrides, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    from mlflow.tracking import MlflowClient

    from dyme_core import tracking

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    out = tmp_path / "run"
    flaky = FlakyMlflow(monkeypatch)
    flaky.fail_at = {41, 42, 43}  # the server goes away at the 41st call (step 39): the rest is buffered
    start = time.monotonic()
    with FakeLLM(reply="high") as fake, caplog.at_level(logging.WARNING):
        fake.schedule = schedule = LLMSchedule()
        cfg = load_config(None, overrides(
            out, f"train.max_steps={STEPS}", "train.batch_size=1", "train.num_generations=2",
            "train.max_new_tokens=4", "train.save_steps=50", "train.checker=llm", f"train.llm.base_url={fake.base_url}",
            "train.llm.timeout_s=2", "train.llm.max_retries=0", "train.llm.breaker_failures=3",
            "train.llm.breaker_cooldown_s=0.2", "train.report_to=[jsonl,mlflow]", f"register.tracking_uri={uri}",
            "register.on_unreachable=buffer"))
        trainer = DymeTrainer(cfg, tiny["dataset"], llm_client=ChatClient(cfg.train.llm))
        trainer.train()
        modes = list(schedule.modes)
    requests, failed = len(modes), sum(m != "ok" for m in modes)
    train_s = time.monotonic() - start

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    last = trainer.history[-1]
    llm_calls, fallbacks = int(last["checker/llm_calls"]), int(last["checker/fallbacks"])
    assert failed > 0 and fallbacks >= failed  # every failed request fell back (and more while the breaker was open)
    assert any("circuit breaker open" in r.getMessage() for r in caplog.records)
    # the endpoint came back and was used again after each outage: the breaker closed every time
    outages = sum(1 for a, b in zip(modes, modes[1:], strict=False) if a == "ok" and b == "error")
    recoveries = sum(1 for a, b in zip(modes, modes[1:], strict=False) if a == "error" and b == "ok")
    assert outages >= 2 and recoveries >= outages - 1  # the last outage may last to the end of the run

    buffered = [json.loads(line) for line in (out / tracking.BUFFER_FILE).read_text().splitlines()]
    tail = [r["step"] for r in buffered if "step" in r]  # from the step the outage began to the end
    assert 1 < tail[0] and tail == list(range(tail[0], STEPS + 1))

    # the first sync meets another outage at its third batch; the second one completes
    flaky.fail_at = {flaky.calls + 3}
    with pytest.raises(Exception, match="simulated outage"):
        tracking.sync(cfg, out)
    result = tracking.sync(cfg, out)
    assert result["status"] == "FINISHED" and not (out / tracking.BUFFER_FILE).exists()

    client = MlflowClient(uri)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    keys = [k for k in rows[0] if isinstance(rows[0][k], int | float)]
    for key in keys:
        history = client.get_metric_history(run.info.run_id, key)
        steps = [m.step for m in history]
        assert sorted(steps) == list(range(1, STEPS + 1)), (key, len(steps))  # each step once
    print(f"\nsoak: {STEPS} steps in {train_s:.1f} s; LLM: {requests} requests, {failed} failed by schedule in "
          f"{outages} outages, {recoveries} recoveries, {llm_calls} judge calls, {fallbacks} fallbacks; "
          f"MLflow: {flaky.failed} failed calls, "
          f"{len(buffered)} buffered rows, {len(keys)} metrics x {STEPS} steps each once after 2 syncs")
