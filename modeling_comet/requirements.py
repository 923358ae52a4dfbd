"""The `transformers` version the CoMeT and RAM model files need, checked when they are imported.

A checkpoint carries this file with its remote code, so loading it with `trust_remote_code=True` under an older
`transformers` stops here with the version to install, instead of failing later on a missing name. It imports
nothing from `transformers` beyond its version string, so the check itself works on any release.
"""

from __future__ import annotations

import re

import transformers

MIN_TRANSFORMERS_VERSION = "5.24.0"


def _release(version: str) -> tuple[int, ...]:
    """`(major, minor, patch)` of a version string; pre-releases count as their release (`5.24.0.dev0` -> 5.24.0)."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    if match is None:
        raise ValueError(f"cannot read the transformers version {version!r}")
    return tuple(int(part or 0) for part in match.groups())


def check_transformers_version(installed: str | None = None) -> None:
    """Raise an `ImportError` naming the minimum version when the installed `transformers` is older."""
    installed = transformers.__version__ if installed is None else installed
    if _release(installed) < _release(MIN_TRANSFORMERS_VERSION):
        raise ImportError(
            f"This model's code needs transformers>={MIN_TRANSFORMERS_VERSION}, but transformers {installed} is "
            f"installed. Upgrade with: pip install -U 'transformers>={MIN_TRANSFORMERS_VERSION}'"
        )


check_transformers_version()

__all__ = ["MIN_TRANSFORMERS_VERSION", "check_transformers_version"]
