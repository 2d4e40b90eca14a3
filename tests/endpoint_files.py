"""Endpoint files the tests write: one remote endpoint \"stub\" in front of the scripted server."""

from __future__ import annotations

from pathlib import Path


def write_toml(
    path: Path, base_url: str, *, timeout_s: float = 30.0, api_key_env: str | None = None
) -> Path:
    """An endpoints file with one remote endpoint "stub" at ``base_url`` ($1/$2 per M)."""
    key = f'api_key_env = "{api_key_env}"\n' if api_key_env else ""
    path.write_text(
        "[[endpoints]]\n"
        'name = "stub"\n'
        f'base_url = "{base_url}"\n'
        'model = "m"\n'
        'kind = "remote"\n'
        'input_usd_per_mtok = "1"\n'
        'output_usd_per_mtok = "2"\n'
        f"{key}"
        "max_retries = 0\n"
        "max_concurrency = 16\n"
        f"timeout_s = {timeout_s}\n",
        encoding="utf-8",
    )
    return path
