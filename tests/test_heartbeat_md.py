"""HEARTBEAT.md emptiness, the HEARTBEAT_OK contract, alert duplicates, failure kinds."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from heartbeat_consumer.heartbeat_md import (
    DEDUP_WINDOW_MS,
    TOKEN,
    checklist_is_empty,
    classify_failure,
    fingerprint,
    is_duplicate,
    parse_reply,
    remember_alert,
)

EMPTY = """# HEARTBEAT

<!-- Add tasks below.
     One per line. -->

## Daily
-
- [ ]
* [x]
1.

```markdown
```
---
"""


def test_a_checklist_of_headers_comments_and_empty_items_is_empty() -> None:
    assert checklist_is_empty(EMPTY)
    assert checklist_is_empty("")
    assert checklist_is_empty("\n\n   \n")
    assert checklist_is_empty("<!-- unterminated comment\n- check the disk")


@pytest.mark.parametrize(
    "line",
    [
        "- check the inbox",
        "- [ ] reply to Ana",
        "1. rotate logs",
        "Look at the build.",
        "```\nuptime\n```",
        "#hashtag is text, not a header",
    ],
)
def test_one_real_line_makes_a_checklist_worth_a_turn(line: str) -> None:
    assert not checklist_is_empty(EMPTY + line + "\n")


@pytest.mark.parametrize(
    "reply",
    [
        "HEARTBEAT_OK",
        "  HEARTBEAT_OK\n",
        "HEARTBEAT_OK.",
        "HEARTBEAT_OK!!!!",
        "**HEARTBEAT_OK**",
        "`HEARTBEAT_OK`",
        "<b>HEARTBEAT_OK</b>",
        "_HEARTBEAT_OK_.",
        "All quiet. HEARTBEAT_OK",
        "HEARTBEAT_OK - checked inbox, nothing new.",
    ],
)
def test_the_token_at_either_end_with_a_short_rest_is_a_silent_success(reply: str) -> None:
    parsed = parse_reply(reply)
    assert (parsed.status, parsed.silent, parsed.token) == ("success", True, True)
    assert TOKEN not in parsed.message


def test_more_than_ack_max_chars_besides_the_token_is_an_alert_without_the_token() -> None:
    text = "Disk 97% full on db1; " + "details " * 50
    parsed = parse_reply(f"{text}\nHEARTBEAT_OK", ack_max_chars=300)
    assert (parsed.status, parsed.silent) == ("alert", False)
    assert parsed.message == text.strip()
    assert parse_reply(f"{text}\nHEARTBEAT_OK", ack_max_chars=len(text)).status == "success"


@pytest.mark.parametrize(
    "reply",
    [
        "Disk is full",  # no token: an alert however short
        "The HEARTBEAT_OK check failed: disk full",  # in the middle: not the contract
        "HEARTBEAT_OKAY, disk full",
        "HEARTBEAT_OK!!!!! too much punctuation",
    ],
)
def test_without_the_token_at_an_end_the_reply_is_an_alert(reply: str) -> None:
    parsed = parse_reply(reply)
    assert parsed.status == "alert" and not parsed.silent


def test_middle_token_is_kept_in_the_message() -> None:
    assert parse_reply("a HEARTBEAT_OK b").message == "a HEARTBEAT_OK b"


def test_an_empty_reply_says_nothing() -> None:
    parsed = parse_reply("  \n")
    assert (parsed.status, parsed.silent, parsed.token) == ("success", True, False)


@given(st.text(max_size=400))
def test_parse_reply_never_raises_and_an_alert_always_has_text(text: str) -> None:
    parsed = parse_reply(text)
    assert parsed.status in ("success", "alert")
    if parsed.status == "alert":
        assert parsed.message and not parsed.silent
    assert parse_reply(f"{TOKEN}\n{text}").token


def test_fingerprints_ignore_case_spacing_and_emphasis() -> None:
    assert fingerprint("Disk  **FULL** on db1\n") == fingerprint("disk full on DB1")
    assert fingerprint("disk full on db1") != fingerprint("disk full on db2")


def test_duplicates_within_24_hours_and_forgetting_older_ones() -> None:
    recent = remember_alert({}, "a", 0)
    assert is_duplicate(recent, "a", DEDUP_WINDOW_MS - 1)
    assert not is_duplicate(recent, "a", DEDUP_WINDOW_MS)
    assert not is_duplicate(recent, "b", 1)
    later = remember_alert(recent, "b", DEDUP_WINDOW_MS)
    assert later == {"b": DEDUP_WINDOW_MS}


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("Error: 401 Unauthorized", "auth"),
        ("Invalid API key · Please run /login", "auth"),
        ("API Error: 429 rate_limit_error", "quota"),
        ("Your credit balance is too low", "quota"),
        ("Claude usage limit reached", "quota"),
        ("segmentation fault", None),
        ("exit code 1", None),
    ],
)
def test_failures_worth_not_paying_for_again(text: str, kind: str | None) -> None:
    assert classify_failure(text) == kind
