"""Mail transactions over a logged-in session: MAIL, RCPT, then BDAT or DATA, in flights.

With PIPELINING (RFC 2920) the commands of a transaction go in one write and the replies are
read back in order, one per command, so each recipient's outcome is the reply to its own RCPT.
With CHUNKING (RFC 3030) the body is one ``BDAT <size> LAST`` carrying the message as stored
(no dot stuffing): nothing waits for a 354, so the transactions of a whole flight go in one
write and a flight of n messages costs one round trip, not 2n. Without PIPELINING every
command waits for its reply (RFC 5321 lock-step).
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from relayd import replies
from relayd.errors import UpstreamError
from relayd.link import DATA_CHUNK, Link, Reply, crlf_normalised, stuffed_chunks
from relayd.states import OutcomeStatus

_S = OutcomeStatus
DELIVERED, TEMPORARY, PERMANENT = _S.DELIVERED, _S.TEMPORARY, _S.PERMANENT

# A message to send again in the same call: its MAIL met a transaction an earlier failure in
# the flight left open (503), or the server refused its BDAT and DATA may do.
RETRY, FALLBACK = "retry", "fallback"
TRIES = 3  # rounds one message may take within one call
_BUILTIN = replies.table()


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the upstream said about one recipient of one message."""

    address: str
    status: OutcomeStatus
    code: int | None
    text: str
    step: str
    # True when relayd wrote the code and text (e.g. copied a session error onto every
    # recipient), not the server about this recipient: never classified by reply rules.
    synthetic: bool = False


@dataclass(frozen=True, slots=True)
class Submission:
    """One message to send: the envelope and the bytes as spooled."""

    mail_from: str
    rcpt_to: tuple[str, ...]
    data: bytes = field(repr=False)


Outcomes = list[Outcome]
Result = Outcomes | UpstreamError


def status(code: int | None, text: str = "") -> OutcomeStatus:
    """A reply's status for its message by relayd.replies' class defaults (4xx retry, 5xx
    fail); the upstream's own rules (pause, throttle, reauth) are applied by relayd.provider,
    which sees every outcome. No code (relayd's own words): temporary."""
    if code is None:
        return TEMPORARY
    fail = replies.classify(code, "", text, ()).action == "fail"
    return PERMANENT if fail else TEMPORARY


