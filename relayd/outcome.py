"""The at-least-once outcome policy, as pure functions: what an attempt's outcomes mean.

decide() takes a queued envelope, the upstream's per-recipient outcomes, the time and the retry
settings, and returns a Decision: sent (remove it), deferred (save it, due after delay), failed
or expired (move it to failed/ with a reason), plus the facts the relay logs and counts. No I/O:
relay.Relay carries the decision out.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from relayd.config import RetryConfig
from relayd.envelope import HISTORY_LIMIT, Envelope, Recipient, iso
from relayd.states import AttemptResult, OutcomeStatus, RcptState
from relayd.upstream import Outcome

# Characters of a provider reply kept in logs, the spool and status reports: a reply can be
# 32 KiB, and 20 history entries of that would be 640 KiB per envelope.
REPLY_TEXT_LIMIT = 1000

_RCPT_STATE = {
    OutcomeStatus.DELIVERED: RcptState.DELIVERED,
    OutcomeStatus.PERMANENT: RcptState.REFUSED,
}


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with a message after an attempt, and what to log and count about it."""

    kind: AttemptResult
    env: Envelope  # as it is to be saved or moved (unchanged-but-for-reason when expired early)
    delay: float = 0.0  # seconds until the next attempt (deferred only)
    reason: str = ""  # failed/expired: why, as kept in the envelope
    delivered: tuple[Outcome, ...] = ()  # recipients the upstream accepted (delivery.sent)
    refused: tuple[Outcome, ...] = ()  # recipients refused permanently (delivery.refused)
    worst: Outcome | None = None  # the outcome that decided a deferral or failure
    temporary: bool = False  # some recipient failed temporarily (no reset of the failure run)

    @property
    def error_fields(self) -> dict[str, Any]:
        """step, code and text of the deciding outcome, for a log line."""
        w = self.worst
        return {"step": w.step, "code": w.code, "text": w.text} if w else {}


def backoff(attempts: int, initial: float, maximum: float, rand: float | None = None) -> float:
    """Delay before the next try: initial * 2^(attempts-1), capped, with ±25 % jitter.

    Jitter spreads the retries of a burst that failed together, so a provider coming back is
    not hit by all of them in the same second.
    """
    base = min(maximum, initial * 2.0 ** max(0, attempts - 1))
    factor = 0.75 + 0.5 * (random.random() if rand is None else rand)  # noqa: S311 - not crypto
    return min(maximum, base * factor)


def expiry(env: Envelope, now: float, retry: RetryConfig) -> Decision | None:
    """Before an attempt: an expired message is failed without being tried; else None."""
    if now - env.created_at <= retry.max_age:
        return None
    reason = expired_reason(env, retry)
    return Decision(AttemptResult.EXPIRED, dataclasses.replace(env, reason=reason), reason=reason)


def decide(
    env: Envelope,
    outcomes: Sequence[Outcome],
    now: float,
    retry: RetryConfig,
    rand: float | None = None,
    trail: Mapping[str, Any] | None = None,
) -> Decision:
    """The decision for env after an attempt that ended with outcomes (one per recipient tried).

    rand fixes backoff()'s jitter (tests); None draws it. trail is recorded in the attempt's
    history entry (the upstream used, those failed over from, the sender it was sent as).
    """
    by_addr = {o.address: o for o in outcomes}
    rcpts = tuple(_updated(r, by_addr.get(r.address)) for r in env.rcpt_to)
    temporary = [o for o in outcomes if o.status == OutcomeStatus.TEMPORARY]
    permanent = [o for o in outcomes if o.status == OutcomeStatus.PERMANENT]
    worst = next(iter(temporary or permanent or outcomes), None)
    facts: dict[str, Any] = {
        "delivered": tuple(o for o in outcomes if o.status == OutcomeStatus.DELIVERED),
        "refused": tuple(permanent),
        "worst": worst,
        "temporary": bool(temporary),
    }
    if not temporary and all(r.state == RcptState.DELIVERED for r in rcpts):
        return Decision(AttemptResult.SENT, env, **facts)  # removed: no history to write
    result = AttemptResult.DEFERRED if temporary else AttemptResult.FAILED
    env = _attempted(env, rcpts, result, worst, now, trail or {})
    if not env.pending:
        reason = refusal_reason(env)
        env = dataclasses.replace(env, reason=reason)
        return Decision(AttemptResult.FAILED, env, reason=reason, **facts)
    if now - env.created_at > retry.max_age:
        reason = expired_reason(env, retry)
        env = dataclasses.replace(env, reason=reason)
        return Decision(AttemptResult.EXPIRED, env, reason=reason, **facts)
    delay = backoff(env.attempts, retry.initial_delay, retry.max_delay, rand)
    env = dataclasses.replace(env, next_attempt_at=now + delay)
    return Decision(AttemptResult.DEFERRED, env, delay=delay, **facts)


def _attempted(
    env: Envelope,
    rcpts: tuple[Recipient, ...],
    result: AttemptResult,
    worst: Outcome | None,
    now: float,
    trail: Mapping[str, Any],
) -> Envelope:
    """env after one more attempt: recipients' states, the attempt count, history, last error."""
    entry: dict[str, Any] = {"at": iso(now), "attempt": env.attempts + 1, "result": result}
    entry.update(trail)
    if worst is not None:
        entry.update(step=worst.step, code=worst.code, text=worst.text)
    env = dataclasses.replace(
        env,
        rcpt_to=rcpts,
        attempts=env.attempts + 1,
        history=(*env.history, entry)[-HISTORY_LIMIT:],
    )
    if worst is not None and worst.status != OutcomeStatus.DELIVERED:
        error = {"step": worst.step, "code": worst.code, "text": worst.text, "at": iso(now)}
        env = dataclasses.replace(env, last_error=error)
    return env


def _updated(r: Recipient, o: Outcome | None) -> Recipient:
    if o is None or r.state != RcptState.PENDING:
        return r
    return Recipient(r.address, _RCPT_STATE.get(o.status, RcptState.PENDING), o.code, o.text)


def refusal_reason(env: Envelope) -> str:
    refused = [r for r in env.rcpt_to if r.state == RcptState.REFUSED]
    # relayd's own refusals carry no reply code: no "None" in the reason.
    return "; ".join(f"{r.address}: {r.code or ''} {r.reply}".replace(":  ", ": ") for r in refused)


def expired_reason(env: Envelope, retry: RetryConfig) -> str:
    last = env.last_error or {}
    return (
        f"expired after {env.attempts} attempts over {retry.max_age:.0f}s; "
        f"last error: {last.get('code') or ''} {last.get('text') or 'none'}"
    ).strip()


def clip(text: str) -> str:
    """A provider's words as relayd keeps them: at most REPLY_TEXT_LIMIT characters."""
    return text if len(text) <= REPLY_TEXT_LIMIT else text[: REPLY_TEXT_LIMIT - 1] + "…"


def clipped(o: Outcome) -> Outcome:
    """o with its reply text clipped (the same object when it is short enough)."""
    return o if len(o.text) <= REPLY_TEXT_LIMIT else dataclasses.replace(o, text=clip(o.text))


def reply_class(code: int | None) -> str:
    """The metric label of a reply code: 5xx, 4xx, or none."""
    return f"{code // 100}xx" if code else "none"
