"""Asking the Hugging Face hub before a download, so that a bad id or no network fails in seconds, naming the id.

`from_pretrained` and `datasets.load_dataset` retry an unreachable hub for minutes, then raise an error that
need not name what was asked for. `hub_access` asks the hub about the one repository first: one request of
at most `PROBE_TIMEOUT_S` seconds (`huggingface_hub.HfApi.repo_info`, at the hub's endpoint, `HF_ENDPOINT`,
with `HF_TOKEN` when set). A hub that answers "no such repository" (or gated, or an invalid id) and a hub
that cannot be reached become one line naming the config key and the id (`HubError`). With the hub
unreachable, a model already in the local Hugging Face cache is read from it (a warning says so); with
`HF_HUB_OFFLINE` set nothing is asked and only the cache is read (DESIGN.md section 4: offline first).

The hub library reads `HF_ENDPOINT`, `HF_TOKEN` and `HF_HUB_OFFLINE` itself, as `from_pretrained` does.
Tests: tests/core/test_models.py (a closed loopback port as the endpoint).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0


class HubError(OSError):
    """A hub id that cannot be had; the message names the config key, the id and what the hub said."""


def in_cache(repo_id: str, repo_type: str = "model") -> bool:
    """Whether the local Hugging Face cache holds a snapshot of `repo_id` (no network)."""
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo_id, repo_type=repo_type, local_files_only=True)
    except (OSError, ValueError):  # LocalEntryNotFoundError; HFValidationError for what is no hub id
        return False
    return True


def hub_access(repo_id: str, key: str, repo_type: str = "model", timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether `repo_id` (given as config `key`, not a local folder) is read from the local cache only.

    False: the hub has it, download as usual. True: HF_HUB_OFFLINE is set, or (for a model) the hub is
    unreachable and the cache holds it. Otherwise HubError, one line: not found (or private without
    HF_TOKEN), gated, not a valid id, the hub's HTTP error, or the hub unreachable.
    """
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, HFValidationError, RepositoryNotFoundError

    where = f"{key} {repo_id!r}"
    if constants.is_offline_mode():
        if repo_type == "model" and not in_cache(repo_id, repo_type):
            raise HubError(f"{where}: not a local folder and not in the local Hugging Face cache (HF_HUB_OFFLINE "
                           "is set)")
        return True  # datasets keeps its own cache too: `datasets` decides, with its offline error
    endpoint = constants.ENDPOINT
    try:
        HfApi().repo_info(repo_id, repo_type=repo_type, timeout=timeout_s)
        return False
    except HFValidationError:
        raise HubError(f"{where}: neither a local folder nor a valid hub id") from None
    except GatedRepoError:  # before its parent class: the repository exists
        raise HubError(f"{where}: gated on the hub ({endpoint}); accept its terms on its page and set HF_TOKEN") \
            from None
    except RepositoryNotFoundError:
        raise HubError(f"{where}: not a local folder and not found on the hub ({endpoint}; a private one needs "
                       "HF_TOKEN)") from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "an error"
        raise HubError(f"{where}: not a local folder and the Hugging Face hub ({endpoint}) answered {status}") \
            from None
    except Exception as e:  # noqa: BLE001 (the HTTP client's own types: refused, DNS, timeout)
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    cached = in_cache(repo_id, repo_type)
    if cached and repo_type == "model":
        log.warning("%s: the Hugging Face hub (%s) is unreachable (%s); loading the copy in the local cache",
                    where, endpoint, reason)
        return True
    hint = "; the copy in the local cache loads with HF_HUB_OFFLINE=1" if cached else ""
    raise HubError(f"{where}: not a local folder and the Hugging Face hub is unreachable (offline? {endpoint}: "
                   f"{reason}){hint}")
