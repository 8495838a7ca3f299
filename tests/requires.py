"""What a test needs from the machine beyond `make install`, said the same way everywhere.

``need_tool`` and ``need_file`` return the tool's path or the file when they are there.
When they are not, the test is skipped with the line that installs them, except under CI
(``CI=true`` or ``CI=1``): .ci/run installs every tool a test asks for, so there a missing
one fails the run with the same message instead of skipping quietly. Things CI cannot have
(the design reference beside the checkout, a remote broker's rabbitmqctl) pass
``ci=False`` and skip everywhere.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import NoReturn

import pytest


def on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1"}


def missing(what: str, why: str, install: str, *, ci: bool = True) -> NoReturn:
    """Skip (outside CI, or ``ci=False``) or fail (under CI) for something that is missing."""
    __tracebackhide__ = True  # report the test's line, not this one
    message = f"{what} is missing ({why}); install: {install}"
    if ci and on_ci():
        ci_note = f"[CI={os.environ['CI']}: missing, so failed instead of skipped]"
        pytest.fail(f"{message} {ci_note}", pytrace=False)
    pytest.skip(message)


def need_tool(name: str, why: str, install: str, *, ci: bool = True) -> str:
    """The path of ``name`` (a command on PATH, or a path to an executable)."""
    __tracebackhide__ = True  # report the test's line, not this one
    found = shutil.which(name)
    if found is None:
        missing(name, why, install, ci=ci)
    return found


def need_file(path: Path, why: str, install: str, *, ci: bool = True) -> Path:
    __tracebackhide__ = True  # report the test's line, not this one
    if not path.exists():
        missing(str(path), why, install, ci=ci)
    return path
