"""A stand-in provider for the deployment proofs: implicit TLS, AUTH required, one file a message.

    python proof_upstream.py HOST PORT CERT KEY OUTDIR   (password in $PROOF_PASSWORD)

Runs with only what relayd itself installs (aiosmtpd), so the relayd image or the systemd
proof's venv can run it. Each accepted message is written to OUTDIR/<ns>-<n>.eml by rename.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import sys
import time
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult

USER = "relayd-proof"


class Provider:
    def __init__(self, out: Path, password: str) -> None:
        self.out, self.password, self.count = out, password, 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.count += 1
        head = f"X-Proof-Envelope: {envelope.mail_from} -> {','.join(envelope.rcpt_tos)}\r\n"
        tmp = self.out / f".{self.count}.tmp"
        tmp.write_bytes(head.encode() + envelope.original_content)
        tmp.rename(self.out / f"{time.time_ns()}-{self.count}.eml")  # unique across restarts
        return "250 2.0.0 accepted by the proof upstream"

    def authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        ok = auth_data.login == USER.encode() and auth_data.password == self.password.encode()
        return AuthResult(success=ok, handled=False)


async def serve(host: str, port: int, cert: str, key: str, out: Path) -> None:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    provider = Provider(out, os.environ["PROOF_PASSWORD"])

    def factory() -> SMTP:
        return SMTP(
            provider,
            hostname="upstream.proof",
            authenticator=provider.authenticate,
            auth_require_tls=False,  # TLS is implicit: aiosmtpd cannot see it
            auth_required=True,
        )

    server = await asyncio.get_running_loop().create_server(factory, host, port, ssl=ctx)
    print(f"proof upstream listening on {host}:{port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    h, p, c, k, o = sys.argv[1:6]
    asyncio.run(serve(h, int(p), c, k, Path(o)))
