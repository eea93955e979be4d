"""systemd's notify protocol: a datagram to $NOTIFY_SOCKET (sd_notify(3)), stdlib only."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


class Notifier:
    """Sends READY=1, STATUS=..., WATCHDOG=1 ... when run under systemd; a no-op otherwise."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.address = environ.get("NOTIFY_SOCKET", "")
        if self.address.startswith("@"):  # abstract namespace socket
            self.address = "\0" + self.address[1:]
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_interval = int(usec) / 2e6 if usec.isdigit() and mine else 0.0
        self.error = ""  # why the last send failed ("" after one that worked)

    def send(self, *fields: str) -> bool:
        """True when the datagram left; False without systemd or when it could not be sent.

        Creating the socket fails too when the process is out of descriptors (EMFILE): the
        caller decides what a missed ping means, it never ends the daemon.
        """
        if not self.address:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)  # a full receiver queue must not stall the event loop
                sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            self.error = exc.strerror or type(exc).__name__
            return False
        self.error = ""
        return True
