"""Bad inputs across CLI options, cards, checkpoints, run directories, entries and label files.

Each gets exactly one error (no traceback) that names the bad input and says how to fix it, exit status
1 or 2, and leaves every file that existed (in the test's folder and the repository's cards,
checkpoints, oracles and entries) byte-identical, with no new file or folder behind. Most cases call
the CLI's ``main`` in-process (an interpreter start costs seconds); those marked ``subprocess`` run
``python -m invarbench.cli``.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from invarbench.cli import EXIT_FAILURE, EXIT_USAGE, main
from invarbench.labelling import LabelStore
from invarbench.leaderboard.entries import ENTRIES_DIR
from invarbench.models import registry

REPO_FOLDERS = (registry.CARDS_DIR, registry.CARDS_DIR.parent / "oracles", ENTRIES_DIR)
ENTRY = ENTRIES_DIR / "mnist-cnn-standard__mnist__perturbation.json"
MODEL = "spheres-mlp-standard"
#: A finished run copied into each case that needs one (its folder is ``runs/run``).
RUN = [
    "run",
    MODEL,
    "--attack",
    "fgsm",
    "--threat",
    "linf:0.02",
    "--n",
    "20",
    "--shard-size",
    "10",
    "--name",
    "run",
    "--no-progress",
]


@dataclass
class Workspace:
    root: Path
    finished_run: Path
    request: pytest.FixtureRequest

    @property
    def out(self) -> list[str]:
        return ["--out", str(self.root / "runs")]

    def run_dir(self) -> Path:
        """A copy of the finished run, resumable with ``RUN + out``."""
        target = self.root / "runs" / "run"
        shutil.copytree(self.finished_run, target)
        return target

    def model(self, name: str = MODEL) -> tuple[Path, Path]:
        """Card and checkpoint of a zoo model in an isolated registry, to be spoiled."""
        return self.request.getfixturevalue("isolated_registry")(name)

    def file(self, name: str, data: bytes | str) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    def entries(self, **changes) -> Path:
        """An entries folder with one copy of a stored entry, ``changes`` applied to its JSON."""
        folder = self.root / "entries"
        folder.mkdir()
        shutil.copy(ENTRY.with_suffix(".parquet"), folder)
        self.file(f"entries/{ENTRY.name}", json.dumps({**json.loads(ENTRY.read_text()), **changes}))
        return folder

    def labels(self, labels) -> Path:
        """A folder in Tramèr et al.'s layout: x.npy, x_labels.npy, indexs.npy."""
        folder = self.root / "labels"
        folder.mkdir()
        np.save(folder / "x.npy", np.zeros((len(labels), 28, 28), np.uint8))
        np.save(folder / "x_labels.npy", np.asarray(labels))
        np.save(folder / "indexs.npy", np.arange(len(labels)))
        return folder

    def labels_db(self, *invited: str) -> Path:
        """A labels database of four blank images (no control items) with ``invited`` annotators."""
        with LabelStore.create(self.root / "labels.sqlite", self.labels([1, 2, 3, 4]), control_share=0) as store:
            for name in invited:
                store.invite(name)
        return store.path

    def busy_port(self) -> int:
        """A port on 127.0.0.1 another socket listens on (until the test ends)."""
        taken = socket.create_server(("127.0.0.1", 0))
        self.request.addfinalizer(taken.close)
        return taken.getsockname()[1]


def _truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _edit_manifest(ws: Workspace, edit: Callable[[dict], object]) -> Path:
    manifest = ws.run_dir() / "manifest.json"
    manifest.write_text(json.dumps(edit(json.loads(manifest.read_text()))))
    return manifest


def _other_seed(manifest: dict) -> dict:
    manifest["config"]["seed"] = 7
    return manifest


def _running(manifest: dict) -> dict:
    return {**manifest, "status": "running"}


def _truncated_job(ws: Workspace) -> tuple[list[str], str]:
    job = _truncate(sorted((ws.run_dir() / "jobs").glob("*.parquet"))[0])
    return [*RUN, *ws.out], str(job)


def _locked(ws: Workspace) -> tuple[list[str], str]:
    owner = subprocess.Popen(["sleep", "60"])
    ws.request.addfinalizer(lambda: (owner.kill(), owner.wait()))
    # As RunLock writes it: "PID HOST".
    (ws.run_dir() / "run.lock").write_text(f"{owner.pid} {socket.gethostname()}\n")
    return [*RUN, *ws.out], f"pid {owner.pid}"


def _rewrite(path: Path, edit: Callable[[str], str]) -> Path:
    path.write_text(edit(path.read_text()))
    return path


