"""Shared test set-up: never touch the Hugging Face hub, and helpers to run `kmm` as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# Set before anything imports huggingface_hub or datasets: tests run offline.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

REPO = Path(__file__).resolve().parent.parent


def run_kmm(*args: str, cwd: Path | None = None, env: dict | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m kmismatch_lite ARGS` in a fresh interpreter, capturing stdout and stderr
    (an `env` value of None removes that variable)."""
    full_env = {k: v for k, v in {**os.environ, "COLUMNS": "200", **(env or {})}.items() if v is not None}
    return subprocess.run([sys.executable, "-m", "kmismatch_lite", *args], cwd=cwd or REPO,
                          env=full_env, capture_output=True, text=True, timeout=timeout)


def llama_cpp_usable() -> str | None:
    """None if llama.cpp can run here, else the reason it cannot (for a skip)."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (pip install 'kmismatch_lite[llamacpp]')"
    return None


def bundled_model(name: str) -> str | None:
    """None if the bundled model `name` resolves offline, else why not."""
    from kmismatch_lite import cards
    from kmismatch_lite.errors import KmmError

    try:
        cards.resolve(name)
    except KmmError as exc:
        return str(exc)
    return None
