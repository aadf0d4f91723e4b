"""`dyme-submit` (pipelines/submit.py) against a fake KFP API on 127.0.0.1: it creates the experiment
and one run that carries the compiled pipeline (as committed, or on another image) and the params
sections merged with the overrides; a dead host or a bad key is one line on stderr.

The fake implements only what kfp.Client 2.17 calls for this: GET healthz, GET (list) and POST
experiments, POST runs, all under /apis/v2beta1.
"""

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from dyme_core.config import ConfigError, load_config
from pipelines.dyme_pipeline import COMPILED, sections
from pipelines.submit import main, submit

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
    parameters = run["runtime_config"]["parameters"]
    expected = sections(load_config(ROOT / "params.yaml", ["train.max_steps=3"]))
    expected["register"]["git_commit"] = parameters["register"]["git_commit"]
    assert len(parameters["register"]["git_commit"]) == 40  # the submitting checkout's HEAD, for MLflow
    assert {k: parameters[k] for k in expected} == json.loads(json.dumps(expected))
    assert parameters["train"]["max_steps"] == 3  # the override, merged before the cluster sees it
    assert parameters["use_tiny_model"] is False  # params.yaml trains models/chart-base, which the image carries
    assert parameters["data_path"] == ""  # data.path of the params


def test_submit_on_another_image_with_a_dataset(kfp_api: tuple[str, list]) -> None:
    host, requests = kfp_api
    submit(host, params_file=ROOT / "params.yaml", image="registry.example/me/dyme:dev", data_path="/data/chartqa")
    run = _run_body(requests)
    executors = run["pipeline_spec"]["pipeline_spec"]["deploymentSpec"]["executors"].values()
    assert {e["container"]["image"] for e in executors} == {"registry.example/me/dyme:dev"}
    assert run["runtime_config"]["parameters"]["data_path"] == "/data/chartqa"


@pytest.mark.parametrize(("model", "tiny"), [("models/tiny-smolvlm", True),  # init_model.out_dir: built
                                             ("HuggingFaceTB/SmolVLM-256M-Instruct", False)])
def test_submit_builds_the_tiny_model_only_when_it_is_the_model_to_train(kfp_api: tuple[str, list], model: str,
                                                                         tiny: bool) -> None:
    host, requests = kfp_api
    submit(host, params_file=ROOT / "params.yaml", overrides=[f"model.name_or_path={model}"])
    assert _run_body(requests)["runtime_config"]["parameters"]["use_tiny_model"] is tiny


def test_submit_refuses_a_bad_config_before_contacting_the_cluster(kfp_api: tuple[str, list]) -> None:
    host, requests = kfp_api
    with pytest.raises(ConfigError, match="train.max_stepz"):
        submit(host, params_file=ROOT / "params.yaml", overrides=["train.max_stepz=3"])
    assert requests == []


def test_dyme_submit_cli_prints_the_run_id(kfp_api: tuple[str, list], capsys: pytest.CaptureFixture) -> None:
    host, requests = kfp_api
    assert main(["--host", host, "--experiment", "cli", "--config", str(ROOT / "params.yaml"),
                 "train.max_steps=3"]) == 0
    assert f"submitted run run-1 to {host}" in capsys.readouterr().out
    assert _run_body(requests)["runtime_config"]["parameters"]["train"]["max_steps"] == 3


@pytest.mark.parametrize(("args", "code", "message"), [
    # nothing listens on port 9 (discard) of the loopback
    (["--host", "http://127.0.0.1:9"], 1,
     "dyme-submit: error: cannot reach the KFP API at http://127.0.0.1:9 ([Errno 111] Connection refused)"),
    (["--host", "http://127.0.0.1:9", "train.max_stepz=3"], 2,
     "dyme-submit: error: unknown config key train.max_stepz"),
])
def test_dyme_submit_errors_are_one_line(args: list[str], code: int, message: str) -> None:
    done = subprocess.run([sys.executable, "-m", "pipelines.submit", "--config", str(ROOT / "params.yaml"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == code
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith(message), done.stderr
    assert done.stdout == ""