def _card(ws: Workspace, spoil: Callable[[Path, Path], Path]) -> tuple[list[str], str]:
    """Run a model whose card or checkpoint ``spoil`` damaged; the error names the damaged file."""
    return [*RUN, *ws.out], str(spoil(*ws.model()))


def _not_sqlite(ws: Workspace) -> Path:
    return ws.file("labels.sqlite", "name,label\nx,3\n")


def _other_database(ws: Workspace) -> Path:
    path = ws.root / "other.sqlite"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE notes (text)")
    connection.close()
    return path


# (id, setup returning (arguments, the text naming the bad input), a distinctive word of the fix, run as a subprocess)
CASES = [
    # CLI options
    (
        "unknown model",
        lambda ws: (["run", "spheres-mlp-standrd", *ws.out, "--no-progress"], "'spheres-mlp-standrd'"),
        "Did you mean spheres-mlp-standard",
        False,
    ),
    (
        "threat unknown norm",
        lambda ws: ([*RUN, "--threat", "l3:0.1", *ws.out], "'l3:0.1'"),
        "use one of linf, l2",
        False,
    ),
    (
        "threat negative eps",
        lambda ws: ([*RUN, "--threat", "linf:-0.1", *ws.out], "'linf:-0.1'"),
        "must be positive",
        False,
    ),
    (
        "threat eps beyond bounds",
        lambda ws: ([*RUN, "--threat", "linf:5", *ws.out], "eps 5 for linf"),
        "use eps < 3",
        False,
    ),
    ("threat without eps", lambda ws: ([*RUN, "--threat", "linf", *ws.out], "'linf'"), "NORM:EPS", False),
    ("unknown attack", lambda ws: ([*RUN, "--attack", "pgdd", *ws.out], "'pgdd'"), "Did you mean pgd", False),
    (
        "unknown attack option",
        lambda ws: ([*RUN, "--attack", "pgd:stepz=5", *ws.out], "'stepz'"),
        "its options are steps, rel_stepsize, restarts, batch_size",
        False,
    ),
    (
        "bad attack option value",
        lambda ws: ([*RUN, "--attack", "pgd:steps=-5", *ws.out], "steps=-5"),
        "at least 1",
        False,
    ),
    ("n zero", lambda ws: ([*RUN, "--n", "0", *ws.out], "--n (0)"), "must be positive", False),
    ("n negative", lambda ws: ([*RUN, "--n", "-3", *ws.out], "--n (-3)"), "must be positive", False),
    ("n not a number", lambda ws: ([*RUN, "--n", "many", *ws.out], "'many'"), "invalid int value", False),
    (
        "unknown oracle",
        lambda ws: (
            [*RUN, "--attack", "invariance-linf", "--oracle", "proxy:mnist-reader", *ws.out],
            "'proxy:mnist-reader'",
        ),
        "Did you mean proxy:mnist-readers",
        False,
    ),
    (
        "architecture args not JSON",
        lambda ws: (
            [*RUN[:2], "--architecture", "mlp", "--architecture-args", "{input_dim: 2}", *RUN[2:], *ws.out],
            "'{input_dim: 2}'",
        ),
        "write e.g.",
        False,
    ),
    (
        "MNIST data path missing",
        lambda ws: (
            ["run", "mnist-cnn-standard", "--data", str(ws.root / "mnist.npz"), "--n", "10", "--no-progress", *ws.out],
            str(ws.root / "mnist.npz"),
        ),
        "pass a directory of IDX files",
        False,
    ),
    ("data fetch unknown data set", lambda ws: (["data", "fetch", "imagenet"], "'imagenet'"), "choose from", True),
    # cards and checkpoints
    (
        "card missing field",
        lambda ws: _card(ws, lambda card, _: _rewrite(card, lambda text: text.replace('dataset = "spheres"\n', ""))),
        "lacks dataset",
        False,
    ),
    (
        "card bad TOML",
        lambda ws: _card(ws, lambda card, _: _rewrite(card, lambda text: text + "\n[[[checkpoint\n")),
        "fix its TOML syntax",
        False,
    ),
    (
        "card wrong checkpoint sha256",
        lambda ws: _card(
            ws,
            lambda card, _: _rewrite(card, lambda text: re.sub(r'sha256 = "[0-9a-f]+"', f'sha256 = "{0:064}"', text)),
        ),
        "restore it from git",
        False,
    ),
    (
        "checkpoint truncated",
        lambda ws: _card(ws, lambda _, checkpoint: _truncate(checkpoint)),
        f"invarbench models train {MODEL}",
        False,
    ),
    (
        "checkpoint not a torch file",
        lambda ws: (
            [
                "run",
                str(ws.file("model.pt", "weights")),
                "--dataset",
                "spheres",
                "--architecture",
                "mlp",
                "--architecture-args",
                '{"input_dim": 50}',
                "--n",
                "10",
                "--no-progress",
                *ws.out,
            ],
            str(ws.root / "model.pt"),
        ),
        "torch.save(model.state_dict()",
        False,
    ),
    # run directories
    ("run dir truncated job", _truncated_job, "delete that file and re-run", False),
    (
        "manifest of another configuration",
        lambda ws: ([*RUN, *ws.out], str(_edit_manifest(ws, _other_seed))),
        "re-run with the options recorded",
        False,
    ),
    (
        "manifest not JSON",
        lambda ws: ([*RUN, *ws.out], str(_truncate(ws.run_dir() / "manifest.json"))),
        "remove it or choose another --out",
        False,
    ),
    (
        "manifest not an object",
        lambda ws: ([*RUN, *ws.out], str(_edit_manifest(ws, lambda manifest: list(manifest)))),
        "pass another --out/--name",
        False,
    ),
    ("run lock held by a live process", _locked, "wait for it to finish", True),
    (
        "add unfinished run",
        lambda ws: (
            ["leaderboard", "add", str(_edit_manifest(ws, _running).parent), "--entries", str(ws.root / "entries")],
            "'running'",
        ),
        "re-run its command",
        False,
    ),
    (
        "add run with truncated results",
        lambda ws: (
            ["leaderboard", "add", str(ws.run_dir()), "--entries", str(ws.root / "entries")],
            str(_truncate(ws.root / "runs" / "run" / "results.parquet")),
        ),
        "rewrite it from the job records",
        False,
    ),
    # leaderboard entries
    (
        "entry truncated",
        lambda ws: (
            [
                "leaderboard",
                "build",
                "--entries",
                str(ws.entries()),
                "--out",
                str(ws.root / "tables"),
                "--site",
                str(ws.root / "site"),
            ],
            str(_truncate(ws.root / "entries" / ENTRY.name)),
        ),
        "re-add its run",
        False,
    ),
    (
        "entry unknown track (build)",
        lambda ws: (
            [
                "leaderboard",
                "build",
                "--entries",
                str(ws.entries(track="robustness")),
                "--out",
                str(ws.root / "tables"),
                "--site",
                str(ws.root / "site"),
            ],
            "'robustness'",
        ),
        "expected one of perturbation, invariance",
        False,
    ),
    (
        "entry unknown track (check)",
        lambda ws: (["check", "--entries", str(ws.entries(track="robustness")), "--no-progress"], "'robustness'"),
        "expected one of perturbation, invariance",
        False,
    ),
    (
        "check unknown entry",
        lambda ws: (
            ["check", "mnist-cnn-standrd", "--entries", str(ws.entries()), "--no-progress"],
            "mnist-cnn-standrd",
        ),
        "MODEL__DATASET__TRACK",
        False,
    ),
    # people's labels
    (
        "label folder missing",
        lambda ws: (
            ["oracle", "evaluate", "proxy:mnist-readers", "--labels", str(ws.root / "labels")],
            str(ws.root / "labels"),
        ),
        "pass a folder holding NAME.npy",
        False,
    ),
    (
        "label outside 0-9",
        lambda ws: (
            ["oracle", "evaluate", "proxy:mnist-readers", "--labels", str(ws.labels([1, 2, 12]))],
            str(ws.root / "labels" / "x_labels.npy"),
        ),
        "digits 0-9",
        False,
    ),
    (
        "labels DB not SQLite (evaluate)",
        lambda ws: (
            ["oracle", "evaluate", "proxy:mnist-readers", "--labels", str(_not_sqlite(ws))],
            str(ws.root / "labels.sqlite"),
        ),
        "pass the file `invarbench label create` created",
        False,
    ),
    (
        "labels DB not SQLite (summary)",
        lambda ws: (["label", "summary", "--db", str(_not_sqlite(ws))], str(ws.root / "labels.sqlite")),
        "pass the file `invarbench label create` created",
        False,
    ),
    (
        "labels DB empty file",
        lambda ws: (["label", "summary", "--db", str(ws.file("empty.sqlite", b""))], str(ws.root / "empty.sqlite")),
        "pass the file `invarbench label create` created",
        False,
    ),
    (
        "labels DB of another program",
        lambda ws: (["label", "summary", "--db", str(_other_database(ws))], str(ws.root / "other.sqlite")),
        "pass the file `invarbench label create` created",
        False,
    ),
    (
        "label serve without database",
        lambda ws: (["label", "serve", "--db", str(ws.root / "labels.sqlite")], str(ws.root / "labels.sqlite")),
        "invarbench label create SOURCE",
        False,
    ),
    (
        "label serve off loopback uninvited",
        lambda ws: (["label", "serve", "--db", str(ws.labels_db()), "--host", "0.0.0.0"], "--host 0.0.0.0"),
        "invarbench label invite NAME",
        False,
    ),
    (
        "label serve on a busy port",
        lambda ws: (
            ["label", "serve", "--db", str(ws.labels_db()), "--port", str(port := ws.busy_port())],
            f"port {port}",
        ),
        "pass another --port",
        False,
    ),
    (
        "label create control share",
        lambda ws: (
            ["label", "create", str(ws.labels([1, 2])), "--db", str(ws.root / "new.sqlite"), "--control-share", "0.7"],
            "--control-share 0.7",
        ),
        "between 0 and 0.5",
        False,
    ),
    (
        "label invite twice",
        lambda ws: (["label", "invite", "alice", "--db", str(ws.labels_db("alice"))], "alice"),
        "invarbench label revoke alice",
        False,
    ),
    (
        "label invite bad name",
        lambda ws: (["label", "invite", "alice smith", "--db", str(ws.labels_db())], "'alice smith'"),
        "1-64 letters",
        False,
    ),
    (
        "label invite bad url",
        lambda ws: (
            ["label", "invite", "alice", "--db", str(ws.labels_db()), "--url", "lab-pc:8000"],
            "--url lab-pc:8000",
        ),
        "http://lab-pc.example.org:8000/",
        False,
    ),
    (
        "label revoke unknown",
        lambda ws: (["label", "revoke", "alcie", "--db", str(ws.labels_db("alice"))], "'alcie'"),
        "Did you mean alice",
        False,
    ),
    (
        "oracle evaluate unknown oracle",
        lambda ws: (["oracle", "evaluate", "proxy:nope", "--labels", str(ws.labels([1, 2]))], "'proxy:nope'"),
        "named oracles",
        False,
    ),
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished")
    assert main([*RUN, "--out", str(out)]) == 0
    return out / "run"


def _snapshot(root: Path) -> dict[str, object]:
    """Every path under ``root`` and the repository's folders: files by content (checkpoints by size and
    modification time, to keep it fast), folders by name."""
    found: dict[str, object] = {}
    for folder in (root, *REPO_FOLDERS, registry.CHECKPOINTS_DIR):
        for path in folder.rglob("*"):
            if path.is_dir():
                found[str(path)] = "folder"
            elif folder == registry.CHECKPOINTS_DIR:
                found[str(path)] = (path.stat().st_size, path.stat().st_mtime_ns)
            else:
                found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def _invoke(args: list[str], in_subprocess: bool, capsys) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of the command."""
    if in_subprocess:
        completed = subprocess.run(
            [sys.executable, "-m", "invarbench.cli", *args], capture_output=True, text=True, timeout=120
        )
        return completed.returncode, completed.stdout, completed.stderr
    try:
        status = main(args)
    except SystemExit as error:  # argparse's usage errors
        status = error.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize(
    ("setup", "fix", "in_subprocess"),
    [pytest.param(setup, fix, in_subprocess, id=name) for name, setup, fix, in_subprocess in CASES],
)
def test_bad_input_gets_one_clear_error_and_changes_nothing(
    setup, fix, in_subprocess, tmp_path, finished_run, request, capsys, monkeypatch
):
    monkeypatch.setenv("INVARBENCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args, named = setup(Workspace(tmp_path, finished_run, request))
    capsys.readouterr()
    before = _snapshot(tmp_path)
    # With progress bars on: input is checked before any progress or other output starts.
    status, stdout, stderr = _invoke([arg for arg in args if arg != "--no-progress"], in_subprocess, capsys)
    assert status in (EXIT_FAILURE, EXIT_USAGE), stderr
    assert stdout == "", f"printed before the error: {stdout!r}"
    # Nothing but the error: argparse's usage line and its error, or invarbench's one error line.
    expected = (
        r"usage: invarbench .*\ninvarbench[ a-z-]*: error: [^\n]+\n"
        if status == EXIT_USAGE
        else r"invarbench: error: [^\n]+\n"
    )
    assert re.fullmatch(expected, stderr, flags=re.DOTALL), f"printed more than the error: {stderr!r}"
    message = stderr[stderr.index("error:") :]
    assert named in message, f"the error does not name {named}: {message}"
    assert fix in message, f"the error does not say how to fix it ({fix!r}): {message}"
    after = _snapshot(tmp_path)
    assert {path: value for path, value in after.items() if before.get(path) != value} == {}, (
        "a file was changed or left behind"
    )
    assert sorted(set(before) - set(after)) == [], "a file was removed"


def test_the_table_covers_every_kind_of_input():
    assert len(CASES) >= 20
    assert len({name for name, *_ in CASES}) == len(CASES)
