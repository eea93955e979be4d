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
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port
from proc import run_cli, serve_env

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


NEEDED = members(False)

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


def without(tmp_path: Path, owner: str, name: str) -> dict[str, str]:
    """Environment for a relayd process whose library lacks owner.name."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE.format(owner=owner, name=name))
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path}


def test_every_fence_lists_what_it_reaches_into():
    """aiosmtpd's fence names the classes it reaches into and at least one member; every
    fallback a fence names is one of its members; aiosmtplib's names none: relayd only hands
    its transport over (set_protocol), and the start-up check finds nothing missing there."""
    for fence in fences.FENCES:
        listed = {
            f"{owner.rsplit('.', 1)[-1]}.{name}"
            for owner, names in fence.PRIVATE_MEMBERS.items()
            for name in names
        }
        assert set(fence.FALLBACKS) <= listed, fence.__name__
        assert bool(listed) == (fence is not aiosmtplib_fence), fence.__name__
    assert asyncio.run(aiosmtplib_fence.missing()) == []


@pytest.mark.parametrize(("owner", "name"), NEEDED)
async def test_serve_refuses_to_start_without_a_fenced_member(tmp_path, pki, owner, name):
    """A listed member without a fallback missing: `relayd serve` exits 78 with one line
    naming it, before it listens or touches the spool, and no traceback."""
    env = serve_env(tmp_path / "spool", free_port(), pki.ca_file) | without(tmp_path, owner, name)
    code, _, err = await run_cli(env, "serve")
    assert code == 78, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and name in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "spool").exists()


async def test_check_refuses_to_run_without_a_fenced_member(tmp_path, pki):
    """`relayd check` makes the same check: exit 78, one line."""
    owner, name = NEEDED[0].values
    env = serve_env(tmp_path / "spool", free_port(), pki.ca_file)
    code, out, err = await run_cli(env | without(tmp_path, owner, name), "check")
    assert code == 78, out + err
    assert len(err.strip().splitlines()) == 1 and name in err, out + err


async def test_a_missing_member_with_a_fallback_is_a_note_not_a_refusal(monkeypatch):
    """fences.check() on a fence lacking only a member with a public fallback returns one
    note naming the member and what relayd does instead, and raises nothing. (No fence has
    such a member today: aiosmtplib's streaming-DATA members went with the pipelined path.)"""

    async def missing() -> list[str]:
        return ["SMTPProtocol._gone"]

    monkeypatch.setattr(aiosmtplib_fence, "missing", missing)
    monkeypatch.setattr(aiosmtplib_fence, "FALLBACKS", {"SMTPProtocol._gone": "the slow way"})
    (note,) = await fences.check()
    assert "SMTPProtocol._gone" in note and "the slow way" in note
