"""HEARTBEAT.md emptiness, the HEARTBEAT_OK contract, alert duplicates, failure kinds."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from heartbeat_consumer.handlers import heartbeat_md
from heartbeat_consumer.handlers.heartbeat_md import (
    DEDUP_WINDOW_MS,
    DEFAULT_ACK_MAX_CHARS,
    DEFAULT_PROMPT,
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
    assert parsed.status == "alert"
    assert not parsed.silent


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
        assert parsed.message
        assert not parsed.silent
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


# --- OpenClaw's own cases ----------------------------------------------------------------
#
# The reply contract as OpenClaw has it, restated as data from the test files of the public
# repository openclaw/openclaw. Upstream's "skip" (nothing delivered) is our silent success;
# upstream's remaining text is our message.
# (reply, ack_max_chars, silent, token found, message)
LONG = "A" * (DEFAULT_ACK_MAX_CHARS + 1)
OPENCLAW_REPLIES = [
    # src/auto-reply/heartbeat.test.ts, stripHeartbeatToken
    pytest.param("  ", 300, True, False, "", id="hb-blank"),
    pytest.param(TOKEN, 300, True, True, "", id="hb-token-only"),
    pytest.param(f"{TOKEN} 🦞", 300, True, True, "🦞", id="hb-token-then-emoji"),
    pytest.param(f"🦞 {TOKEN}", 300, True, True, "🦞", id="hb-emoji-then-token"),
    pytest.param(f"ALERT {TOKEN}", 300, True, True, "ALERT", id="hb-short-rest"),
    pytest.param(f"{LONG} {TOKEN}", 300, False, True, LONG, id="hb-rest-over-max"),
    pytest.param(f"{TOKEN} hello", 300, True, True, "hello", id="hb-start"),
    pytest.param(f"hello {TOKEN}", 300, True, True, "hello", id="hb-end"),
    pytest.param(f"hello {TOKEN} there", 300, False, False, f"hello {TOKEN} there", id="hb-middle"),
    pytest.param(f"<b>{TOKEN}</b>", 300, True, True, "", id="hb-html"),
    pytest.param(f"**{TOKEN}**", 300, True, True, "", id="hb-markdown"),
    pytest.param(f"<code>{TOKEN}</code> all good", 300, True, True, "all good", id="hb-code"),
    pytest.param(f"{TOKEN}.", 300, True, True, "", id="hb-dot"),
    pytest.param(f"{TOKEN}!!!", 300, True, True, "", id="hb-bangs"),
    pytest.param(f"{TOKEN}---", 300, True, True, "", id="hb-dashes"),
    pytest.param(
        f"I should not respond {TOKEN}.",
        300,
        True,
        True,
        "I should not respond.",
        id="hb-sentence-keeps-its-dot",
    ),
    pytest.param(f"All clear. {TOKEN}", 300, True, True, "All clear.", id="hb-text-dot-token"),
    # src/auto-reply/heartbeat-filter.test.ts, isHeartbeatOkResponse (text replies)
    pytest.param(f"**{TOKEN}**", 300, True, True, "", id="filter-bold"),
    pytest.param(
        f"You have 3 unread urgent emails. {TOKEN}",
        300,
        True,
        True,
        "You have 3 unread urgent emails.",
        id="filter-short-text-then-token",
    ),
    pytest.param(
        f"Status {TOKEN} due to watchdog failure",
        300,
        False,
        False,
        f"Status {TOKEN} due to watchdog failure",
        id="filter-middle",
    ),
    pytest.param(f"{TOKEN} all good", 0, False, True, "all good", id="filter-ack-max-0"),
    # issue 15: a final token followed by what upstream's "up to 4 non-word characters"
    # allows (src/auto-reply/heartbeat.ts, stripTokenAtEdges)
    pytest.param(f"All quiet. {TOKEN} ✅", 300, True, True, "All quiet. ✅", id="end-emoji"),
    pytest.param(f"All quiet. {TOKEN} ...", 300, True, True, "All quiet. ...", id="end-ellipsis"),
    pytest.param(f"All quiet. {TOKEN}---", 300, True, True, "All quiet.---", id="end-dashes"),
    pytest.param(f"All quiet. {TOKEN} !", 300, True, True, "All quiet. !", id="end-space-bang"),
    pytest.param(f"All quiet. **{TOKEN}** ✅", 300, True, True, "All quiet. ✅", id="end-bold"),
    pytest.param(f"{TOKEN} ✅", 300, True, True, "✅", id="only-emoji"),
    pytest.param(f"{TOKEN}...", 300, True, True, "", id="only-ellipsis"),
    pytest.param(f"{TOKEN}…", 300, True, True, "", id="only-ellipsis-char"),
]


@pytest.mark.parametrize(("reply", "ack_max", "silent", "token", "message"), OPENCLAW_REPLIES)
def test_openclaw_reply_cases(
    reply: str, ack_max: int, silent: bool, token: bool, message: str
) -> None:
    parsed = parse_reply(reply, ack_max_chars=ack_max)
    assert (parsed.silent, parsed.token, parsed.message) == (silent, token, message)
    assert parsed.status == ("success" if silent else "alert")


# src/auto-reply/heartbeat.test.ts, isHeartbeatContentEffectivelyEmpty (a missing file is
# not empty: agent_turn then runs with the prompt alone, see test_agent_turn.py)
OPENCLAW_CHECKLISTS = [
    pytest.param("", True, id="empty"),
    pytest.param("   ", True, id="spaces"),
    pytest.param("\n\n\n", True, id="newlines"),
    pytest.param("  \n  \n  ", True, id="spaces-and-newlines"),
    pytest.param("\t\t", True, id="tabs"),
    pytest.param("# HEARTBEAT.md", True, id="header"),
    pytest.param("# HEARTBEAT.md\n", True, id="header-newline"),
    pytest.param("# HEARTBEAT.md\n\n\n", True, id="header-blank-lines"),
    pytest.param("# Header\n# Another comment", True, id="two-headers"),
    pytest.param("## Subheader\n### Another", True, id="subheaders"),
    pytest.param("# HEARTBEAT.md\n## Section 1\n### Subsection\n", True, id="headers-only"),
    pytest.param(
        "# HEARTBEAT.md\n\nKeep this file empty unless you want a tiny checklist. Keep it small.\n",
        False,
        id="template-with-text",
    ),
    pytest.param("- Check email", False, id="task"),
    pytest.param("# HEARTBEAT.md\n- Task 1", False, id="header-and-task"),
    pytest.param("Remind me to call mom", False, id="plain-text"),
    pytest.param("# HEARTBEAT.md\n\n- Task 1\n- Task 2\n", False, id="tasks-after-header"),
    pytest.param("# HEARTBEAT.md\n## Tasks\nCheck the server logs\n", False, id="mixed"),
]


@pytest.mark.parametrize(("text", "empty"), OPENCLAW_CHECKLISTS)
def test_openclaw_checklist_cases(text: str, empty: bool) -> None:
    assert checklist_is_empty(text) is empty


# src/auto-reply/heartbeat.ts, resolveHeartbeatPrompt: trimmed, and the default when that
# leaves nothing
@pytest.mark.parametrize(
    ("configured", "prompt"),
    [
        pytest.param(None, DEFAULT_PROMPT, id="unset"),
        pytest.param("", DEFAULT_PROMPT, id="empty"),
        pytest.param("  ", DEFAULT_PROMPT, id="spaces"),
        pytest.param("\t\n ", DEFAULT_PROMPT, id="whitespace"),
        pytest.param("Check open tickets.", "Check open tickets.", id="custom"),
        pytest.param("  Check open tickets.\n", "Check open tickets.", id="custom-trimmed"),
    ],
)
def test_openclaw_prompt_cases(configured: str | None, prompt: str) -> None:
    assert heartbeat_md.resolve_prompt(configured) == prompt
