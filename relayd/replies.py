"""What a provider's reply means, as data: a table of rules from regex to action.

A reply is matched as one line, "CODE ENHANCED TEXT" (``550 5.4.5 Daily user sending limit
exceeded``), against user rules first, then the preset's, then the built-ins; the first match
wins, and the class defaults (4xx retry, 5xx fail) end every table. Only replies a server sent
are classified: relayd's own errors (connection lost, timed out, no STARTTLS) carry no code and
are marked ``synthetic`` where they are made, so a rule can never re-trigger on its own words.

Actions:
    pause     the upstream is over a quota: stop using it for ``seconds``; the message waits
    throttle  slow the upstream down (its rate, or its connections) for ``seconds``; retry soon
    reauth    the credentials are refused: the upstream waits for a config change or a probe
    retry     the message's own temporary outcome (generic backoff)
    fail      the message's own permanent outcome
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from relayd.errors import ConfigError

ACTIONS = ("pause", "throttle", "reauth", "retry", "fail")
UPSTREAM_ACTIONS = ("pause", "throttle", "reauth")  # about the upstream, not the message
LIMITS = ("rate", "connections")  # what a throttle lowers

# A rolling 24-hour window frees capacity as the sends of 24 h ago age out; relayd cannot see
# when those were (other clients share the account), and a refused probe does not count
# against the quota. So a daily-limit pause ends after an hour and one message probes; another
# refusal pauses again. Waiting the full 24 h would hold mail up to 23 h longer than needed.
DAILY_PAUSE = 3600.0
THROTTLE_FOR = 60.0
# A refused login is probed again after the retry backoff (as Postfix soft-bounces SASL
# failures), and at once after a config reload: None here means "the backoff".
REAUTH_FOR = None
_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})(?:\s+|$)")


@dataclass(frozen=True, slots=True)
class Rule:
    """One row of a reply table."""

    match: re.Pattern[str]
    action: str
    seconds: float | None = None  # how long a pause/throttle/reauth lasts; None: the default
    source: str = "builtin"  # builtin | preset | user
    limit: str = "rate"  # for throttle: rate | connections
    note: str = ""  # who answers this way, for docs/providers.md and the log


@dataclass(frozen=True, slots=True)
class Verdict:
    """What relayd does about one reply."""

    action: str
    seconds: float | None
    reply: str  # the line that was matched
    rule: Rule | None = None  # None: a class default

    @property
    def upstream(self) -> bool:
        """True when the reply is about the upstream (quota, rate, login), not the message."""
        return self.action in UPSTREAM_ACTIONS


def _rule(pattern: str, action: str, seconds: float | None, note: str, **kw: Any) -> Rule:
    return Rule(re.compile(pattern, re.IGNORECASE), action, seconds, "builtin", note=note, **kw)


# Per provider, the replies its documentation (docs/providers.md) gives for quotas and logins.
PRESETS: dict[str, tuple[Rule, ...]] = {
    "gmail": (
        _rule(
            r"^550 5\.4\.5 Daily user sending (limit|quota) exceeded",
            "pause",
            DAILY_PAUSE,
            "Gmail: daily sending limit (rolling 24 h)",
        ),
        _rule(
            r"^454 4\.7\.0 Too many login attempts",
            "pause",
            600.0,
            "Gmail: too many logins; every retry is one more",
        ),
        _rule(
            r"^421 4\.7\.0 Try again later",
            "throttle",
            THROTTLE_FOR,
            "Gmail: temporary rate limit, closing the connection",
        ),
    ),
    "google-workspace": (
        _rule(
            r"^550 5\.[47]\.[15] Daily SMTP relay limit exceeded",
            "pause",
            DAILY_PAUSE,
            "Google Workspace SMTP relay: daily relay limit, per user or customer (rolling)",
        ),
        _rule(
            r"^450 4\.2\.1 Peak SMTP relay limit exceeded",
            "throttle",
            THROTTLE_FOR,
            "Google Workspace SMTP relay: 10-minute peak limit",
        ),
        _rule(
            r"^550 5\.4\.5 Daily user sending (limit|quota) exceeded",
            "pause",
            DAILY_PAUSE,
            "Google Workspace: daily sending limit (rolling 24 h)",
        ),
    ),
    "m365": (
        _rule(
            r"^554 5\.2\.0 .*SubmissionQuotaExceeded",
            "pause",
            DAILY_PAUSE,
            "Microsoft 365: recipient rate limit (rolling 24 h)",
        ),
        _rule(
            r"^554 5\.2\.2 .*QuotaExceededException",
            "pause",
            DAILY_PAUSE,
            "Microsoft 365: the sending mailbox is full (Sent Items keeps every message)",
        ),
        _rule(
            r"^4\d\d 4\.3\.2 .*(concurrent connections? limit|sender thread limit)",
            "throttle",
            THROTTLE_FOR,
            "Microsoft 365: more than 3 connections",
            limit="connections",
        ),
    ),
    "ses": (
        _rule(
            r"^454 Throttling failure: Daily message quota exceeded",
            "pause",
            DAILY_PAUSE,
            "Amazon SES: 24-hour sending quota (rolling)",
        ),
        _rule(
            r"^454 Throttling failure: Maximum sending rate exceeded",
            "throttle",
            THROTTLE_FOR,
            "Amazon SES: per-second sending rate",
        ),
    ),
    "sendgrid": (
        _rule(
            r"^451 .*Authentication failed",
            "reauth",
            REAUTH_FOR,
            "SendGrid: wrong or revoked API key (answered with a 451)",
        ),
    ),
}
PRESETS["google-relay"] = PRESETS["google-workspace"]

GENERIC: tuple[Rule, ...] = (
    _rule(r"^535 ", "reauth", REAUTH_FOR, "any provider: credentials refused"),
    _rule(r"^534 ", "reauth", REAUTH_FOR, "any provider: another login method required"),
    _rule(r"^421 4\.7\.0 Try again later", "throttle", THROTTLE_FOR, "any provider"),
)

# Every provider's table, then the generic rules: a reply this specific means one thing.
BUILTIN: tuple[Rule, ...] = (
    *(
        rule
        for name in ("gmail", "google-workspace", "m365", "ses", "sendgrid")
        for rule in PRESETS[name]
    ),
    *GENERIC,
)


def table(user: Sequence[Rule] = (), preset: str = "") -> tuple[Rule, ...]:
    """The rules for one upstream, in the order they are tried: user, preset, built-in."""
    own = tuple(
        Rule(r.match, r.action, r.seconds, "preset", r.limit, r.note)
        for r in PRESETS.get(preset, ())
    )
    return (*user, *own, *BUILTIN)


def split_enhanced(text: str) -> tuple[str, str]:
    """("5.4.5", "Daily user ...") from a reply text that starts with an enhanced code."""
    m = _ENHANCED.match(text)
    return (m.group(1), text[m.end() :]) if m else ("", text)


def reply_line(code: int, enhanced: str, text: str) -> str:
    """The one line rules are matched against; a multi-line reply is joined by spaces."""
    words = " ".join(text.split())
    return " ".join(part for part in (str(code), enhanced, words) if part)


def classify(code: int, enhanced: str, text: str, rules: Iterable[Rule]) -> Verdict:
    """The first rule that matches the reply, else its class default (4xx retry, 5xx fail).

    Only a reply the server sent may be passed here, never one of relayd's synthetic errors.
    """
    if not enhanced:
        enhanced, text = split_enhanced(text)
    line = reply_line(code, enhanced, text)
    for rule in rules:
        if rule.match.search(line):
            return Verdict(rule.action, rule.seconds, line, rule)
    return Verdict("fail" if 500 <= code < 600 else "retry", None, line)


def parse(key: str, value: Any) -> tuple[dict[str, Any], ...]:
    """Validate user rules from config (``replies: [{match, action, for}]``) into plain data.

    Plain data travels to the delivery process as JSON; ``compile_rules`` makes Rules of it.
    """
    if value in (None, ""):
        return ()
    if not isinstance(value, list | tuple):
        raise ConfigError(key, "expected a list of {match, action, for}")
    out = []
    for i, item in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(where, "expected a mapping with match and action")
        unknown = set(item) - {"match", "action", "for", "limit"}
        if unknown:
            raise ConfigError(f"{where}.{sorted(unknown)[0]}", "unknown key")
        pattern = item.get("match")
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(f"{where}.match", "expected a regular expression")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"{where}.match", f"not a valid regular expression: {exc}") from None
        action = item.get("action")
        if action not in ACTIONS:
            raise ConfigError(f"{where}.action", f"expected {'|'.join(ACTIONS)}, got {action!r}")
        seconds = item.get("for")
        if seconds is not None and (
            isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds <= 0
        ):
            raise ConfigError(f"{where}.for", f"expected seconds > 0, got {seconds!r}")
        limit = item.get("limit", "rate")
        if limit not in LIMITS:
            raise ConfigError(f"{where}.limit", f"expected {'|'.join(LIMITS)}, got {limit!r}")
        out.append(
            {"match": pattern, "action": action, "for": seconds and float(seconds), "limit": limit}
        )
    return tuple(out)


def compile_rules(raw: Iterable[dict[str, Any]]) -> tuple[Rule, ...]:
    """User rules (validated by ``parse``) as Rules, in their config order."""
    return tuple(
        Rule(
            re.compile(r["match"], re.IGNORECASE),
            r["action"],
            r.get("for"),
            "user",
            r.get("limit", "rate"),
        )
        for r in raw
    )
