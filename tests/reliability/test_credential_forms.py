"""Credentials in any URL form (issue 22, item 3): every string-valued config key, given each form below,
is refused in one line that names the key and never the secret; the LLM client's messages and log lines
never show one either (`redact_url`), whatever form its base URL has.
"""

from __future__ import annotations

import logging
import socket

import pytest

from dyme_core import cli
from dyme_core.config import ConfigError, LLMConfig, describe, load_config
from dyme_core.llm import ChatClient, LLMError, redact_url

SECRET = "s3cr3t-Zq81"
# a credential in each form a URL may carry it (host and port are placeholders)
FORMS = [
    f"http://bob:{SECRET}@llm.internal:8000/v1",  # user:password@, with a scheme
    f"HTTPS://BOB:{SECRET}@LLM.INTERNAL/v1",  # upper case
    f"https://{SECRET}@llm.internal/v1",  # a token as the user name
    f"bob:{SECRET}@llm.internal/v1",  # no scheme
    f"bob:{SECRET}@llm.internal:8000/v1",  # no scheme, a port
    f"//bob:{SECRET}@llm.internal/v1",  # scheme-relative
    f"//{SECRET}@llm.internal/v1",  # scheme-relative token
    f"http://bob:{SECRET}@[::1]:8000/v1",  # IPv6 host
    f"mysql+pymysql://bob:{SECRET}@db.internal:3306/mlflow",  # a database store URI
    f"http://llm.internal/v1?api_key={SECRET}",  # query
    f"http://llm.internal/v1?model=x&token={SECRET}",  # query, second parameter
    f"http://llm.internal/v1?access_token={SECRET}",
    f"http://llm.internal/v1?api%5Fkey={SECRET}",  # percent-encoded name
    f"https://store.blob.core.windows.net/c?sv=2024&sig={SECRET}",  # an Azure SAS signature
    f"https://bucket.s3.amazonaws.com/k?X-Amz-Signature={SECRET}",  # an S3 presigned URL
    f"http://llm.internal/v1#api_key={SECRET}",  # fragment
    f"http://llm.internal/v1#x=1&access_token={SECRET}",  # fragment, second parameter
    f"llm.internal/v1?password={SECRET}",  # no scheme, query
    f"/data/runs/bob:{SECRET}@llm.internal",  # what a scheme-less URI becomes once made a local path
]
NOT_CREDENTIALS = ["alice@example.com", "http://llm.internal:8000/v1?model=Qwen2.5", "sqlite:///mlruns.db",
                   "HuggingFaceM4/ChartQA", "runs/train", "http://[::1]:8000/v1", "s3://bucket/dvc"]

# every string leaf of the config: plain keys, then string items of list and mapping keys
DEFAULTS = {key: default for key, _, default in describe()}
STRING_KEYS = [key for key, default in DEFAULTS.items() if isinstance(default, str)]
LIST_KEYS = [key for key, default in DEFAULTS.items() if isinstance(default, list)
             and all(isinstance(v, str) for v in default)]
MAPPING_KEYS = [key for key, default in DEFAULTS.items() if isinstance(default, dict)
                and all(isinstance(v, str) for v in default.values())]


def _override(key: str, value: str) -> str:
    if key in LIST_KEYS:
        return f"{key}={value}"  # one item (a comma-free value is split into a one-item list)
    if key in MAPPING_KEYS:
        return f"{key}.some_name={value}"
    return f"{key}={value}"


def test_the_walk_covers_every_string_key() -> None:
    assert {"llm.base_url", "tracking_uri"} <= {k.split(".", 1)[1].removeprefix("train.").removeprefix("refine.")
                                                 for k in STRING_KEYS if "base_url" in k or "tracking_uri" in k}
    assert {"register.tags", "data.hf_columns", "train.report_to", "refine.splits"} <= {*LIST_KEYS, *MAPPING_KEYS}
    assert len(STRING_KEYS) >= 50


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("key", STRING_KEYS + LIST_KEYS + MAPPING_KEYS)
def test_every_string_key_refuses_every_form(key: str, form: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, [_override(key, form)])
    message = str(e.value)
    assert SECRET not in message and SECRET.upper() not in message
    refused = "must be the NAME of an environment variable" if key.endswith("api_key_env") else \
        "must not carry credentials"
    assert "\n" not in message and refused in message, message
    assert message.startswith(key if key not in MAPPING_KEYS else f"{key}.some_name"), message


@pytest.mark.parametrize("value", NOT_CREDENTIALS)
def test_values_without_credentials_pass(value: str) -> None:
    load_config(None, [f"register.run_name={value}"])
    assert redact_url(value) == value


@pytest.mark.parametrize("form", FORMS)
def test_redaction_removes_every_form(form: str) -> None:
    shown = redact_url(form)
    assert SECRET not in shown and SECRET.upper() not in shown
    assert ("llm.internal" in shown.lower()) == ("llm.internal" in form.lower())  # the rest stays readable


@pytest.mark.parametrize("form", FORMS[:8])
def test_cli_refuses_each_form_in_one_line(form: str, tmp_path, capsys: pytest.CaptureFixture,
                                           caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "run"
    with caplog.at_level(logging.DEBUG):
        rc = cli.main(["train", f"train.output_dir={out}", f"train.llm.base_url={form}"])
    captured = capsys.readouterr()
    text = captured.out + captured.err + caplog.text
    assert rc == 2 and len(captured.err.strip().splitlines()) == 1
    assert "train.llm.api_key_env" in captured.err and SECRET not in text.replace(SECRET.upper(), SECRET)
    assert not out.exists()


@pytest.mark.parametrize("form", FORMS)
def test_the_llm_client_never_logs_a_credential(form: str, caplog: pytest.LogCaptureFixture) -> None:
    """A client built from an LLMConfig alone (no Config check): every message and log line is redacted."""
    with socket.socket() as s:  # a port nothing listens on: the request fails, the client explains why
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = form.replace("llm.internal:8000", f"127.0.0.1:{port}").replace("llm.internal", f"127.0.0.1:{port}")
    client = ChatClient(LLMConfig(base_url=url, timeout_s=0.5, max_retries=1, backoff_s=0.01, breaker_failures=1))
    with caplog.at_level(logging.DEBUG), pytest.raises(LLMError) as e:
        client.chat([{"role": "user", "content": "hi"}])
    shown = str(e.value) + caplog.text
    assert SECRET not in shown and SECRET.upper() not in shown
