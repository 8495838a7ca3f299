from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest

from heartbeat_consumer.core.config import (
    MAX_CONFIG_BYTES,
    ConfigError,
    ConfigSource,
    load_config,
    parse_config,
    schema,
)
from heartbeat_consumer.core.timeutil import MAX_DURATION_MS, MAX_INSTANT_MS

from .conftest import ROOT
from .requires import need_file


def test_design_example_validates_unchanged() -> None:
    design = need_file(
        ROOT.parent / "shared/reference/heartbeat-consumer-design.md",
        "the design reference beside this checkout; CI clones only this repository, so it "
        "skips there too",
        "put the design documents in ../shared/reference/ next to this checkout",
        ci=False,
    ).read_text()
    example = (ROOT / "examples/cack.heartbeat.json").read_text()
    assert example.strip() in design, "examples/cack.heartbeat.json must be the design's example"
    loaded = load_config(ROOT / "examples/cack.heartbeat.json")
    assert loaded.problems == []
    config = loaded.config
    assert config.agent == "cack"
    check = config.checks["sub_health"]
    assert check.cadence_ms == 900_000
    assert check.window is not None
    assert check.window.end_minute == 23 * 60 + 59
    assert check.tz == "America/New_York"
    assert config.checks["quarterly_compaction"].trigger_on_quarters == ("Q1", "Q2", "Q3", "Q4")
    assert config.checks["quarterly_compaction"].tz == "UTC"


def test_packaged_schema_is_the_schemas_file() -> None:
    assert schema() == json.loads((ROOT / "schemas/heartbeat.v1.json").read_text())


def test_defaults() -> None:
    config = parse_config(b'{"agent": "a", "checks": {"c": {"cadenceMs": 1000, "handler": "x"}}}')
    check = config.config.checks["c"]
    assert (check.priority, check.enabled, check.quarter_of, check.meta) == (100, True, "day", {})
    assert check.effective_timeout_ms == 1000
    assert config.config.max_checks_per_tick == 1
    assert config.config.selection == "priority"


def test_timeout_default_is_capped_at_five_minutes() -> None:
    loaded = parse_config(b'{"agent":"a","checks":{"c":{"cadenceMs":3600000,"handler":"x"}}}')
    assert loaded.config.checks["c"].effective_timeout_ms == 300_000


def test_agent_tz_is_the_default_for_checks() -> None:
    loaded = parse_config(
        orjson.dumps(
            {
                "agent": "a",
                "tz": "Europe/Berlin",
                "checks": {
                    "c": {"cadenceMs": 1, "handler": "x"},
                    "d": {
                        "cadenceMs": 1,
                        "handler": "x",
                        "window": {"start": "09:00", "end": "17:00", "tz": "Asia/Tokyo"},
                    },
                },
            }
        )
    )
    assert loaded.config.checks["c"].tz == "Europe/Berlin"
    assert loaded.config.checks["d"].tz == "Asia/Tokyo"


def test_one_bad_check_disables_only_itself() -> None:
    loaded = parse_config(
        orjson.dumps(
            {
                "agent": "a",
                "checks": {
                    "good": {"cadenceMs": 60000, "handler": "default"},
                    "string_cadence": {"cadenceMs": "900000", "handler": "default"},
                    "bad_tz": {
                        "cadenceMs": 1,
                        "handler": "default",
                        "window": {"start": "00:00", "end": "24:00", "tz": "Mars/Olympus"},
                    },
                },
            }
        )
    )
    assert list(loaded.config.checks) == ["good"]
    assert set(loaded.invalid_checks) == {"string_cadence", "bad_tz"}
    paths = {p.path: p.message for p in loaded.problems}
    assert "'900000' is not of type 'integer'" in paths["$.checks.string_cadence.cadenceMs"]
    assert "unknown time zone 'Mars/Olympus'" in paths["$.checks.bad_tz.window.tz"]


@pytest.mark.parametrize(
    ("data", "path", "text"),
    [
        ('{"agent": "a"}', "$", "'checks' is a required property"),
        ('{"agent": "a.b", "checks": {}}', "$.agent", "invalid name 'a.b'"),
        ('{"agent": "a", "checks": {}, "tz": "Nowhere/Town"}', "$.tz", "unknown time zone"),
        ('{"agent": "a", "checks": {}, "selection": "random"}', "$.selection", "random"),
        ('{"agent": "a", "checks": {}, "$schema": "heartbeat.v2"}', '$["$schema"]', "heartbeat.v1"),
        ("[1, 2]", "$", "must be a JSON object"),
        ('{"agent": "a", "checks": {', "$", "invalid JSON"),
    ],
)
def test_file_level_problems_raise_with_path(data: str, path: str, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data, source="f.json")
    problems = {p.path: p.message for p in info.value.problems}
    assert path in problems, problems
    assert text in problems[path]
    assert str(info.value).startswith("f.json: ")


