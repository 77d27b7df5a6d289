"""Painters' server: per-request layer-execution policies for frozen LLMs. `__version__` is the package's version,
what /version, TGI's /info and the OpenAPI document report."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def _version() -> str:
    try:
        return version("painters")
    except PackageNotFoundError:  # a source tree that was never installed: its pyproject.toml says
        import tomllib

        return tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["version"]


__version__ = _version()
