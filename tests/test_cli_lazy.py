"""The command line imports only the chosen command's module; --help still lists them all."""

from __future__ import annotations

import json
import subprocess
import sys

from relayd.cli import COMMANDS, build_parser

LOADED = """
import json, sys
from relayd.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps(sorted(m for m in sys.modules if m.startswith(("relayd", "aiohttp", "aiosmtp")))))
"""


def loaded_by(*argv: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", LOADED, *argv], capture_output=True, text=True, check=True
    ).stdout
    return set(json.loads(out.splitlines()[-1]))


def test_the_listing_is_the_one_every_module_would_give():
    """`relayd --help` from COMMANDS alone equals the help of the parser with every module."""
    assert build_parser("").format_help() == build_parser().format_help()


def test_health_loads_no_other_command():
    """`relayd health --help` imports relayd.cli.health, no other command, no aiohttp."""
    loaded = loaded_by("health", "--help")
    others = {module for name, module, _ in COMMANDS if name != "health"}
    assert "relayd.cli.health" in loaded
    assert not loaded & others, loaded & others
    assert not {m for m in loaded if m.startswith(("aiohttp", "aiosmtp", "relayd.upstream"))}


def test_the_top_level_help_loads_no_command():
    """`relayd --help` imports none of the command modules."""
    loaded = loaded_by("--help")
    assert not loaded & {module for _, module, _ in COMMANDS}


def test_each_command_still_parses_its_own_arguments():
    """A command's own options reach its function (queue list --json: parsed, func set)."""
    args = build_parser("queue").parse_args(["queue", "list", "--json"])
    assert args.json is True and callable(args.func)
