"""A short crash campaign in the suite: kill -9 under load loses nothing that got 250."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "crash_campaign.py"


def load_campaign():
    spec = importlib.util.spec_from_file_location("crash_campaign", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


async def test_kill_9_under_load_loses_nothing_acknowledged(tmp_path):
    """3 kills during a 150-message burst: 0 lost; every duplicate was in flight at a kill."""
    crash = load_campaign()
    random.seed(1)
    s = await crash.campaign(runs=3, burst=50, clients=4, workdir=tmp_path)
    assert s.runs == 3
    assert len(s.acknowledged) > 0
    assert s.lost == [], s.lines()
    assert s.unexplained == [], s.lines()
    assert s.duplicates <= sum(s.in_flight), s.lines()


async def test_kill_9_during_pipelined_flights_loses_nothing_acknowledged(tmp_path):
    """The same with an upstream that offers PIPELINING, so kills land mid-flight: 0 lost."""
    crash = load_campaign()
    random.seed(2)
    s = await crash.campaign(runs=3, burst=50, clients=4, workdir=tmp_path, pipelining=True)
    assert s.runs == 3 and len(s.acknowledged) > 0
    assert s.lost == [], s.lines()
    assert s.unexplained == [], s.lines()
    assert s.duplicates <= sum(s.in_flight), s.lines()
