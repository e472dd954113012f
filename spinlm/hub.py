"""Model paths that are not local folders (Hugging Face hub ids): whether one can load here, found out in seconds.

transformers retries an unreachable hub for about 50 s before it fails with a traceback; the config check asks
this module first, so an offline machine hears at once which key to point at a local folder. Torch-free.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse


def hub_problem(key: str, path: str) -> str | None:
    """For a model path that is not a local folder (a hub id): None when it can load, else why not. Checked in a
    few seconds, before transformers' own download retries (about 50 s offline) and before anything heavy."""
    if Path(path).expanduser().is_dir():
        return None
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(path, "config.json"), str):
        return None  # downloaded before: transformers falls back to the cache
    advice = (f"download it where there is network (`hf download {path} --local-dir DIR`) and set {key}=DIR")
    if constants.HF_HUB_OFFLINE:
        return f"{key}={path}: not a local folder and not in the Hugging Face cache, and HF_HUB_OFFLINE is set: {advice}"
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=float(os.environ.get("SPINLM_HUB_PROBE_TIMEOUT", "3"))).close()
    except OSError as exc:
        return (f"{key}={path}: not a local folder and not in the Hugging Face cache, and the hub ({host}) cannot be "
                f"reached ({exc}): {advice}")
    return None
