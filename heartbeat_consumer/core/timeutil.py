"""Pure time helpers: instants are integer epoch milliseconds in UTC.

Local wall-clock time (zoneinfo) is only used to test windows and quarters;
every comparison of instants happens on epoch milliseconds.

One range for every instant and duration that enters from outside (envelopes, commands,
configs, state files, monitor events): instants from 1970-01-01 to 9999-12-30 UTC
(:data:`MIN_INSTANT_MS`..:data:`MAX_INSTANT_MS`; the last day of 9999 is left out so
that the wall clock of every zone, up to UTC+14, is still a datetime), durations from
1 ms up to five years (:data:`MAX_DURATION_MS`). Inside it every datetime conversion
works; outside it is a ``ValueError`` that names the range, never an ``OverflowError``.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = [
    "MAX_DURATION_MS",
    "MAX_INSTANT_MS",
    "MIN_INSTANT_MS",
    "MS_PER_MINUTE",
    "MS_PER_SECOND",
    "check_duration",
    "check_instant",
    "clamp_instant",
    "floor_to",
    "format_duration",
    "from_ms",
    "gap_end",
    "in_instant_range",
    "instant_or_none",
    "iso",
    "iso_or_none",
    "local_time",
    "parse_duration_ms",
    "parse_instant_ms",
    "to_ms",
    "zone",
]

MS_PER_SECOND = 1000
MS_PER_MINUTE = 60 * MS_PER_SECOND
MS_PER_DAY = 86_400_000
MIN_INSTANT_MS = 0
"""1970-01-01T00:00:00.000Z"""
MAX_INSTANT_MS = 253_402_214_399_999
"""9999-12-30T23:59:59.999Z"""
MAX_DURATION_MS = 5 * 366 * MS_PER_DAY
"""Five years: the longest cadence, pause or threshold accepted."""
RANGE_TEXT = "1970-01-01 to 9999-12-30 UTC"


def in_instant_range(ms: int) -> bool:
    return MIN_INSTANT_MS <= ms <= MAX_INSTANT_MS


def clamp_instant(ms: int) -> int:
    """``ms`` moved into the range (for instants computed by adding a duration)."""
    return min(max(ms, MIN_INSTANT_MS), MAX_INSTANT_MS)


def check_instant(value: int | float, what: str = "time") -> int:
    """``value`` as integer epoch ms; ValueError when it is not finite or not within
    1970..9999 (a float with a fraction is rounded down)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{what}: {value!r} is not a time")
    if not MIN_INSTANT_MS <= value <= MAX_INSTANT_MS:
        raise ValueError(f"{what}: {value!r} is out of range (epoch ms, {RANGE_TEXT})")
    return int(value)


