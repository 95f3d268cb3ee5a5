"""Where loopchat keeps things on disk. One place, so tests can redirect it with LOOPCHAT_HOME."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """Root folder for the store, the model cache and runs (default ~/.loopchat)."""
    return Path(os.environ.get("LOOPCHAT_HOME", Path.home() / ".loopchat")).expanduser()


def data_dir() -> Path:
    return home() / "data"


def model_cache_dir() -> Path:
    """Converted GGUF checkpoints; LOOPCHAT_MODEL_CACHE moves it on its own (tests share it)."""
    return Path(os.environ.get("LOOPCHAT_MODEL_CACHE", home() / "models")).expanduser()


def default_db_url() -> str:
    return f"sqlite:///{data_dir() / 'loopchat.db'}"
