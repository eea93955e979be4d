"""The at-least-once outcome policy (outcome.decide / outcome.expiry), table by table, no I/O."""

from __future__ import annotations

import pytest

from relayd.config import RetryConfig
from relayd.outcome import Decision, decide, expiry
from relayd.spool import HISTORY_LIMIT, Envelope, Recipient, iso
from relayd.states import AttemptResult, OutcomeStatus, RcptState
from relayd.upstream import Outcome

NOW = 1_800_000_000.0
RETRY = RetryConfig(initial_delay=60.0, max_delay=3600.0, max_age=86400.0)
A, B, C = "a@example.com", "b@example.com", "c@example.com"
D, T, P = OutcomeStatus.DELIVERED, OutcomeStatus.TEMPORARY, OutcomeStatus.PERMANENT
CODE = {D: 250, T: 450, P: 550}


def envelope(*rcpts: str, attempts: int = 0, age: float = 10.0, **kw: object) -> Envelope:
    return Envelope(
        "1.abc",
        "s@example.com",
        tuple(Recipient(r) for r in rcpts),
        NOW - age,
        100,
        attempts=attempts,
        **kw,  # type: ignore[arg-type]
    )


def outcomes(**by_rcpt: OutcomeStatus) -> list[Outcome]:
    addr = {"a": A, "b": B, "c": C}
    return [
        Outcome(addr[k], s, CODE[s], f"{CODE[s]} words", "data" if s == D else "rcpt")
        for k, s in by_rcpt.items()
    ]


def run(env: Envelope, outs: list[Outcome]) -> Decision:
    return decide(env, outs, NOW, RETRY, rand=0.5)


# (recipients, outcomes by recipient, kind, recipient states after, pending after)
KINDS = [
    ((A,), {"a": D}, AttemptResult.SENT, None),
    ((A, B), {"a": D, "b": D}, AttemptResult.SENT, None),
    ((A, B), {"a": D, "b": T}, AttemptResult.DEFERRED, (RcptState.DELIVERED, RcptState.PENDING)),
    ((A, B), {"a": D, "b": P}, AttemptResult.FAILED, (RcptState.DELIVERED, RcptState.REFUSED)),
    ((A, B, C), {"a": D, "b": T, "c": P}, AttemptResult.DEFERRED,
     (RcptState.DELIVERED, RcptState.PENDING, RcptState.REFUSED)),
    ((A, B), {"a": P, "b": P}, AttemptResult.FAILED, (RcptState.REFUSED, RcptState.REFUSED)),
    ((A,), {"a": T}, AttemptResult.DEFERRED, (RcptState.PENDING,)),
    ((A, B), {"a": T, "b": T}, AttemptResult.DEFERRED, (RcptState.PENDING, RcptState.PENDING)),
    ((A, B), {"a": T, "b": P}, AttemptResult.DEFERRED, (RcptState.PENDING, RcptState.REFUSED)),
]  # fmt: skip


@pytest.mark.parametrize(("rcpts", "by_rcpt", "kind", "states"), KINDS)
def test_the_kind_and_recipient_states_follow_from_the_outcomes(rcpts, by_rcpt, kind, states):
    """All 250 is sent; any 4xx defers; only 5xx left fails; each recipient keeps its state."""
    d = run(envelope(*rcpts), outcomes(**by_rcpt))
    assert d.kind == kind
    if states is not None:
        assert tuple(r.state for r in d.env.rcpt_to) == states
        assert d.env.attempts == 1


# (outcomes, delivered, refused, temporary, worst status)
FACTS = [
    ({"a": D, "b": D}, 2, 0, False, D),
    ({"a": D, "b": T}, 1, 0, True, T),
    ({"a": D, "b": P}, 1, 1, False, P),
    ({"a": P, "b": T}, 0, 1, True, T),
    ({"a": P, "b": P}, 0, 2, False, P),
]


@pytest.mark.parametrize(("by_rcpt", "delivered", "refused", "temporary", "worst"), FACTS)
def test_the_facts_name_what_to_log_and_count(by_rcpt, delivered, refused, temporary, worst):
    """delivered/refused list the recipients; worst is a 4xx before a 5xx before a 250."""
    d = run(envelope(A, B), outcomes(**by_rcpt))
    assert (len(d.delivered), len(d.refused), d.temporary) == (delivered, refused, temporary)
    assert d.worst is not None and d.worst.status == worst


