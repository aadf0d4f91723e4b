"""`submit` (what `dyme submit` calls) against a fake KFP API on 127.0.0.1: it creates the experiment
and one run that carries the compiled pipeline (as committed) and the params file's text and overrides.

The fake implements only what kfp.Client 2.17 calls for this: GET healthz, GET (list) and POST
experiments, POST runs, all under /apis/v2beta1.
"""

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from dyme_core.cli import main
from dyme_core.config import ConfigError
from pipelines.dyme_pipeline import COMPILED, submit

pytestmark = [pytest.mark.server, pytest.mark.filterwarnings("ignore:This client only works:FutureWarning")]

ROOT = Path(__file__).resolve().parents[2]
API = "/apis/v2beta1"


class FakeKFP(BaseHTTPRequestHandler):
    requests: list[tuple[str, str, dict]]  # (method, path without query, JSON body)

    def _reply(self, body: dict, status: int = 200) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self, method: str) -> None:
        path = self.path.split("?")[0]
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else {}
        self.requests.append((method, path, body))
        routes = {
            ("GET", f"{API}/healthz"): {"multi_user": False},
            ("GET", f"{API}/experiments"): {},  # no experiment of that name yet
            ("POST", f"{API}/experiments"): {"experiment_id": "exp-1", "display_name": body.get("display_name")},
            ("POST", f"{API}/runs"): {"run_id": "run-1", "experiment_id": body.get("experiment_id"),
                                      "display_name": body.get("display_name")},
        }
        if (method, path) in routes:
            self._reply(routes[method, path])
        else:
            self._reply({"error": f"not faked: {method} {path}"}, status=404)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def kfp_api() -> Iterator[tuple[str, list]]:
    """(host URL, list of the requests it received)."""
    handler = type("Handler", (FakeKFP,), {"requests": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", handler.requests
    server.shutdown()
    server.server_close()


def _run_body(requests: list) -> dict:
    [run] = [body for method, path, body in requests if (method, path) == ("POST", f"{API}/runs")]
    return run


def test_submit_sends_the_compiled_pipeline_with_params_and_overrides(kfp_api: tuple[str, list]) -> None:
    host, requests = kfp_api
    run_id = submit(host, experiment="dyme-test", params_file=ROOT / "params.yaml", overrides=["train.max_steps=3"])

    assert run_id == "run-1"
    [experiment] = [body for method, path, body in requests if (method, path) == ("POST", f"{API}/experiments")]
    assert experiment["display_name"] == "dyme-test"
    run = _run_body(requests)
    assert run["experiment_id"] == "exp-1"
    pipeline_spec, platform_spec = yaml.safe_load_all(COMPILED.read_text())
    assert run["pipeline_spec"] == {"pipeline_spec": pipeline_spec, "platform_spec": platform_spec}
    assert run["runtime_config"]["parameters"] == {
        "params": (ROOT / "params.yaml").read_text(),
        "overrides": ["train.max_steps=3"],
        "use_tiny_model": True,  # params.yaml trains the model init_model builds
    }


def test_submit_with_a_hub_model_skips_the_tiny_model(kfp_api: tuple[str, list]) -> None:
    host, requests = kfp_api
    submit(host, params_file=ROOT / "params.yaml", overrides=["model.name_or_path=HuggingFaceTB/SmolVLM-256M-Instruct"])
    assert _run_body(requests)["runtime_config"]["parameters"]["use_tiny_model"] is False


def test_submit_refuses_a_bad_config_before_contacting_the_cluster(kfp_api: tuple[str, list]) -> None:
    host, requests = kfp_api
    with pytest.raises(ConfigError, match="train.max_stepz"):
        submit(host, params_file=ROOT / "params.yaml", overrides=["train.max_stepz=3"])
    assert requests == []


def test_dyme_submit_cli_prints_the_run_id(kfp_api: tuple[str, list], capsys: pytest.CaptureFixture) -> None:
    host, requests = kfp_api
    assert main(["submit", "--host", host, "--experiment", "cli", "--config", str(ROOT / "params.yaml"),
                 "train.max_steps=3"]) == 0
    assert f"submitted run run-1 to {host}" in capsys.readouterr().out
    assert _run_body(requests)["runtime_config"]["parameters"]["overrides"] == ["train.max_steps=3"]