class Channel:
    """The transaction path of one session, over the Link that took its transport over."""

    def __init__(self, link: Link, extensions: dict[str, str]) -> None:
        self.link = link
        self.extensions = extensions
        self.pipelining = "pipelining" in extensions
        self.chunking = "chunking" in extensions
        self.sent = 0
        # A transaction may be open (MAIL accepted, no final 250 yet): RSET before the next.
        # After a 250 to the body the session is clean (RFC 5321 §4.1.1.4): no RSET needed.
        self.dirty = False

    async def send_many(self, subs: Sequence[Submission]) -> list[Result]:
        """Each message's per-recipient outcomes, or the UpstreamError that left it unsent.

        A message has outcomes only from the replies to its own commands; once the session
        breaks, every message without its final reply gets the error (and stays queued).
        """
        results: dict[int, Result] = {
            i: [_unencodable(a, "rcpt" if _clean(sub.mail_from) else "mail") for a in sub.rcpt_to]
            for i, sub in enumerate(subs)
            if not _clean(sub.mail_from) or not _sendable(sub)
        }
        todo = [(i, self.chunking) for i in range(len(subs)) if i not in results]
        tries: collections.Counter[int] = collections.Counter()
        fell_back: set[int] = set()
        try:
            while todo:
                got = await self._round([(subs[i], bdat) for i, bdat in todo])
                again = []
                for (i, bdat), result in zip(todo, got, strict=True):
                    tries[i] += 1
                    if isinstance(result, str) and tries[i] < TRIES:
                        again.append((i, bdat and result != FALLBACK))
                        fell_back.update([i] if result == FALLBACK else [])
                    elif isinstance(result, str):
                        results[i] = _unsent(subs[i], "the server kept refusing the sequence")
                    else:
                        results[i] = result
                        if i in fell_back and any(o.status == DELIVERED for o in result):
                            self.chunking = False  # BDAT fails where DATA works: DATA from now
                todo = again
        except _Broken as broken:
            for k, result in enumerate(broken.done):
                if not isinstance(result, str):
                    results[todo[k][0]] = result
            for i in range(len(subs)):
                results.setdefault(i, broken.error)
        return [results[i] for i in range(len(subs))]

    async def _round(self, items: list[tuple[Submission, bool]]) -> list[Outcomes | str]:
        done: list[Outcomes | str] = []
        try:
            if not self.pipelining:
                for sub, bdat in items:
                    done.append(await self._lockstep(sub, bdat))
                return done
            groups = _groups(items)
            carried = False  # this group's commands went out with the body before it
            for k, group in enumerate(groups):
                rset = self.dirty and not carried
                if not carried:
                    # If the write breaks, the replies to what did go out may be here
                    # already: read those (the server may have taken a message).
                    with contextlib.suppress(UpstreamError):
                        await self._write_group(group, rset)
                if rset:
                    await self._expect_rset()
                # A DATA body ends its group; the next group's commands ride with it, so
                # each DATA transaction costs one round trip, not two (RFC 2920 §3.1).
                tail = self._small_group(groups[k + 1]) if k + 1 < len(groups) else None
                carried = False
                for sub, bdat in group:
                    result, carried = await self._collect(sub, bdat, tail or b"")
                    done.append(result)
            return done
        except UpstreamError as err:
            raise _Broken(err, done) from err

    # -- pipelined -----------------------------------------------------------------------------

    async def _write_group(self, group: list[tuple[Submission, bool]], rset: bool) -> None:
        """RSET if asked, then each transaction's commands; one write unless bodies are big."""
        head = b"RSET\r\n" if rset else b""
        small = self._small_group(group)
        if small is not None:
            await self._send(head + small, "mail")
            return
        buf = bytearray(head)
        for sub, bdat in group:
            buf += self._envelope(sub)
            if not bdat:
                buf += b"DATA\r\n"
                continue
            body = crlf_normalised(sub.data)
            buf += b"BDAT %d LAST\r\n" % len(body)
            await self._send(buf, "mail")
            buf = bytearray()
            await self._write_chunked(body)
        if buf:
            await self._send(buf, "mail")

    def _small_group(self, group: list[tuple[Submission, bool]]) -> bytes | None:
        """The group's commands (and BDAT bodies) as one write, if its bodies are small."""
        if sum(len(sub.data) for sub, bdat in group if bdat) > DATA_CHUNK:
            return None
        buf = bytearray()
        for sub, bdat in group:
            buf += self._envelope(sub)
            if bdat:
                body = crlf_normalised(sub.data)
                buf += b"BDAT %d LAST\r\n" % len(body) + body
            else:
                buf += b"DATA\r\n"
        return bytes(buf)

    async def _write_chunked(self, body: bytes) -> None:
        view = memoryview(body)
        for start in range(0, len(body), DATA_CHUNK):
            await self._send(view[start : start + DATA_CHUNK], "bdat")

    async def _collect(
        self, sub: Submission, bdat: bool, tail: bytes
    ) -> tuple[Outcomes | str, bool]:
        """Read one transaction's replies, in the order its commands went out; a DATA body
        takes the tail (the next commands) along: say whether it did."""
        mail = await self._read("mail")
        rcpts = [await self._read("rcpt") for _ in _sendable(sub)]
        if bdat:
            return self._judge(sub, mail, rcpts, await self._read("bdat"), "bdat"), False
        start = await self._read("data")
        if start.code != 354:
            return self._judge(sub, mail, rcpts, start, "data"), False
        if mail.code == 250 and any(r.code in (250, 251) for r in rcpts):
            await self._write_body(sub.data, tail)
            return self._judge(sub, mail, rcpts, await self._read("data"), "data"), bool(tail)
        # RFC 2920 §3.1: DATA accepted although no recipient was; end it with an empty body.
        await self._send(b".\r\n", "data")
        await self._read("data")
        return self._judge(sub, mail, rcpts, Reply(554, "no valid recipients"), "data"), False

    async def _expect_rset(self) -> None:
        reply = await self._read("rset")
        if reply.code != 250:
            raise _refused("RSET failed", "rset", reply)
        self.dirty = False

    # -- lock-step --------------------------------------------------------------------------

    async def _lockstep(self, sub: Submission, bdat: bool) -> Outcomes | str:
        if self.dirty:
            await self._send(b"RSET\r\n", "rset")
            await self._expect_rset()
        lines = self._envelope(sub).split(b"\r\n")[:-1]
        await self._send(lines[0] + b"\r\n", "mail")
        mail = await self._read("mail")
        rcpts: list[Reply] = []
        if mail.code == 250:
            for line in lines[1:]:
                await self._send(line + b"\r\n", "rcpt")
                rcpts.append(await self._read("rcpt"))
        if mail.code != 250 or not any(r.code in (250, 251) for r in rcpts):
            return self._judge(sub, mail, rcpts, Reply(554, "no valid recipients"), "data")
        if bdat:
            body = crlf_normalised(sub.data)
            await self._send(b"BDAT %d LAST\r\n" % len(body), "bdat")
            await self._write_chunked(body)
            return self._judge(sub, mail, rcpts, await self._read("bdat"), "bdat")
        await self._send(b"DATA\r\n", "data")
        start = await self._read("data")
        if start.code == 354:
            await self._write_body(sub.data)
            return self._judge(sub, mail, rcpts, await self._read("data"), "data")
        return self._judge(sub, mail, rcpts, start, "data")

    # -- shared ------------------------------------------------------------------------------

    def _judge(
        self, sub: Submission, mail: Reply, rcpts: list[Reply], final: Reply, step: str
    ) -> Outcomes | str:
        """Map the replies of one transaction to its recipients (or say: send it again)."""
        self.dirty = True
        if mail.code != 250:
            if mail.code == 503:
                return RETRY  # a transaction left open earlier in the flight; RSET, then again
            self.sent += 1
            return [_outcome(a, mail, "mail") for a in sub.rcpt_to]
        addresses = _sendable(sub)
        refused = [_unencodable(a, "rcpt") for a in sub.rcpt_to if a not in addresses]
        refused += [
            _outcome(a, r, "rcpt")
            for a, r in zip(addresses, rcpts, strict=True)
            if r.code not in (250, 251)
        ]
        accepted = [a for a, r in zip(addresses, rcpts, strict=True) if r.code in (250, 251)]
        if accepted and step == "bdat" and 500 <= final.code < 600 and not _quota(final):
            return FALLBACK  # RFC 3030 gives no reason; DATA may work where BDAT does not
        self.sent += 1
        if not accepted:
            return refused
        self.dirty = final.code != 250
        got = DELIVERED if final.code == 250 else status(final.code, final.text)
        return refused + [Outcome(a, got, final.code, final.text, step) for a in accepted]

    def _envelope(self, sub: Submission) -> bytes:
        opts = b"".join(b" " + o for o in self._mail_options(sub))
        lines = [b"MAIL FROM:<" + sub.mail_from.encode() + b">" + opts]
        lines += [b"RCPT TO:<" + a.encode() + b">" for a in _sendable(sub)]
        return b"".join(line + b"\r\n" for line in lines)

    def _mail_options(self, sub: Submission) -> list[bytes]:
        opts: list[bytes] = []
        if "size" in self.extensions:
            opts.append(b"SIZE=%d" % len(sub.data))
        if "8bitmime" in self.extensions and not sub.data.isascii():
            opts.append(b"BODY=8BITMIME")
        if "smtputf8" in self.extensions and not all(
            a.isascii() for a in [sub.mail_from, *sub.rcpt_to]
        ):
            opts.append(b"SMTPUTF8")
        return opts

    async def _write_body(self, data: bytes, tail: bytes = b"") -> None:
        """The dot-stuffed body in flow-controlled pieces; the final dot (and the tail, the
        next commands) rides with the last."""
        last = b""
        for piece in stuffed_chunks(crlf_normalised(data)):
            if last:
                await self._send(last, "data")
            last = piece
        await self._send(last + b".\r\n" + tail, "data")

    async def _send(self, data: bytes | bytearray | memoryview, step: str) -> None:
        try:
            self.link.write(data)
            await self.link.drain()
        except TimeoutError:
            raise UpstreamError(
                f"timed out sending {step.upper()}", step=step, temporary=True
            ) from None
        except OSError as exc:
            raise _lost(step, exc) from exc

    async def _read(self, step: str) -> Reply:
        try:
            reply = await self.link.read()
        except TimeoutError:
            raise UpstreamError(
                f"no reply to {step.upper()} in time", step=step, temporary=True
            ) from None
        except OSError as exc:
            raise _lost(step, exc) from exc
        if reply.code == 421:  # the server is closing the session: nothing more is read
            raise _refused(f"{step.upper()} failed", step, reply)
        return reply


