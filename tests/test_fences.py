"""The library fences: every private member of aiosmtpd and aiosmtplib that relayd relies on is
listed by its fence, checked at start-up, and has a public fallback where one exists.

A rename of one such member in a library release used to go unnoticed until every message was
stored and then answered 421 (so every client sent it again). These tests take each listed
member away from the library, in a real `relayd serve` / `relayd check` process, through a
sitecustomize module that runs before relayd is imported.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import eventually, free_port, make_config, message, running, submit
from proc import ServeProcess, serve_env

from relayd import aiosmtplib_fence, fences


def members(with_fallback: bool) -> list[Any]:
    """(owner, name) of every listed member that has (or has not) a public fallback."""
    found = []
    for fence in fences.FENCES:
        for owner, names in fence.PRIVATE_MEMBERS.items():
            cls = owner.rsplit(".", 1)[-1]
            for name in names:
                if (f"{cls}.{name}" in fence.FALLBACKS) == with_fallback:
                    found.append(pytest.param(owner, name, id=f"{cls}.{name}"))
    return found


NEEDED, OPTIONAL = members(False), members(True)

# Takes NAME away from the library class OWNER as a release renaming it would: a class
# attribute is deleted where it is defined; an instance attribute is stored under another name.
SITECUSTOMIZE = """
import importlib
module, _, cls_name = {owner!r}.rpartition(".")
cls = getattr(importlib.import_module(module), cls_name)
for klass in cls.__mro__:
    if {name!r} in vars(klass):
        delattr(klass, {name!r})
        break
_set = cls.__setattr__
def __setattr__(self, key, value):
    _set(self, key + "_renamed" if key == {name!r} else key, value)
cls.__setattr__ = __setattr__
"""


async def relayd(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relayd",
        *args,
        env={**os.environ, **env},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def without(tmp_path: Path, owner: str, name: str) -> dict[str, str]:
    """Environment for a relayd process whose library lacks owner.name."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE.format(owner=owner, name=name))
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path}


def test_every_fence_lists_something():
    """Each fence names the library classes it reaches into and at least one member; every
    fallback it names is one of its members."""
    for fence in fences.FENCES:
        listed = {
            f"{owner.rsplit('.', 1)[-1]}.{name}"
            for owner, names in fence.PRIVATE_MEMBERS.items()
            for name in names
        }
        assert listed and set(fence.FALLBACKS) <= listed, fence.__name__


@pytest.mark.parametrize(("owner", "name"), NEEDED)
async def test_serve_refuses_to_start_without_a_fenced_member(tmp_path, pki, owner, name):
    """A listed member without a fallback missing: `relayd serve` exits 78 with one line
    naming it, before it listens or touches the spool, and no traceback."""
    env = serve_env(tmp_path / "spool", free_port(), pki.ca_file) | without(tmp_path, owner, name)
    code, _, err = await relayd(env, "serve")
    assert code == 78, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and name in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "spool").exists()


async def test_check_refuses_to_run_without_a_fenced_member(tmp_path, pki):
    """`relayd check` makes the same check: exit 78, one line."""
    owner, name = NEEDED[0].values
    env = serve_env(tmp_path / "spool", free_port(), pki.ca_file)
    code, out, err = await relayd(env | without(tmp_path, owner, name), "check")
    assert code == 78, out + err
    assert len(err.strip().splitlines()) == 1 and name in err, out + err


@pytest.mark.parametrize(("owner", "name"), OPTIONAL)
async def test_serve_says_so_and_starts_without_a_member_that_has_a_fallback(
    tmp_path, pki, owner, name
):
    """A member with a public fallback missing: `relayd serve` starts and says once, at
    warning level, which member is missing and what it does instead."""
    env = serve_env(tmp_path / "spool", free_port(), pki.ca_file) | without(tmp_path, owner, name)
    proc = await ServeProcess(env).start()
    try:
        (note,) = proc.events("library.fallback_used")
        assert name in note["detail"] and note["level"] == "warning", note
    finally:
        assert await proc.stop() == 0


async def test_without_the_streaming_members_data_goes_through_the_library(
    tmp_path, pki, sink, monkeypatch
):
    """When the fence finds a streaming member missing on a session's protocol (streamable()
    false), the message goes out through aiosmtplib's public data(): delivered once, byte for
    byte, dot-stuffing included."""
    import aiosmtplib

    monkeypatch.setattr(
        aiosmtplib_fence, "_STREAM_API", (*aiosmtplib_fence._STREAM_API, "_gone_in_a_release")
    )
    calls: list[int] = []
    library_data = aiosmtplib.SMTP.data

    async def data(self, message, *args, **kwargs):
        if self.local_hostname != "client.test":  # relayd's session, not the test's client
            calls.append(len(message))
        return await library_data(self, message, *args, **kwargs)

    monkeypatch.setattr(aiosmtplib.SMTP, "data", data)
    body = message("fallback", body="first line\r\n.a line with a dot\r\n..two\r\nlast\r\n")
    cfg = make_config(tmp_path, sink.port, pki.ca_file)
    async with running(cfg) as d:
        code, _ = await submit(d.address[1], "app@example.com", ["u@example.org"], body)
        assert code == 250
        await eventually(lambda: sink.messages, what="delivery through data()")
    assert len(calls) == 1
    (got,) = sink.messages
    assert got.data == body
