"""HEARTBEAT.md checklists and the HEARTBEAT_OK reply contract, pure.

An agent turn costs money, so :mod:`.agent_turn` asks these functions first:

- :func:`checklist_is_empty`: a checklist with nothing to do (blank lines, headers, HTML
  comments, empty list items, code-fence markers) means no turn at all;
- :func:`resolve_prompt`: the configured prompt, or :data:`DEFAULT_PROMPT` when it is
  missing or only whitespace;
- :func:`parse_reply`: ``HEARTBEAT_OK`` at the start or end of the reply (also wrapped
  in markdown or HTML, followed by up to 4 symbols: punctuation, dashes, an ellipsis,
  an emoji) is stripped; if at most ``ack_max_chars`` remain the turn was a silent
  success, otherwise the rest is an alert. A token in the middle of the text is not
  stripped; a reply without a token is an alert, however short;
- :func:`fingerprint` and :func:`is_duplicate`: the same alert from the same check is
  not raised twice within 24 h;
- :func:`classify_failure`: an authentication or quota failure, which retrying every
  tick would only pay for again.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "DEFAULT_ACK_MAX_CHARS",
    "DEFAULT_PROMPT",
    "DEDUP_WINDOW_MS",
    "TOKEN",
    "Reply",
    "checklist_is_empty",
    "classify_failure",
    "fingerprint",
    "is_duplicate",
    "parse_reply",
    "remember_alert",
    "resolve_prompt",
]

TOKEN = "HEARTBEAT_OK"  # noqa: S105 (the reply token, not a password)
DEFAULT_PROMPT = (
    "Read HEARTBEAT.md if it exists. Follow it strictly. "
    "If nothing needs attention, reply HEARTBEAT_OK."
)
DEFAULT_ACK_MAX_CHARS = 300
DEDUP_WINDOW_MS = 24 * 3_600_000


def resolve_prompt(configured: object) -> str:
    """The configured prompt without surrounding whitespace; the default when that leaves
    nothing (a prompt of only spaces is no instruction)."""
    text = str(configured).strip() if configured else ""
    return text or DEFAULT_PROMPT


# --- the checklist --------------------------------------------------------------------------

_COMMENT = re.compile(r"<!--.*?(-->|\Z)", re.DOTALL)
_EMPTY_LINE = re.compile(
    r"""^\s*(?:
        \#{1,6}(?:\s.*)?            # a markdown header (its text is a title, not a task)
      | (?:[-*+]|\d+[.)])           # a list marker ...
        (?:\s+\[[ xX]?\])?          # ... maybe a checkbox ...
        \s*                         # ... and nothing else
      | (?:```|~~~).*               # a code fence marker (with its language)
      | -{3,}|\*{3,}|_{3,}          # a thematic break
    )?\s*$""",
    re.VERBOSE,
)


def checklist_is_empty(text: str) -> bool:
    """True when the checklist asks for nothing: only blank lines, markdown headers, HTML
    comments, empty list items (``-``, ``- [ ]``), code-fence markers or breaks."""
    without_comments = _COMMENT.sub("", text)
    return all(_EMPTY_LINE.match(line) for line in without_comments.splitlines())


# --- the reply -------------------------------------------------------------------------------

_TAGS = "b|strong|em|i|code|p|span|mark"
_OPEN = rf"(?:\*{{1,2}}|_{{1,2}}|`{{1,3}}|~~|<(?:{_TAGS})>)*"
_CLOSE = rf"(?:\*{{1,2}}|_{{1,2}}|`{{1,3}}|~~|</(?:{_TAGS})>)*"
_SYMBOLS = r"[^\w\s]{0,4}"  # after the token: ".", "!!!", "---", "...", "✅", "🦞"
_WRAPPED = rf"{_OPEN}{TOKEN}{_CLOSE}"
_AT_START = re.compile(rf"^\s*{_WRAPPED}{_SYMBOLS}{_CLOSE}(?=\s|$)")
# At the end the symbols may be set off by spaces ("HEARTBEAT_OK ✅", "HEARTBEAT_OK ...");
# they are kept, as they may end the sentence before the token ("... respond HEARTBEAT_OK.").
_AT_END = re.compile(rf"(?:^|(?<=\s)){_WRAPPED}(?P<tail>(?:\s*[^\w\s]){{0,4}}{_CLOSE})\s*$")


@dataclass(frozen=True)
class Reply:
    status: Literal["success", "alert"]
    silent: bool
    """Nothing to tell anyone: the token, and at most ``ack_max_chars`` besides."""
    message: str
    """The reply without the token (the alert's text when ``status`` is alert)."""
    token: bool
    """HEARTBEAT_OK was found at the start or end."""


def parse_reply(text: str, ack_max_chars: int = DEFAULT_ACK_MAX_CHARS) -> Reply:
    """Apply the HEARTBEAT_OK contract to an agent's reply."""
    rest, found_start = _AT_START.subn("", text, count=1)
    end = _AT_END.search(rest)
    if end:
        rest = rest[: end.start()].rstrip() + end["tail"]
    message = rest.strip()
    token = bool(found_start or end)
    if not message and not text.strip():
        return Reply("success", True, "", False)  # said nothing: nothing to tell
    if token and len(message) <= ack_max_chars:
        return Reply("success", True, message, True)
    return Reply("alert", False, message, token)


# --- duplicates --------------------------------------------------------------------------


def fingerprint(message: str) -> str:
    """Of the alert's normalised text: case, whitespace and markdown emphasis ignored."""
    normal = re.sub(r"[*_`~]+", "", message).casefold()
    normal = " ".join(normal.split())
    return hashlib.sha256(normal.encode()).hexdigest()[:16]


def is_duplicate(
    recent: dict[str, int], key: str, now_ms: int, window_ms: int = DEDUP_WINDOW_MS
) -> bool:
    """The same alert was raised less than ``window_ms`` ago."""
    sent = recent.get(key)
    return sent is not None and 0 <= now_ms - sent < window_ms


def remember_alert(
    recent: dict[str, int], key: str, now_ms: int, window_ms: int = DEDUP_WINDOW_MS
) -> dict[str, int]:
    """``recent`` with this alert at ``now_ms`` and without those older than the window."""
    kept = {k: v for k, v in recent.items() if 0 <= now_ms - v < window_ms}
    return {**kept, key: now_ms}


# --- failures worth not paying for again ---------------------------------------------------

_AUTH = re.compile(
    r"\b(?:401|403)\b|unauthori[sz]ed|authentication (?:failed|error|required)"
    r"|invalid (?:api[ _-]?key|x-api-key|token)|not logged in|please run /login"
    r"|credentials? (?:are |is )?(?:missing|invalid|expired)",
    re.IGNORECASE,
)
_QUOTA = re.compile(
    r"\b429\b|rate[ _-]?limit|quota|credit balance|usage limit|insufficient[ _]credits?"
    r"|billing|overloaded_error",
    re.IGNORECASE,
)


def classify_failure(text: str) -> Literal["auth", "quota"] | None:
    """``auth`` or ``quota`` when a failed turn's output says so, else None."""
    if _AUTH.search(text):
        return "auth"
    if _QUOTA.search(text):
        return "quota"
    return None
