"""Reply classification: every quoted provider reply, class defaults, user rules, config errors."""

from __future__ import annotations

import pytest

from relayd import replies
from relayd.errors import ConfigError, UpstreamError

QUOTED = [
    (550, "5.4.5 Daily user sending limit exceeded. For more information", "pause"),
    (550, "5.7.1 Daily SMTP relay limit exceeded for customer. For more", "pause"),
    (554, "5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed", "pause"),
    (454, "Throttling failure: Maximum sending rate exceeded.", "throttle"),
    (454, "Throttling failure: Daily message quota exceeded.", "pause"),
    (454, "4.7.0 Too many login attempts, please try again later.", "pause"),
    (
        432,
        "4.3.2 STOREDRV.ClientSubmit; sender thread limit / concurrent connection limit exceeded",
        "throttle",
    ),
    (432, "4.3.2 Concurrent connections limit exceeded.", "throttle"),
    (554, "5.2.2 mailbox full; STOREDRV.Submission.Exception:QuotaExceededException.Mapi", "pause"),
    (421, "4.7.0 Try again later, closing connection.", "throttle"),
    (451, "Authentication failed: Could not authenticate", "reauth"),
    (550, "5.4.5 Daily SMTP relay limit exceeded for user.", "pause"),
    (450, "4.2.1 Peak SMTP relay limit exceeded for customer.", "throttle"),
    (535, "5.7.8 Username and Password not accepted.", "reauth"),
    (534, "5.7.9 Application-specific password required.", "reauth"),
]


@pytest.mark.parametrize(("code", "text", "action"), QUOTED)
def test_builtin_rules_cover_every_quoted_reply(code: int, text: str, action: str) -> None:
    """Each provider reply quoted in the docs maps to its action through the built-ins."""
    verdict = replies.classify(code, "", text, replies.table())
    assert verdict.action == action, verdict.reply
    assert verdict.rule is not None and verdict.rule.source == "builtin"
    assert verdict.upstream


def test_connection_limit_throttles_connections_not_rate() -> None:
    """432 4.3.2 lowers concurrency: the rule names connections as what it limits."""
    verdict = replies.classify(
        432, "4.3.2", "concurrent connection limit exceeded", replies.BUILTIN
    )
    assert verdict.rule is not None and verdict.rule.limit == "connections"


def test_daily_pause_lasts_an_hour_then_probes() -> None:
    """A rolling-window daily limit pauses for DAILY_PAUSE (documented choice), not 24 h."""
    verdict = replies.classify(550, "5.4.5", "Daily user sending limit exceeded", replies.BUILTIN)
    assert verdict.seconds == replies.DAILY_PAUSE == 3600.0


@pytest.mark.parametrize(
    ("code", "text", "action"),
    [
        (450, "4.2.1 Mailbox busy", "retry"),
        (550, "5.1.1 No such user", "fail"),
        (552, "5.3.4 Message too big", "fail"),
        (451, "4.3.0 Local error", "retry"),
    ],
)
def test_unmatched_replies_fall_to_class_defaults(code: int, text: str, action: str) -> None:
    """A reply no rule knows: 4xx retries, 5xx fails, with no rule attached."""
    verdict = replies.classify(code, "", text, replies.table())
    assert (verdict.action, verdict.rule) == (action, None)
    assert not verdict.upstream


def test_user_rules_come_first() -> None:
    """A user rule overrides the built-in for the same reply (here: 550 5.4.5 fails)."""
    user = replies.compile_rules(
        replies.parse(
            "upstream.replies",
            [
                {"match": "^550 5\\.4\\.5", "action": "fail"},
            ],
        )
    )
    verdict = replies.classify(
        550, "", "5.4.5 Daily user sending limit exceeded", replies.table(user)
    )
    assert verdict.action == "fail"
    assert verdict.rule is not None and verdict.rule.source == "user"


def test_preset_rules_are_marked_preset_and_tried_before_builtins() -> None:
    """table(preset=…) puts that provider's rules first, marked source=preset."""
    rules = replies.table(preset="sendgrid")
    verdict = replies.classify(451, "", "Authentication failed: bad key", rules)
    assert verdict.rule is not None and verdict.rule.source == "preset"


def test_enhanced_code_split_from_text() -> None:
    """The enhanced code passed separately or inside the text gives the same line."""
    a = replies.classify(550, "5.4.5", "Daily user sending limit exceeded", replies.BUILTIN)
    b = replies.classify(550, "", "5.4.5 Daily user sending limit exceeded", replies.BUILTIN)
    assert a.reply == b.reply == "550 5.4.5 Daily user sending limit exceeded"


def test_multiline_reply_is_matched_as_one_line() -> None:
    """A reply continued over several lines is joined, so a rule sees all of its words."""
    verdict = replies.classify(
        554,
        "",
        "5.2.0 STOREDRV.Submission.Exception:\nSubmissionQuotaExceededException",
        replies.BUILTIN,
    )
    assert verdict.action == "pause"


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ([{"match": "(", "action": "pause"}], "upstream.replies[0].match"),
        ([{"match": "^550", "action": "explode"}], "upstream.replies[0].action"),
        ([{"match": "^550", "action": "pause", "for": -1}], "upstream.replies[0].for"),
        ([{"match": "^550", "action": "pause", "limit": "x"}], "upstream.replies[0].limit"),
        ([{"match": "^550", "action": "pause", "when": 1}], "upstream.replies[0].when"),
        (["^550"], "upstream.replies[0]"),
        ("^550", "upstream.replies"),
    ],
)
def test_bad_user_rule_is_one_config_error_naming_the_key(raw: object, key: str) -> None:
    """An invalid regex, action, duration or shape names the exact key."""
    with pytest.raises(ConfigError) as info:
        replies.parse("upstream.replies", raw)
    assert info.value.key == key
    assert "\n" not in str(info.value)


def test_relayd_errors_are_synthetic_server_replies_are_not() -> None:
    """An UpstreamError without a server code is synthetic; one carrying a reply is not."""
    lost = UpstreamError("connection lost during DATA", step="data", temporary=True)
    refused = UpstreamError("AUTH refused", step="auth", temporary=True, code=535, text="no")
    assert lost.synthetic and not refused.synthetic
