"""No secret is written anywhere (issue 10, item 5).

Credentials in a config value (user:password@host in `llm.base_url` or any other URL, a token in a
query, the key itself in `llm.api_key_env`) are refused with one line that points at the environment
variable and never echoes the value: the config is what lands in config.yaml, MLflow params and
dvc.lock (DVC records params only after a stage succeeds). The key given the supported way, through
the environment, reaches the endpoint and no file of the run.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dyme_core import cli

PASSWORD = "hunter2-s3cr3t"


def _run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    rc = cli.main(argv)
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


# (command, override) -> the key the one-line error must name
REFUSED = [
    ("train", f"train.llm.base_url=http://bob:{PASSWORD}@llm.internal:8000/v1", "train.llm.base_url"),
    ("train", f"train.llm.base_url=https://{PASSWORD}@llm.internal/v1", "train.llm.base_url"),
    ("refine", f"refine.llm.base_url=http://bob:{PASSWORD}@llm.internal:8000/v1", "refine.llm.base_url"),
    ("train", f"train.llm.base_url=http://llm.internal/v1?api_key={PASSWORD}", "train.llm.base_url"),
    ("register", f"register.tracking_uri=https://alice:{PASSWORD}@mlflow.internal", "register.tracking_uri"),
    ("train", f"train.llm.api_key_env=sk-{PASSWORD}", "train.llm.api_key_env"),
]


@pytest.mark.parametrize(("command", "override", "key"), REFUSED)
def test_credentials_in_the_config_are_refused_in_one_line(command: str, override: str, key: str, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    rc, text = _run_cli([command, f"train.output_dir={out}", override], capsys)
    assert rc == 2
    assert len(text.strip().splitlines()) == 1 and "Traceback" not in text
    assert key in text
    assert PASSWORD not in text  # the message names the key, never the value
    if "base_url" in key:
        assert f"{key.removesuffix('base_url')}api_key_env" in text  # where the key belongs instead
    assert not out.exists()


def test_credentials_in_a_params_file_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(f"train:\n  output_dir: {tmp_path / 'run'}\n  llm:\n"
                      f"    base_url: http://bob:{PASSWORD}@llm.internal:8000/v1\n")
    rc, text = _run_cli(["train", "--config", str(params)], capsys)
    assert rc == 2 and PASSWORD not in text and "train.llm.api_key_env" in text
    assert not (tmp_path / "run").exists()


class _Judge(BaseHTTPRequestHandler):
    """An OpenAI-compatible judge on loopback that rates every thinking 'high' and records the key."""

    seen_keys: list[str] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        _Judge.seen_keys.append(self.headers.get("Authorization", ""))
        body = json.dumps({"id": "1", "object": "chat.completion", "model": "judge", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "high"}, "finish_reason": "stop"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def judge() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Judge.seen_keys.clear()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_the_api_key_from_the_environment_reaches_the_endpoint_and_no_file(
        tiny: dict, overrides, judge: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("DYME_LLM_API_KEY", PASSWORD)
    out = tmp_path / "run"
    rc, text = _run_cli(["train", *overrides(out, "train.max_steps=2", "train.save_steps=1", "train.checker=llm",
                                             f"train.llm.base_url={judge}")], capsys)
    assert rc == 0, text
    assert _Judge.seen_keys and set(_Judge.seen_keys) == {f"Bearer {PASSWORD}"}
    assert PASSWORD not in text
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in files) and any(p.parent.name.startswith("checkpoint-") for p in files)
    leaked = [str(p.relative_to(tmp_path)) for p in files if PASSWORD.encode() in p.read_bytes()]
    assert not leaked


def test_credentials_in_mlflow_tracking_uri_from_the_environment_are_refused(
        tiny: dict, overrides, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """MLFLOW_TRACKING_URI fills register.tracking_uri after the config is read; the run refuses it
    before writing anything (config.yaml and the MLflow params would carry it)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"https://alice:{PASSWORD}@mlflow.internal")
    out = tmp_path / "run"
    rc, text = _run_cli(["train", *overrides(out, "train.max_steps=1")], capsys)
    assert rc == 2 and "MLFLOW_TRACKING_PASSWORD" in text and PASSWORD not in text
    assert len(text.strip().splitlines()) == 1
    leaked = [str(p) for p in tmp_path.rglob("*") if p.is_file() and PASSWORD.encode() in p.read_bytes()]
    assert not leaked and not out.exists()
