"""Every command answers --help, and answering it loads none of the heavy libraries (so it is quick;
speed itself is measured in benchmarks/, never asserted in tests)."""

import argparse
import json
import subprocess
import sys

import pytest

from invarbench.cli import build_parser

HEAVY = ("numpy", "torch", "pandas", "pyarrow", "jinja2", "matplotlib", "scipy", "foolbox", "pyautoattack", "ray")


def _commands(parser: argparse.ArgumentParser, prefix=()):
    yield prefix
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*prefix, name))


COMMANDS = list(_commands(build_parser()))


def test_the_command_tree_is_what_the_docs_describe():
    names = {" ".join(command) for command in COMMANDS}
    assert {"run", "check", "leaderboard build", "oracle evaluate", "label serve", "models train"} <= names


@pytest.mark.parametrize("command", COMMANDS, ids=lambda command: " ".join(command) or "invarbench")
def test_help_answers_without_loading_heavy_libraries(command):
    script = (
        "import json, sys\n"
        "from invarbench.cli import main\n"
        f"try:\n    main({list(command) + ['--help']!r})\nexcept SystemExit as exit:\n    code = exit.code\n"
        f"print(json.dumps({{'code': code, 'loaded': [name for name in {list(HEAVY)!r} if name in sys.modules]}}))\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    *help_lines, last = completed.stdout.strip().splitlines()
    report = json.loads(last)
    assert report["code"] == 0 and any(line.startswith("usage: invarbench") for line in help_lines)
    assert report["loaded"] == [], f"`invarbench {' '.join(command)} --help` imports {report['loaded']}"


def test_leaderboard_defaults_to_the_checkout_and_otherwise_to_the_cache(tmp_path, monkeypatch):
    from invarbench.leaderboard import leaderboard_root

    monkeypatch.setenv("INVARBENCH_HOME", str(tmp_path / "home"))
    installed = tmp_path / "site-packages" / "invarbench" / "leaderboard"
    installed.mkdir(parents=True)
    assert leaderboard_root(installed) == tmp_path / "home" / "leaderboard"  # a wheel: no entries, not written into
    (installed / "entries").mkdir()
    assert leaderboard_root(installed) == installed  # a clone or editable install
