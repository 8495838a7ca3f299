"""tests/requires.py: a missing tool or file skips with its install line, and fails under CI."""

from __future__ import annotations

from pathlib import Path

import pytest

from .requires import need_file, need_tool

ABSENT = "heartbeat-no-such-tool"
INSTALL = "apt-get install heartbeat-no-such-tool"


@pytest.mark.parametrize("ci", [None, "", "false", "0", "yes"])
def test_outside_ci_a_missing_tool_skips_with_its_install_line(
    ci: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.skip.Exception, match=f"{ABSENT} is missing .*install: {INSTALL}"):
        need_tool(ABSENT, "a test", INSTALL)


@pytest.mark.parametrize("ci", ["true", "TRUE", "True", "1"])
def test_under_ci_a_missing_tool_fails_with_the_same_message(
    ci: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.fail.Exception, match=f"{ABSENT} is missing .*install: {INSTALL}"):
        need_tool(ABSENT, "a test", INSTALL)
    with pytest.raises(pytest.fail.Exception, match="install: put it there"):
        need_file(tmp_path / "absent", "a test", "put it there")


def test_what_ci_cannot_have_skips_under_ci_too(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.skip.Exception, match="install: put it there"):
        need_file(tmp_path / "absent", "beside the checkout", "put it there", ci=False)
    with pytest.raises(pytest.skip.Exception, match=INSTALL):
        need_tool(ABSENT, "a remote broker", INSTALL, ci=False)


def test_present_tools_and_files_are_returned(tmp_path: Path) -> None:
    assert Path(need_tool("sh", "a test", "apt-get install dash")).name == "sh"
    there = tmp_path / "there"
    there.write_text("")
    assert need_file(there, "a test", "put it there") == there