class _Broken(Exception):
    """The session broke during a round: what the round finished before that, and why."""

    def __init__(self, error: UpstreamError, done: list[Outcomes | str]) -> None:
        super().__init__(str(error))
        self.error = error
        self.done = done


def _groups(items: list[tuple[Submission, bool]]) -> list[list[tuple[Submission, bool]]]:
    """Runs of BDAT transactions, each run ending at a DATA one (its body waits for a 354)."""
    groups: list[list[tuple[Submission, bool]]] = [[]]
    for item in items:
        groups[-1].append(item)
        if not item[1]:
            groups.append([])
    return [g for g in groups if g]


def _quota(reply: Reply) -> bool:
    """A reply about the upstream (quota, rate, login) by the built-in rules: DATA would get
    the same, so the message keeps this reply and relayd.provider holds it."""
    return replies.classify(reply.code, "", reply.text, _BUILTIN).upstream


def _sendable(sub: Submission) -> list[str]:
    """Recipients that can go on the wire: no control characters, encodable (no CRLF smuggling)."""
    return [a for a in sub.rcpt_to if _clean(a)]


def _clean(address: str) -> bool:
    try:
        address.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return address.isprintable() and ">" not in address


def _unencodable(address: str, step: str) -> Outcome:
    return Outcome(
        address, PERMANENT, None, "an address cannot be sent in SMTP", step, synthetic=True
    )


def _unsent(sub: Submission, text: str) -> list[Outcome]:
    return [Outcome(a, TEMPORARY, None, text, "mail", synthetic=True) for a in sub.rcpt_to]


def _outcome(address: str, reply: Reply, step: str) -> Outcome:
    return Outcome(address, status(reply.code, reply.text), reply.code, reply.text, step)


def _refused(what: str, step: str, reply: Reply) -> UpstreamError:
    return UpstreamError(
        f"{what}: {reply.code} {reply.text}",
        step=step,
        temporary=True,
        code=reply.code,
        text=reply.text,
    )


def _lost(step: str, exc: BaseException) -> UpstreamError:
    text = str(exc) or type(exc).__name__
    return UpstreamError(
        f"connection lost during {step.upper()}: {type(exc).__name__}: {text}",
        step=step,
        temporary=True,
    )
