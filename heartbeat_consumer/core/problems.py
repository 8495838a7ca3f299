"""A problem with a config, at a JSON path (shared by the loader and the formats)."""

from __future__ import annotations

import json
from dataclasses import dataclass

__all__ = ["Problem", "json_path"]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config, at a JSON path like ``$.checks.ping.cadenceMs``.

    ``check`` names the check it is about: such a problem disables only that check."""

    path: str
    message: str
    check: str | None = None

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def json_path(parts: list[str | int] | tuple[str | int, ...], root: str = "$") -> str:
    """``$.checks.ping.cadenceMs``; names that are not identifiers go in brackets."""
    out = root
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.isidentifier():
            out += f".{part}"
        else:
            out += "[" + json.dumps(part) + "]"
    return out
