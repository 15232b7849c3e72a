"""How ame-hf talks about the Hub: the endpoint, offline mode, and huggingface_hub's and httpx's
exceptions turned into one clear ame-hf error (with the original as its cause, for --debug)."""

from __future__ import annotations

import functools
import importlib
import os
from contextlib import contextmanager
from typing import Iterator

from .errors import AmeError, HubError, IngredientNotFoundError


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@contextmanager
def hub_errors(what: str, repo_id: str, revision: str | None = None) -> Iterator[None]:
    """Turn huggingface_hub / network exceptions into one clear ame-hf error about `what`."""
    from huggingface_hub import errors as hf_errors

    try:
        yield
    except AmeError:
        raise
    except hf_errors.GatedRepoError as err:
        raise HubError(
            f"{what}: {repo_id} is gated; accept its conditions on its Hub page, then pass a token "
            "with access (token=TOKEN or HF_TOKEN)", repo_id=repo_id, field="token"
        ) from err
    except hf_errors.RevisionNotFoundError as err:
        raise IngredientNotFoundError(
            f"{what}: revision {revision!r} does not exist in {repo_id}; check the branch, tag or commit", ref=repo_id
        ) from err
    except hf_errors.RepositoryNotFoundError as err:
        raise IngredientNotFoundError(
            f"{what}: repository {repo_id} not found on {endpoint()} (check the name; for a private "
            "repo pass token=TOKEN or set HF_TOKEN)", ref=repo_id, field="token"
        ) from err
    except (hf_errors.OfflineModeIsEnabled, hf_errors.LocalEntryNotFoundError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
        hint = ("HF_HUB_OFFLINE is set and it is not in the local cache; unset HF_HUB_OFFLINE"
                if offline else f"cannot reach {endpoint()}; check your connection or HF_ENDPOINT")
        raise HubError(f"{what}: {repo_id}: {hint}", repo_id=repo_id) from err
    except hf_errors.EntryNotFoundError as err:
        raise IngredientNotFoundError(f"{what}: a file is missing in {repo_id} ({first_line(err)})", ref=repo_id) from err
    except hf_errors.HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status == 401:
            raise HubError(
                f"{what}: the Hub refused the token (401 Unauthorized); pass a valid token=TOKEN, set "
                "HF_TOKEN or log in again with `hf auth login`", repo_id=repo_id, field="token"
            ) from err
        if status == 403:
            raise HubError(
                f"{what}: the token may not access {repo_id} (403 Forbidden); use a token with "
                "write access to that namespace", repo_id=repo_id
            ) from err
        raise HubError(f"{what}: the Hub answered {status} for {repo_id} ({first_line(err)})", repo_id=repo_id) from err
    except _transport_errors() as err:
        raise HubError(f"{what}: cannot reach {endpoint()} ({type(err).__name__}: {first_line(err)}); "
                       "check your connection or HF_ENDPOINT", repo_id=repo_id) from err


@functools.lru_cache(maxsize=None)
def _transport_errors() -> tuple[type[BaseException], ...]:
    """What the Hub client raises when the endpoint cannot be reached: OSError and the TransportError of
    its HTTP client (httpx under huggingface_hub 1.x, httpx2 under 2.x), which is not an OSError."""
    errors: list[type[BaseException]] = [OSError]
    for name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