def check_duration(value: int | float, what: str = "duration", *, minimum: int = 1) -> int:
    """``value`` as integer ms; ValueError when it is below ``minimum`` or over five years."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{what}: {value!r} is not a duration")
    if not minimum <= value <= MAX_DURATION_MS:
        raise ValueError(
            f"{what}: {value!r} ms is out of range ({minimum} ms to {MAX_DURATION_MS} ms, "
            "five years)"
        )
    return int(value)


_DURATION = re.compile(r"\s*([0-9]{1,15}(?:\.[0-9]{1,15})?)\s*(ms|s|m|h|d)?\s*")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_duration_ms(text: str) -> int:
    """Parse '500ms', '60s', '15m', '1h', '1d' or a bare number of seconds."""
    match = _DURATION.fullmatch(text)
    if not match:
        raise ValueError(f"not a duration: {text!r} (use e.g. 500ms, 60s, 15m, 1h)")
    value = float(match.group(1)) * _UNIT_MS[match.group(2) or "s"]
    if value < 1:
        raise ValueError(f"duration must be at least 1 ms: {text!r}")
    if value > MAX_DURATION_MS:
        raise ValueError(f"duration {text!r} is over five years")
    return int(value)


def format_duration(ms: int) -> str:
    """Human form of a duration: 90000 -> '1m30s'."""
    if ms < 0:
        return "-" + format_duration(-ms)
    if ms < MS_PER_SECOND:
        return f"{ms}ms"
    seconds, _ = divmod(ms, 1000)
    days, seconds = divmod(seconds, 86_400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (seconds, "s")]
    return "".join(f"{n}{unit}" for n, unit in parts if n) or "0s"


def to_ms(moment: datetime) -> int:
    """Epoch milliseconds of an aware datetime."""
    if moment.tzinfo is None:
        raise ValueError("naive datetime: an instant needs a time zone")
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def from_ms(ms: int) -> datetime:
    """Aware UTC datetime of epoch milliseconds."""
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)


def iso(ms: int) -> str:
    """ISO 8601 UTC with millisecond precision and a Z suffix."""
    return from_ms(ms).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def iso_or_none(ms: int | None) -> str | None:
    """:func:`iso`, or None for None and for an instant outside the range (never raises)."""
    if ms is None or not in_instant_range(ms):
        return None
    return iso(ms)


def floor_to(ms: int, step_ms: int) -> int:
    """The slot containing ``ms`` for slots of ``step_ms`` aligned on the epoch."""
    return ms - ms % step_ms


def parse_instant_ms(value: str | int | float) -> int:
    """Epoch ms from a number (epoch ms) or an ISO 8601 string, within 1970..9999.

    A string without an offset is read as UTC; 'Z' and '+hh:mm' offsets are honoured.
    ValueError for anything else, out-of-range values included.
    """
    if isinstance(value, bool):
        raise ValueError("a boolean is not a time")
    if isinstance(value, int | float):
        return check_instant(value)
    text = value.strip()
    if re.fullmatch(r"-?[0-9]{1,30}", text):
        return check_instant(int(text))
    if len(text) > 64:
        raise ValueError(f"not a time: {text[:40]!r}... (over 64 characters)")
    try:
        moment = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise ValueError(
            f"not a time: {value!r} (use ISO 8601 like 2026-03-29T01:30:00+01:00, or epoch ms)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    try:
        return check_instant(to_ms(moment))
    except ValueError:
        raise ValueError(f"{value!r} is out of range ({RANGE_TEXT})") from None


def instant_or_none(value: object) -> int | None:
    """:func:`parse_instant_ms` of a value from the wire, or None when it is not a time."""
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        return None
    try:
        return parse_instant_ms(value)
    except ValueError:
        return None


@lru_cache(maxsize=512)
def zone(name: str) -> ZoneInfo:
    """ZoneInfo for an IANA name; ValueError with a clear message when unknown."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(
            f"unknown time zone {name!r} (use an IANA name like Europe/Berlin)"
        ) from None


def local_time(ms: int, tz: ZoneInfo) -> datetime:
    """Local wall-clock datetime of an instant."""
    seconds, millis = divmod(ms, 1000)
    return datetime.fromtimestamp(seconds, tz).replace(microsecond=millis * 1000)


def _exists(day: date, minute: int, tz: ZoneInfo) -> bool:
    wall = datetime.combine(day, time(minute // 60, minute % 60), tzinfo=tz)
    back = wall.astimezone(UTC).astimezone(tz)
    return back.replace(tzinfo=None) == wall.replace(tzinfo=None)


@lru_cache(maxsize=4096)
def gap_end(day: date, minute: int, tz: ZoneInfo) -> tuple[date, int] | None:
    """If local ``minute`` of ``day`` falls in a spring-forward gap, the first valid local
    (date, minute of day) after the gap, which may be on the next day (a gap that ends
    at midnight, as in America/Nuuk); otherwise None."""
    try:
        if minute >= 24 * 60 or _exists(day, minute, tz):
            return None
        for offset in range(1, 2 * 24 * 60):
            later_day = day + timedelta(days=(minute + offset) // (24 * 60))
            later = (minute + offset) % (24 * 60)
            if _exists(later_day, later, tz):
                return later_day, later
    except OverflowError:  # the calendar's last days: no gap to find past them
        return None
    return None
