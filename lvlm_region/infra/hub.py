"""Models named by Hugging Face hub id (``--model org/name``), as transformers takes them: resolved through
``huggingface_hub`` into its local cache (HF_HOME / HF_HUB_CACHE), so every later step reads a local directory.

A name that exists on disk is a local path and is used as it is; otherwise ``org/name`` is a hub id. On each node
the rank with LOCAL_RANK 0 (or the only process) fetches it once; the node's other ranks wait until the cache holds
it (DeepSpeed's launcher and torchrun stop them if that rank fails). With HF_HUB_OFFLINE=1 the cache alone serves
it. An id that is neither cached nor reachable is refused naming the id, the cache and the fix. Nothing is fetched
when the cache already holds the snapshot (an unchanged revision costs one metadata request online).
"""
from __future__ import annotations

import functools
import os
import re
import time

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")  # org/name, as the hub spells repository ids
# What training, evaluation and export read from a model repository (not other frameworks' weights)
PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.bin"]
CONFIG_ONLY = ["*.json", "*.jinja"]  # a dry run and the planner read only the configs
WAIT_S = 3600.0  # how long a node's other ranks wait for its LOCAL_RANK 0 to fetch a model


def is_hub_id(name: str | None) -> bool:
    return bool(name) and not os.path.exists(name) and bool(HUB_ID.match(name))


def cache_dir() -> str:
    """The hub cache as huggingface_hub finds it, read from the environment now (not at its import)."""
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def local_path(name: str | None, flag: str = "--model", config_only: bool = False) -> str | None:
    """``name`` itself when it is not a hub id (a local path, or None), else the snapshot directory in the cache."""
    if not is_hub_id(name):
        return name
    return snapshot(name, flag, config_only)["path"]


def source(name: str | None, flag: str = "--model") -> dict | None:
    """Where a model came from, as run.json records it: {"id", "revision", "path"} for a hub id (after
    ``local_path``), {"path"} for a local directory."""
    if name is None:
        return None
    if is_hub_id(name):
        return snapshot(name, flag, False)
    return {"path": os.path.abspath(name)}


@functools.cache
def snapshot(repo_id: str, flag: str, config_only: bool) -> dict:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    patterns = CONFIG_ONLY if config_only else PATTERNS
    fetches = os.environ.get("LOCAL_RANK", "0") == "0" and not offline()
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            path = snapshot_download(repo_id, allow_patterns=patterns, local_files_only=not fetches,
                                     cache_dir=cache_dir())
            break
        except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
            if fetches or offline() or time.monotonic() > deadline:
                why = ("HF_HUB_OFFLINE=1 forbids fetching it" if offline() else
                       "it could not be fetched" if fetches else
                       f"this node's LOCAL_RANK 0 did not fetch it within {WAIT_S:.0f} s")
                raise FileNotFoundError(
                    f"{flag} {repo_id}: not a local directory, and as a Hugging Face hub id it is not in the cache "
                    f"({cache_dir()}) and {why} ({type(e).__name__}); fetch it where there is network "
                    f"(hf download {repo_id}, with the same HF_HOME) or give a local checkpoint directory") from None
            time.sleep(2.0)  # another rank of this node is fetching it
        except (HfHubHTTPError, OSError) as e:  # not found, gated, unreachable
            raise FileNotFoundError(
                f"{flag} {repo_id}: not a local directory, and as a Hugging Face hub id it is neither in the cache "
                f"({cache_dir()}) nor reachable ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                "check the id and your network or token, or give a local checkpoint directory") from None
    return {"id": repo_id, "revision": os.path.basename(os.path.normpath(path)), "path": path}