def test_a_sent_message_is_left_as_it_was():
    """Sent: the envelope is not rewritten (it is removed), so no history entry is built."""
    env = envelope(A)
    d = run(env, outcomes(a=D))
    assert d.env is env and d.delay == 0.0 and d.reason == ""


# (attempts before, rand, expected delay)
DELAYS = [(0, 0.5, 60.0), (1, 0.5, 120.0), (2, 0.5, 240.0), (3, 0.0, 360.0), (10, 1.0, 3600.0)]


@pytest.mark.parametrize(("attempts", "rand", "delay"), DELAYS)
def test_a_deferral_backs_off_exponentially_with_a_cap(attempts, rand, delay):
    """The n-th attempt waits initial_delay * 2^(n-1), ±25 % jitter, at most max_delay."""
    d = decide(envelope(A, attempts=attempts), outcomes(a=T), NOW, RETRY, rand=rand)
    assert d.kind == AttemptResult.DEFERRED
    assert d.delay == pytest.approx(delay)
    assert d.env.next_attempt_at == pytest.approx(NOW + delay)


def test_a_deferral_records_history_and_last_error():
    """The attempt goes into history and last_error with its step, code, text and time."""
    d = run(envelope(A, attempts=2), outcomes(a=T))
    entry = d.env.history[-1]
    assert entry == {
        "at": iso(NOW),
        "attempt": 3,
        "result": "deferred",
        "step": "rcpt",
        "code": 450,
        "text": "450 words",
    }
    assert d.env.last_error == {"step": "rcpt", "code": 450, "text": "450 words", "at": iso(NOW)}


def test_history_is_capped():
    """History keeps only the last HISTORY_LIMIT attempts."""
    old = tuple({"attempt": n} for n in range(HISTORY_LIMIT))
    d = run(envelope(A, attempts=HISTORY_LIMIT, history=old), outcomes(a=T))
    assert len(d.env.history) == HISTORY_LIMIT
    assert d.env.history[0] == {"attempt": 1} and d.env.history[-1]["attempt"] == HISTORY_LIMIT + 1


def test_a_partial_delivery_keeps_the_error_of_the_failed_recipient():
    """250 for one and 450 for another: last_error is the 450, not the 250."""
    d = run(envelope(A, B), outcomes(a=D, b=T))
    assert d.env.last_error is not None and d.env.last_error["code"] == 450


def test_all_refused_fails_with_every_refusal_as_reason():
    """Every recipient refused: failed, the reason lists each address and reply."""
    d = run(envelope(A, B), outcomes(a=P, b=P))
    assert d.kind == AttemptResult.FAILED
    assert d.reason == f"{A}: 550 550 words; {B}: 550 550 words"
    assert d.env.reason == d.reason


def test_a_deferral_past_max_age_expires():
    """A temporary failure of a message older than retry.max_age expires it instead."""
    d = run(envelope(A, attempts=4, age=RETRY.max_age + 1), outcomes(a=T))
    assert d.kind == AttemptResult.EXPIRED
    assert d.reason == "expired after 5 attempts over 86400s; last error: 450 450 words"
    assert d.env.history[-1]["result"] == "deferred"


def test_expiry_before_an_attempt():
    """expiry(): a message past max_age is failed untried, with its last error as reason."""
    env = envelope(A, attempts=3, age=RETRY.max_age + 1, last_error={"code": 421, "text": "busy"})
    d = expiry(env, NOW, RETRY)
    assert d is not None and d.kind == AttemptResult.EXPIRED
    assert d.env.attempts == 3 and d.env.reason == d.reason
    assert d.reason == "expired after 3 attempts over 86400s; last error: 421 busy"
    assert expiry(envelope(A, age=RETRY.max_age - 1), NOW, RETRY) is None


def test_expiry_without_any_error():
    """A message that never got an answer expires with 'none' as its last error."""
    d = expiry(envelope(A, age=RETRY.max_age + 1), NOW, RETRY)
    assert d is not None and d.reason.endswith("last error:  none")
