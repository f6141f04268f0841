"""The Hugging Face Hub, as every HF tool uses it: model ids are downloaded through huggingface_hub into
its cache (HF_HUB_CACHE; HF_HUB_OFFLINE=1 reads only the cache), dataset ids are loaded with
``datasets.load_dataset``, and ``--push_to_hub`` uploads the final model with ``HfApi``.

Only what ppomax loads is downloaded: configs, tokenizer files and safetensors weights; pickle weights
(``*.bin``, ``*.pt``) never are, and model code (``*.py``) only with ``--trust_remote_code``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ppomax.errors import UserError

logger = logging.getLogger("ppomax")

# What a model directory needs: config / generation config / tokenizer JSON, sentencepiece or tiktoken
# vocabularies, chat templates, safetensors weights and their index, ppomax's value head and marker.
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja", "tokenizer*"]


class HubError(UserError, FileNotFoundError):
    """A Hub id could not be resolved: offline and not cached, not found, gated, or no network."""


_DATA_FILES = (".jsonl", ".json", ".csv", ".parquet", ".arrow", ".txt")


def looks_like_hub_id(path: str) -> bool:
    """'org/name' that is not a local path (a local directory of that name wins, as in transformers) nor a
    data file name (a missing 'data/train.jsonl' is a missing file, not a Hub dataset)."""
    return (path.count("/") == 1 and not path.startswith((".", "/", "~")) and not os.path.exists(path)
            and all(part.strip() for part in path.split("/")) and not path.lower().endswith(_DATA_FILES))


def snapshot(repo_id: str, what: str = "model", trust_remote_code: bool = False) -> str:
    """The local directory of Hub repo ``repo_id``: downloaded (or refreshed) into the HF cache when online,
    the cached snapshot under HF_HUB_OFFLINE=1. Errors say which, before anything is loaded."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    patterns = MODEL_FILES + (["*.py"] if trust_remote_code else [])
    try:
        # Mistral-style repos also ship consolidated.safetensors and original/ (the same weights again)
        return snapshot_download(repo_id, allow_patterns=patterns, ignore_patterns=["consolidated*", "original/*"])
    except LocalEntryNotFoundError as e:
        if constants.HF_HUB_OFFLINE:
            raise HubError(f"{repo_id}: no such {what} directory, and not in the Hugging Face cache "
                           f"({constants.HF_HUB_CACHE}) while HF_HUB_OFFLINE=1: download it once online "
                           f"(`hf download {repo_id}`) or unset HF_HUB_OFFLINE") from None
        raise HubError(f"{repo_id}: no such {what} directory, and the Hub could not be reached to download it "
                       f"({str(e).splitlines()[0]})") from None
    except GatedRepoError:
        raise HubError(f"{repo_id}: a gated Hub repo; accept its terms on the Hub and log in "
                       "(`hf auth login` or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise HubError(f"{repo_id}: no such {what} directory, nor a Hub repo (private repos need "
                       "`hf auth login` or HF_TOKEN)") from None
    except HfHubHTTPError as e:
        raise HubError(f"{repo_id}: Hub error while downloading ({str(e).splitlines()[0]})") from None


def load_dataset(spec: str):
    """``datasets.load_dataset`` for a Hub dataset id, 'org/name' or 'org/name:split' (default: train)."""
    import datasets

    from ppomax.errors import DataError

    name, _, split = spec.partition(":")
    try:
        return datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds (not found, offline, bad split)
        offline = " (HF_HUB_OFFLINE=1: only cached datasets load)" if _offline() else ""
        raise DataError(f"{spec}: no such file or directory, and datasets.load_dataset({name!r}, "
                        f"split={split or 'train'!r}) failed{offline}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}") from None


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


# Files of a run directory that are not the final model: logs, the resolved config, subfolders
# (checkpoint-N/, best/, tensorboard/, adapter/).
_NOT_MODEL = ["*/*", "*.jsonl", "config.yaml", ".*"]


def create_repo(repo_id: str, private: bool | None) -> str:
    """Create (or find) the Hub model repo at the start of a run, as transformers' Trainer does, so a missing
    login or a name taken by someone else fails before any compute; returns the repo id."""
    from huggingface_hub import HfApi

    try:
        return HfApi().create_repo(repo_id, private=private, exist_ok=True).repo_id
    except Exception as e:  # noqa: BLE001 - auth, network, permissions: the message is huggingface_hub's
        raise HubError(f"--push_to_hub: cannot create or access the Hub repo {repo_id} "
                       f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); log in with "
                       "`hf auth login` or set HF_TOKEN") from None


def push_model(folder: str | os.PathLike, repo_id: str, private: bool | None, message: str) -> str:
    """Upload the final model files of ``folder`` (its top-level files but run logs) to ``repo_id``."""
    from huggingface_hub import HfApi

    create_repo(repo_id, private)
    commit = HfApi().upload_folder(repo_id=repo_id, folder_path=os.fspath(folder), commit_message=message,
                                   ignore_patterns=_NOT_MODEL)
    logger.info("pushed %s to the Hub: %s", Path(folder), getattr(commit, "commit_url", repo_id))
    return repo_id