@pytest.mark.parametrize(
    ("check", "path", "text"),
    [
        ({"handler": "x"}, "$.checks.c", "'cadenceMs' is a required property"),
        ({"cadenceMs": 0, "handler": "x"}, "$.checks.c.cadenceMs", "less than the minimum"),
        (
            {"cadenceMs": 1, "handler": "x", "window": {"start": "9:00", "end": "17:00"}},
            "$.checks.c.window.start",
            "is not a time HH:MM",
        ),
        (
            {"cadenceMs": 1, "handler": "x", "window": {"start": "09:00", "end": "24:01"}},
            "$.checks.c.window.end",
            "or 24:00",
        ),
        ({"cadenceMs": 1, "handler": "x", "triggerOnQuarters": ["Q5"]}, "$.checks.c", "Q5"),
        ({"cadenceMs": 1, "handler": "x", "triggerOnQuarters": []}, "$.checks.c", "non-empty"),
        ({"cadenceMs": 1, "handler": "x", "timeoutMs": 3_600_000}, "$.checks.c.timeoutMs", "max"),
        ({"cadenceMs": 1, "handler": "x", "enabled": "yes"}, "$.checks.c.enabled", "boolean"),
    ],
)
def test_check_level_problems(check: dict[str, object], path: str, text: str) -> None:
    loaded = parse_config(orjson.dumps({"agent": "a", "checks": {"c": check}}))
    assert "c" not in loaded.config.checks
    problems = loaded.problems
    assert any(p.path.startswith(path) and text in p.message for p in problems), problems


def test_invalid_check_name_disables_that_check_with_bracketed_path() -> None:
    loaded = parse_config(
        b'{"agent":"a","checks":{"a.b":{"cadenceMs":1,"handler":"x"},"ok":{"cadenceMs":1,"handler":"x"}}}'
    )
    assert list(loaded.config.checks) == ["ok"]
    (problem,) = loaded.problems
    assert problem.path == '$.checks["a.b"]'
    assert "no dots or wildcards" in problem.message


def test_pauses_parse_iso_epoch_and_null() -> None:
    loaded = parse_config(
        orjson.dumps(
            {
                "agent": "a",
                "checks": {"c": {"cadenceMs": 1, "handler": "x"}},
                "paused": {
                    "c": {"until": "2026-03-29T01:30:00+01:00", "reason": "maintenance"},
                    "*": {"until": None},
                    "d": {"until": 5},
                },
            }
        )
    )
    paused = loaded.config.paused
    assert paused["c"].until == 1774744200000
    assert paused["c"].reason == "maintenance"
    assert paused["*"].until is None
    assert paused["*"].active(10**15)
    assert paused["d"].active(4)
    assert not paused["d"].active(5)


def test_bad_pause_time_disables_its_check() -> None:
    loaded = parse_config(
        b'{"agent":"a","checks":{"c":{"cadenceMs":1,"handler":"x"}},"paused":{"c":{"until":"soon"}}}'
    )
    assert "c" not in loaded.config.checks
    assert loaded.problems[0].path == "$.paused.c.until"


def test_load_config_reports_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "missing.json")
    assert "cannot read file" in str(info.value)


def test_config_source_keeps_last_good_and_recovers(write_config) -> None:  # type: ignore[no-untyped-def]
    path = write_config({"agent": "a", "checks": {"c": {"cadenceMs": 1000, "handler": "x"}}})
    source = ConfigSource(path)
    good, error = source.current()
    assert good is not None
    assert error is None
    assert source.generation == 1
    assert source.current()[0] is good, "unchanged file is not re-parsed"

    path.write_text('{"agent": "a", "checks": ')  # truncated
    kept, error = source.current()
    assert kept is good
    assert error is not None
    assert "invalid JSON" in str(error)
    assert source.current()[1] is error, "the error is reported on every call until fixed"

    path.unlink()
    kept, error = source.current()
    assert kept is good
    assert error is not None
    assert "cannot read file" in str(error)

    write_config({"agent": "a", "checks": {"c": {"cadenceMs": 2000, "handler": "x"}}})
    fixed, error = source.current()
    assert error is None
    assert fixed is not None
    assert fixed.config.checks["c"].cadence_ms == 2000
    assert source.generation == 2


def test_config_source_without_any_good_config(write_config) -> None:  # type: ignore[no-untyped-def]
    source = ConfigSource(write_config("not json"))
    good, error = source.current()
    assert good is None
    assert error is not None


def test_config_files_are_regular_files_of_bounded_size(tmp_path: Path) -> None:
    big = tmp_path / "big.heartbeat.json"
    with big.open("wb") as handle:
        handle.truncate(MAX_CONFIG_BYTES + 1)  # sparse: nothing is read to find out
    zero = tmp_path / "zero.heartbeat.json"
    zero.symlink_to("/dev/zero")
    for path, why in ((big, "over the 4194304 byte limit"), (zero, "not a regular file")):
        with pytest.raises(ConfigError) as caught:
            load_config(path)
        assert why in str(caught.value)
    with pytest.raises(ConfigError, match="not a regular file \\(a directory\\)"):
        load_config(tmp_path)


def test_the_schema_bounds_are_the_code_s_ranges() -> None:
    check = schema()["$defs"]["check"]["properties"]
    assert check["cadenceMs"]["maximum"] == MAX_DURATION_MS
    assert check["lastRun"]["maximum"] == MAX_INSTANT_MS
    until = schema()["$defs"]["pause"]["properties"]["until"]["anyOf"][0]
    assert until["maximum"] == MAX_INSTANT_MS
