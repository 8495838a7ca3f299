"""DST behaviour of whole schedules, by simulation: a window starting in a
spring-forward gap runs that day, and the documented "once a day" pattern runs
exactly once per local day through every transition.

The rule-by-rule properties are in test_properties.py.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import orjson

from heartbeat_consumer.core.config import parse_config
from heartbeat_consumer.core.simulate import simulate

MIN = 60_000
HOUR = 60 * MIN
DST_ZONES = ["Europe/Berlin", "America/New_York", "Australia/Lord_Howe"]


def ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def hhmm(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


def transitions(zone: str, year: int) -> list[datetime]:
    """UTC instants (on the minute) where the zone's UTC offset changes."""
    tz = ZoneInfo(zone)
    found = []
    moment = datetime(year, 1, 1, tzinfo=UTC)
    step = timedelta(hours=1)
    while moment.year == year:
        nxt = moment + step
        if moment.astimezone(tz).utcoffset() != nxt.astimezone(tz).utcoffset():
            lo, hi = moment, nxt
            while hi - lo > timedelta(minutes=1):
                mid = lo + (hi - lo) / 2
                mid = mid.replace(second=0, microsecond=0)
                if mid.astimezone(tz).utcoffset() == lo.astimezone(tz).utcoffset():
                    lo = mid
                else:
                    hi = mid
            found.append(hi)
        moment = nxt
    return found


def test_dst_transitions_found_in_each_zone() -> None:
    for zone in DST_ZONES:
        assert len(transitions(zone, 2026)) == 2, zone


def test_window_starting_in_the_spring_forward_gap_opens_at_first_valid_minute() -> None:
    for zone in DST_ZONES:
        tz = ZoneInfo(zone)
        for change in transitions(zone, 2026):
            before = (change - timedelta(minutes=1)).astimezone(tz)
            after = change.astimezone(tz)
            if after.utcoffset() <= before.utcoffset():  # type: ignore[operator]
                continue  # fall-back: no gap
            gap_minutes = int((after.utcoffset() - before.utcoffset()).total_seconds() // 60)  # type: ignore[operator]
            gap_start = before + timedelta(minutes=1)  # first skipped wall-clock minute
            start = gap_start.hour * 60 + gap_start.minute + min(5, gap_minutes - 1)
            end = start + 2  # the whole window lies inside the gap
            assert end < gap_start.hour * 60 + gap_start.minute + gap_minutes
            data = {
                "agent": "a",
                "checks": {
                    "c": {
                        "cadenceMs": 15 * MIN,
                        "handler": "h",
                        "lastRun": ms(change) - 2 * 24 * HOUR,
                        "window": {"start": hhmm(start), "end": hhmm(end), "tz": zone},
                    }
                },
            }
            config = parse_config(orjson.dumps(data)).config
            day_start = ms(change - timedelta(hours=6))
            runs = list(simulate(config, day_start, day_start + 12 * HOUR, MIN))
            assert [r.slot for r in runs] == [ms(change)], (zone, [r.local for r in runs])
            assert runs[0].local == after.isoformat(timespec="minutes")


def test_daily_window_check_runs_once_every_local_day_through_dst() -> None:
    """The documented pattern for "once a day at HH:MM": a window pins the time and a
    cadence under a day (20 h) absorbs 23- and 25-hour days. One run per local day,
    including the spring-forward day (window inside the gap) and the fall-back day
    (window inside the repeated hour)."""
    for zone in DST_ZONES:
        tz = ZoneInfo(zone)
        for change in transitions(zone, 2026):
            for start in range(60, 4 * 60, 30):
                data = {
                    "agent": "a",
                    "checks": {
                        "daily": {
                            "cadenceMs": 20 * HOUR,
                            "handler": "h",
                            "window": {"start": hhmm(start), "end": hhmm(start + 10), "tz": zone},
                        }
                    },
                }
                config = parse_config(orjson.dumps(data)).config
                first_day = (change - timedelta(days=3)).astimezone(tz).date()
                begin = ms(datetime.combine(first_day, datetime.min.time(), tz))
                runs = list(simulate(config, begin, begin + 6 * 24 * HOUR, MIN))
                days = [date.fromisoformat(r.local[:10]) for r in runs]
                expected = [first_day + timedelta(days=i) for i in range(6)]
                assert days == expected, (zone, change, hhmm(start), [r.local for r in runs])
