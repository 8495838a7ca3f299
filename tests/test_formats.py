"""Config formats: unknown fields as warnings, Bloodbank's array format, window days,
defaultHandler, and the convert / validate / plan commands that show them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from heartbeat_consumer.cli import main
from heartbeat_consumer.core.config import (
    ConfigError,
    LoadedConfig,
    Window,
    parse_config,
    with_default_handler,
)
from heartbeat_consumer.core.schedule import Blocker, in_window, plan
from heartbeat_consumer.core.state import AgentState
from heartbeat_consumer.core.timeutil import parse_instant_ms, zone


def load(data: dict[str, Any], **kwargs: Any) -> LoadedConfig:
    return parse_config(orjson.dumps(data), **kwargs)


# --- unknown fields ------------------------------------------------------------------------

V1_EXTRA = {
    "agent": "a",
    "role": "ops",
    "checks": {
        "c": {"cadenceMs": 60000, "handler": "default", "descripton": "x", "cadenceMS": 1},
        "d": {"cadenceMs": 60000, "handler": "default", "window": {"days": ["Mon"], "tz0": 1}},
    },
    "paused": {"d": {"reason": "r", "untill": 5}},
}


def test_unknown_fields_are_warnings_with_path_and_did_you_mean() -> None:
    loaded = load(V1_EXTRA)
    assert set(loaded.config.checks) == {"c", "d"}
    assert not loaded.problems
    warnings = {w.path: w.message for w in loaded.warnings}
    assert warnings["$.role"] == "unknown field 'role'"
    assert warnings["$.checks.c.descripton"].endswith("did you mean 'description'?")
    assert warnings["$.checks.c.cadenceMS"].endswith("did you mean 'cadenceMs'?")
    assert warnings["$.checks.d.window.tz0"].endswith("did you mean 'tz'?")
    assert warnings["$.paused.d.untill"].endswith("did you mean 'until'?")
    assert loaded.format == "heartbeat.v1"


def test_strict_makes_unknown_fields_errors() -> None:
    with pytest.raises(ConfigError) as info:
        load(V1_EXTRA, strict=True)
    assert "$.role: unknown field 'role'" in str(info.value)
    inner = {**V1_EXTRA}
    del inner["role"]
    loaded = load(inner, strict=True)  # a check's own unknown field disables only it
    assert "c" not in loaded.config.checks
    assert "$.checks.c.descripton" in {p.path for p in loaded.problems}


# --- the Bloodbank array format ------------------------------------------------------------

BLOODBANK: dict[str, Any] = {
    "agent": "grolf",
    "version": "1.0.0",
    "checks": [
        {
            "id": "direct-reports",
            "description": "Verify all direct reports are active",
            "interval_minutes": 15,
            "enabled": True,
            "action": "system_event",
            "prompt": "HEARTBEAT CHECK: no idle agents",
            "conditions": {
                "day_of_week": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"],
                "hour_range": [22, 5],
            },
        },
        {"id": "announce", "interval_minutes": 60, "action": "publish"},
        {"id": "disk", "interval_minutes": 0.5, "action": "command", "command": "df -h /"},
        {"id": "yearly", "description": "Q3 review", "conditions": {"quarters": ["Q3"]}},
        {"id": "off", "enabled": False, "interval_minutes": 5},
    ],
}


def test_bloodbank_checks_map_onto_the_model() -> None:
    loaded = load(BLOODBANK)
    assert loaded.format == "bloodbank"
    assert not loaded.problems
    assert not loaded.warnings
    checks = loaded.config.checks
    first = checks["direct-reports"]
    assert (first.cadence_ms, first.handler) == (900_000, "openclaw")
    assert first.meta == {"prompt": "HEARTBEAT CHECK: no idle agents"}
    assert first.description == "Verify all direct reports are active"
    assert first.window == Window(start="22:00", end="05:59", tz="UTC", days=frozenset(range(5)))
    assert checks["announce"].handler == "publish"
    assert checks["announce"].meta == {"eventType": "agent.grolf.heartbeat.announce"}
    assert checks["disk"].cadence_ms == 30_000
    assert checks["disk"].meta == {"argv": ["/bin/sh", "-c", "df -h /"]}
    yearly = checks["yearly"]  # defaults: 15 minutes, system_event
    assert (yearly.cadence_ms, yearly.handler, yearly.meta) == (900_000, "openclaw", {})
    assert (yearly.trigger_on_quarters, yearly.quarter_of, yearly.tz) == (("Q3",), "year", "UTC")
    assert checks["off"].enabled is False


@pytest.mark.parametrize(
    ("at", "due"),
    [
        ("2026-12-04T22:00:00Z", True),  # Friday, first hour
        ("2026-12-04T23:59:00Z", True),
        ("2026-12-04T21:59:00Z", False),  # before the range
        ("2026-12-07T05:59:00Z", True),  # Monday, last minute of hour 5
        ("2026-12-07T06:00:00Z", False),
        ("2026-12-05T01:00:00Z", False),  # Saturday after midnight: the day of the moment
        ("2026-12-06T23:00:00Z", False),  # Sunday
    ],
)
def test_bloodbank_conditions_are_utc_inclusive_hours_and_days(at: str, due: bool) -> None:
    loaded = load({**BLOODBANK, "checks": BLOODBANK["checks"][:1]})
    (ev,) = plan(loaded.config, AgentState(), parse_instant_ms(at), known_handlers=None).evaluations
    assert ev.due is due, ev.reason


def test_bloodbank_quarters_are_of_the_year_in_utc() -> None:
    loaded = load({**BLOODBANK, "checks": [BLOODBANK["checks"][3]]})

    def due(at: str) -> bool:
        (ev,) = plan(loaded.config, AgentState(), parse_instant_ms(at)).evaluations
        return ev.due

    assert due("2026-07-01T00:00:00Z")
    assert due("2026-09-30T23:59:00Z")
    assert not due("2026-06-30T23:59:00Z")
    assert not due("2026-10-01T00:00:00Z")


@pytest.mark.parametrize(
    ("check", "path", "text"),
    [
        ({"id": "a.b"}, "$.checks[0].id", "not a check name"),
        ({"id": "x", "interval_minutes": 0}, "$.checks[0].interval_minutes", "> 0"),
        ({"id": "x", "interval_minutes": "15"}, "$.checks[0].interval_minutes", "> 0"),
        ({"id": "x", "action": "shout"}, "$.checks[0].action", "system_event, command, publish"),
        ({"id": "x", "action": "command"}, "$.checks[0].command", "non-empty command"),
        ({"id": "x", "enabled": "yes"}, "$.checks[0].enabled", "true or false"),
        ({"id": "x", "conditions": {"hour_range": [9]}}, "$.checks[0].conditions", "hour_range"),
        ({"id": "x", "conditions": {"hour_range": [9, 24]}}, "$.checks[0].conditions", "0-23"),
        ({"id": "x", "conditions": {"day_of_week": ["Caturday"]}}, "$.checks[0]", "day names"),
        ({"id": "x", "conditions": {"quarters": ["Q5"]}}, "$.checks[0].conditions", "Q1"),
        ({"id": "x", "prompt": 5}, "$.checks[0].prompt", "string"),
    ],
)
def test_a_bad_bloodbank_check_disables_only_itself(
    check: dict[str, Any], path: str, text: str
) -> None:
    loaded = load({"agent": "g", "checks": [check, {"id": "good"}]})
    assert list(loaded.config.checks) == ["good"]
    assert any(p.path.startswith(path) and text in p.message for p in loaded.problems), [
        str(p) for p in loaded.problems
    ]


def test_bloodbank_duplicate_ids_and_unknown_fields() -> None:
    loaded = load({"agent": "g", "owner": "x", "checks": [{"id": "a"}, {"id": "a", "promt": "p"}]})
    assert list(loaded.config.checks) == ["a"]
    assert [p.path for p in loaded.problems] == ["$.checks[1].id"]
    assert {w.path for w in loaded.warnings} == {"$.owner", "$.checks[1].promt"}
    with pytest.raises(ConfigError, match="agent"):
        load({"checks": [{"id": "a"}]})  # the agent is required in both formats


# --- window.days in heartbeat.v1 -----------------------------------------------------------


def test_v1_window_days_alone_and_with_hours() -> None:
    loaded = load(
        {
            "agent": "a",
            "tz": "Europe/Berlin",
            "checks": {
                "weekend": {"cadenceMs": 60000, "handler": "x", "window": {"days": ["Sat", "Sun"]}},
                "mornings": {
                    "cadenceMs": 60000,
                    "handler": "x",
                    "window": {"days": ["monday"], "start": "09:00", "end": "10:00"},
                },
            },
        }
    )
    assert "mornings" in loaded.invalid_checks  # day names are Mon or Monday, as written
    weekend = loaded.config.checks["weekend"]
    assert weekend.window is not None
    berlin = zone("Europe/Berlin")
    # Friday 23:30 UTC is Saturday 00:30 in Berlin: the local day counts
    assert in_window(parse_instant_ms("2026-12-04T23:30:00Z"), weekend.window, berlin)
    assert not in_window(parse_instant_ms("2026-12-04T22:30:00Z"), weekend.window, berlin)
    (ev,) = plan(loaded.config, AgentState(), parse_instant_ms("2026-12-07T12:00:00Z")).evaluations
    assert ev.causes == (Blocker.OUTSIDE_WINDOW,)
    assert ev.reason == "outside window Sat,Sun Europe/Berlin (local Mon 13:00)"


@pytest.mark.parametrize(
    "window",
    [{"start": "09:00"}, {"end": "09:00"}, {}, {"days": []}, {"days": ["Mon", "Mon"]}],
)
def test_v1_window_needs_days_or_both_times(window: dict[str, Any]) -> None:
    loaded = load(
        {"agent": "a", "checks": {"c": {"cadenceMs": 1, "handler": "x", "window": window}}}
    )
    assert "c" in loaded.invalid_checks


def test_window_days_across_spring_forward_in_new_york() -> None:
    """Sunday 2026-03-08 02:00 does not exist in New York; a Sunday 02:00-03:00 window
    opens at the first valid minute of that Sunday, and not on the Saturday."""
    window = Window(start="02:00", end="02:30", days=frozenset({6}))
    tz = zone("America/New_York")
    assert in_window(parse_instant_ms("2026-03-08T07:00:00Z"), window, tz)  # 03:00 EDT
    assert not in_window(parse_instant_ms("2026-03-07T07:15:00Z"), window, tz)  # Sat 02:15


# --- defaultHandler ------------------------------------------------------------------------


def test_default_handler_takes_unregistered_handlers_only() -> None:
    loaded = load(
        {
            "agent": "a",
            "defaultHandler": "openclaw",
            "checks": {
                "build_health": {"cadenceMs": 1, "handler": "build_health", "description": "p"},
                "mine": {"cadenceMs": 1, "handler": "default"},
            },
        }
    )
    known = {"default", "openclaw"}
    resolved = with_default_handler(loaded, known)
    moved = resolved.config.checks["build_health"]
    assert (moved.handler, moved.declared_handler, moved.description) == (
        "openclaw",
        "build_health",
        "p",
    )
    assert resolved.config.checks["mine"].handler == "default"
    assert with_default_handler(loaded, {"default"}) is loaded  # default not registered
    plain = load({"agent": "a", "checks": {"x": {"cadenceMs": 1, "handler": "nope"}}})
    assert with_default_handler(plain, known) is plain  # no default: stays unknown
    assert with_default_handler(plain, known, "default").config.checks["x"].handler == "default"
    both = with_default_handler(loaded, known, "default")  # the file's own default wins
    assert both.config.checks["build_health"].handler == "openclaw"


# --- the commands ---------------------------------------------------------------------------


def write(tmp_path: Path, data: dict[str, Any], name: str = "hb.json") -> Path:
    path = tmp_path / name
    path.write_bytes(orjson.dumps(data))
    return path


def test_validate_names_the_format_and_warns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, {**BLOODBANK, "role": "eng"})
    assert main(["validate", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "format bloodbank" in out
    assert "agent grolf, 5 check(s)" in out
    assert "$.role: unknown field 'role' (ignored)" in err
    assert main(["validate", "--strict", str(path)]) == 1
    assert "$.role: unknown field 'role'" in capsys.readouterr().err


def test_validate_with_default_handler(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = {"agent": "a", "checks": {"build_health": {"cadenceMs": 60000, "handler": "bh"}}}
    path = write(tmp_path, data)
    assert main(["validate", str(path)]) == 1
    assert "unknown handler 'bh'" in capsys.readouterr().err
    assert main(["validate", str(path), "--default-handler", "openclaw"]) == 0
    assert "1 by handler 'openclaw'" in capsys.readouterr().out
    assert main(["validate", str(path), "--default-handler", "nosuch"]) == 2
    assert "'nosuch' is not a registered handler" in capsys.readouterr().err
    path = write(tmp_path, {**data, "defaultHandler": "openclaw"})
    assert main(["validate", str(path)]) == 0


def test_convert_prints_v1_that_loads_to_the_same_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, {**BLOODBANK, "role": "eng"})
    assert main(["convert", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "$.role: unknown field 'role' (not converted)" in err
    converted = orjson.loads(out)
    assert converted["$schema"] == "heartbeat.v1"
    assert list(converted)[1] == "agent"
    again = parse_config(out.encode())
    assert again.format == "heartbeat.v1"
    assert not again.warnings
    assert not again.problems
    assert again.config == load(BLOODBANK).config
    assert main(["plan", str(tmp_path / "v1.json"), "--json"]) == 1  # no such file
    capsys.readouterr()
    v1 = tmp_path / "v1.json"
    v1.write_text(out)
    assert main(["plan", str(v1), "--json", "--state", str(tmp_path / "s.json")]) == 0
    assert orjson.loads(capsys.readouterr().out)["format"] == "heartbeat.v1"


def test_convert_refuses_a_file_with_problems(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, {"agent": "g", "checks": [{"id": "x", "action": "shout"}]})
    assert main(["convert", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "$.checks[0].action" in err


# --- what an attacker tried ----------------------------------------------------------------


@pytest.mark.parametrize("value", [5, 1.5, True, "Monday", {"a": 1}, False, 0, ""])
def test_bloodbank_conditions_of_the_wrong_type_disable_their_check(value: Any) -> None:
    for key in ("day_of_week", "hour_range", "quarters"):
        loaded = load({"agent": "g", "checks": [{"id": "x", "conditions": {key: value}}]})
        assert "x" in loaded.invalid_checks, (key, value)
        (problem,) = loaded.invalid_checks["x"]
        assert problem.path == f"$.checks[0].conditions.{key}"


def test_bloodbank_null_conditions_and_whole_float_hours_are_accepted() -> None:
    check = {"id": "x", "conditions": {"day_of_week": None, "hour_range": [6.0, 9.0]}}
    window = load({"agent": "g", "checks": [check]}).config.checks["x"].window
    assert window == Window(start="06:00", end="09:59", tz="UTC")


def test_a_v1_file_whose_checks_is_a_list_is_a_v1_error() -> None:
    with pytest.raises(ConfigError, match=r"\$\.checks: .* is not of type 'object'"):
        load({"$schema": "heartbeat.v1", "agent": "a", "tz": "UTC", "checks": [1, 2]})


def test_an_invalid_bloodbank_id_never_becomes_a_name() -> None:
    loaded = load({"agent": "g", "checks": [{"id": "x\nFAKE row"}, {"id": ""}, {"id": ["l"]}]})
    assert set(loaded.invalid_checks) == {"checks[0]", "checks[1]", "checks[2]"}


def test_deep_nesting_and_long_keys_are_bounded() -> None:
    deep = "[" * 1000 + "1" + "]" * 1000
    for text in (
        '{"agent": "a", "checks": {"c": {"cadenceMs": 1, "handler": "x", "meta": {"d": %s}}}}',
        '{"agent": "g", "checks": [{"id": "x", "action": %s}]}',
    ):
        with pytest.raises(ConfigError, match="nested deeper than 64 levels"):
            parse_config(text % deep)
    key = "k" * 100_000
    loaded = load({"agent": "a", "checks": {}, key: 1, **{f"x{i}": 1 for i in range(500)}})
    assert len(loaded.warnings) == 101  # 100, then how many more
    assert max(len(w.path) + len(w.message) for w in loaded.warnings) < 300
    assert loaded.warnings[-1].message == "and 401 more unknown fields"


def test_an_unknown_default_handler_is_reported_and_the_fallback_used(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = {
        "agent": "a",
        "defaultHandler": "nosuch",
        "checks": {"m": {"cadenceMs": 60000, "handler": "mystery"}},
    }
    loaded = load(data)
    assert with_default_handler(loaded, {"default"}, "default").config.checks["m"].handler == (
        "default"
    )
    path = write(tmp_path, data)
    assert main(["validate", str(path), "--default-handler", "default"]) == 1
    assert "$.defaultHandler: unknown handler 'nosuch'" in capsys.readouterr().err
