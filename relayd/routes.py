"""Which upstreams may carry a message: `routes:`, first match wins. Pure; no I/O.

A route matches on the envelope sender and/or the header From (globs, case-insensitive, as
Postfix lowercases its lookup keys); a route without `match` matches everything. Its `via`
names the upstreams in the order to try them, minus those whose `allowed_from` refuses the
sender. Without `routes:` every message may use every upstream, in list order. Unlike
Postfix's sender_dependent_relayhost_maps, the credentials belong to the upstream, so a
fallback never logs in to one provider with another's password.

The listener asks at MAIL (only the sender is known) and again after DATA (the header From
is); the delivery side asks once the message is loaded. All three get the same answer.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from relayd.config import Config

NULL_SENDER = "<>"  # how a glob names the empty reverse-path of bounces


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    senders: tuple[str, ...] = ()  # globs on the envelope sender; () = any
    header_from: tuple[str, ...] = ()  # globs on the header From address; () = any
    via: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Decision:
    """The route chosen and the upstreams to try in order; `refusal` says why there are none."""

    route: str
    via: tuple[str, ...]
    refusal: str = ""


def matches(globs: tuple[str, ...], address: str) -> bool:
    """Whether address matches one of globs; () matches anything."""
    if not globs:
        return True
    subject = address.lower() if address else NULL_SENDER
    return any(fnmatch.fnmatchcase(subject, g.lower()) for g in globs)


class Table:
    """The routes of one config, with each upstream's allowed_from."""

    def __init__(self, routes: tuple[Route, ...], allowed_from: dict[str, tuple[str, ...]]) -> None:
        self.allowed_from = allowed_from
        self.routes = routes or (Route("default", via=tuple(allowed_from)),)
        self.uses_header_from = any(r.header_from for r in self.routes)
        # No routes and no allowed_from: every sender is taken (the listener skips the check).
        self.takes_everyone = not routes and not any(allowed_from.values())

    def chain(self, route: Route, sender: str) -> tuple[str, ...]:
        return tuple(n for n in route.via if matches(self.allowed_from.get(n, ()), sender))

    def decide(self, sender: str, header_from: str | None) -> Decision:
        """The first route that matches; header_from None means not known (yet)."""
        for route in self.routes:
            if not matches(route.senders, sender):
                continue
            if route.header_from and (
                header_from is None or not matches(route.header_from, header_from)
            ):
                continue
            via = self.chain(route, sender)
            refusal = "" if via else _not_allowed(route)
            return Decision(route.name, via, refusal)
        return Decision("", (), "no route matches it")

    def refusal_at_mail(self, sender: str) -> str:
        """Why no route can take this sender ("" when one may, once the header From is known)."""
        for route in self.routes:
            if not matches(route.senders, sender):
                continue
            via = self.chain(route, sender)
            if route.header_from:
                if via:
                    return ""  # may match after DATA
                continue
            return "" if via else _not_allowed(route)
        return "no route matches it"


def _not_allowed(route: Route) -> str:
    return f"no upstream of route {route.name} takes this sender (allowed_from)"


def from_config(cfg: Config) -> Table:
    """The routing table of a config: the listener and the delivery side build the same one."""
    allowed = {u.name: u.allowed_from for u in cfg.upstreams}
    rts = tuple(Route(r.name, r.senders, r.header_from, r.via) for r in cfg.routes)
    return Table(rts, allowed)


def unroutable(table: Table, usable: dict[str, bool]) -> list[str]:
    """The routes none of whose upstreams is usable now (readiness fails while any is)."""
    return [r.name for r in table.routes if not any(usable.get(n, False) for n in r.via)]
