"""People's labels: reading a labels database of ``invarbench label`` and judging by its majorities.

A labels database (SQLite, written by :class:`invarbench.labelling.LabelStore`) holds items (changed
images and control items), people's labels of them and the annotators' invitations. This module reads
it: an annotator whose accuracy on the control items is below the database's threshold is *flagged*
and left out; an item's *majority* is the digit more than half of its remaining annotators gave.
:class:`PeopleOracle` (``people:DB``) judges candidates by those majorities.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import numpy as np
import torch

from invarbench.errors import DataError
from invarbench.oracles.types import ABSTAIN, InvarianceSet, Oracle, image_key


@dataclass(frozen=True)
class AnnotatorQuality:
    """One annotator: their invitation (``active``, ``revoked``, or ``none`` for a name typed on a loopback
    server without invitations), items labelled, control items labelled and labelled right, and whether
    they are flagged (accuracy on the control items below the database's threshold)."""

    name: str
    invitation: str
    labelled: int
    controls: int
    controls_right: int
    flagged: bool

    @property
    def accuracy(self) -> float | None:
        return self.controls_right / self.controls if self.controls else None


def wal_connection(path: Path) -> sqlite3.Connection:
    """Autocommit (every label is its own transaction) in WAL mode, fsynced: a killed server loses nothing."""
    connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
    except sqlite3.DatabaseError:
        connection.close()
        raise
    return connection


class PeopleLabels:
    """A labels database, read: annotators, their votes, items and majorities. ``open`` refuses a missing
    file or one that is not a labels database of this invarbench."""

    def __init__(self, path: Path, connection: sqlite3.Connection):
        self.path = path
        self.connection = connection
        #: The web app's handlers run in a thread pool and share this connection; they hold this lock.
        self.lock = threading.Lock()

    @classmethod
    def open(cls, path: str | Path) -> Self:
        path = Path(path)
        if not path.is_file():
            raise DataError(
                f"labels database {path} does not exist; create it with `invarbench label create SOURCE --db {path}`"
            )
        connection = None
        try:
            # Read-only first: opening for writing switches the file to WAL mode, which would change a
            # file that is not a labels database (an empty file, another program's database).
            with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as probe:
                probe.execute("SELECT value FROM meta WHERE key = 'source'").fetchone()
                current = (
                    "control" in {row[1] for row in probe.execute("PRAGMA table_info(items)")}
                    and probe.execute("SELECT 1 FROM sqlite_master WHERE name = 'annotators'").fetchone()
                )
            if not current:
                raise DataError(
                    f"labels database {path} was made by an earlier invarbench, without control items and invitations;"
                    " create a new one with `invarbench label create SOURCE --db NEW.sqlite`"
                )
            connection = wal_connection(path)
        except sqlite3.DatabaseError as error:
            if connection is not None:
                connection.close()
            raise DataError(
                f"{path} is not a labels database of invarbench ({error}); pass the file `invarbench label create`"
                " created"
            ) from error
        return cls(path, connection)

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exception) -> None:
        self.close()

    def meta(self, key: str) -> str | None:
        row = self.connection.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def image(self, item_id: int) -> np.ndarray:
        row = self.connection.execute("SELECT image FROM items WHERE id = ?", (item_id,)).fetchone()
        if row is None:
            raise DataError(f"no item {item_id} in {self.path}")
        return np.frombuffer(row[0], dtype=np.uint8).reshape(28, 28)

    def invitations(self) -> dict[str, bool]:
        """Every annotator ever invited, and whether their invitation is still active."""
        return {
            name: revoked is None
            for name, revoked in self.connection.execute("SELECT name, revoked FROM annotators ORDER BY name")
        }

    def annotators(self) -> list[AnnotatorQuality]:
        """Every annotator who was invited or gave a label, by name, with their accuracy on control items."""
        threshold = float(self.meta("min_control_accuracy") or 0)  # every labels database records it
        invitations = self.invitations()
        counts = {
            name: (labelled, controls, right)
            for name, labelled, controls, right in self.connection.execute(
                "SELECT labels.annotator, COUNT(*), SUM(items.control), SUM(items.control AND labels.label ="
                " CAST(items.original_label AS TEXT)) FROM labels JOIN items ON items.id = labels.item_id GROUP BY"
                " labels.annotator"
            )
        }
        rows = []
        for name in sorted(set(invitations) | set(counts)):
            labelled, controls, right = counts.get(name, (0, 0, 0))
            invitation = "none" if name not in invitations else "active" if invitations[name] else "revoked"
            rows.append(
                AnnotatorQuality(
                    name, invitation, labelled, controls, right, flagged=bool(controls) and right / controls < threshold
                )
            )
        return rows

    def flagged(self) -> set[str]:
        return {row.name for row in self.annotators() if row.flagged}

    def votes(self, *, keep_flagged: bool = False) -> dict[int, list[str]]:
        """Labels of the items that are not control items, by item; flagged annotators' left out unless
        ``keep_flagged``."""
        left_out = set() if keep_flagged else self.flagged()
        votes: dict[int, list[str]] = {}
        for item_id, annotator, label in self.connection.execute(
            "SELECT labels.item_id, labels.annotator, labels.label FROM labels JOIN items ON items.id = labels.item_id"
            " WHERE NOT items.control ORDER BY labels.item_id, labels.annotator"
        ):
            if annotator not in left_out:
                votes.setdefault(item_id, []).append(label)
        return votes

    def items(self) -> list[tuple[int, str, int, int, int]]:
        """(id, set name, position, test index, original label) of every item but the control items, by set and
        position."""
        return self.connection.execute(
            "SELECT id, set_name, position, test_index, original_label FROM items WHERE NOT control ORDER BY set_name,"
            " position"
        ).fetchall()

    def majority_sets(self, *, keep_flagged: bool = False) -> list[InvarianceSet]:
        """Items with a majority digit as invariance sets (images, people's labels, test indices)."""
        votes = self.votes(keep_flagged=keep_flagged)
        grouped: dict[str, list[tuple[np.ndarray, int, int]]] = {}
        for item_id, set_name, _, test_index, _ in self.items():
            majority = majority_label(votes.get(item_id, []))
            if majority is not None:
                grouped.setdefault(set_name, []).append((self.image(item_id), majority, test_index))
        return [
            InvarianceSet(
                name,
                torch.from_numpy(np.stack([image for image, _, _ in rows]).astype(np.float32) / 255).unsqueeze(1),
                torch.tensor([label for _, label, _ in rows]),
                torch.tensor([index for _, _, index in rows]),
            )
            for name, rows in grouped.items()
        ]


def majority_label(votes: list[str]) -> int | None:
    """The digit more than half of the votes gave, else None (``n`` and ``?`` count as votes)."""
    if not votes:
        return None
    label, count = Counter(votes).most_common(1)[0]
    return int(label) if label.isdigit() and count * 2 > len(votes) else None


def majority_sets(db_path: str | Path) -> list[InvarianceSet]:
    """People's majority labels of a labels database as invariance sets (for oracle calibration)."""
    store = PeopleLabels.open(db_path)
    try:
        return store.majority_sets()
    finally:
        store.close()


class PeopleOracle(Oracle):
    """People's majority labels from a labels database, flagged annotators left out; abstains on unknown
    images, control items and items without a majority digit. Images are matched at 8-bit precision."""

    exact = True

    def __init__(self, db_path: str | Path):
        store = PeopleLabels.open(db_path)
        self.name = f"people:{Path(db_path).name}"
        votes = store.votes()
        majorities: dict[bytes, set[int]] = {}
        for item_id, key in store.connection.execute("SELECT id, image_key FROM items WHERE NOT control"):
            if (label := majority_label(votes.get(item_id, []))) is not None:
                majorities.setdefault(bytes(key), set()).add(label)
        store.close()
        # The same image in two sets with different majority digits has no answer: abstain there.
        self.labels = {key: next(iter(found)) for key, found in majorities.items() if len(found) == 1}

    def label(self, images: torch.Tensor) -> torch.Tensor:
        return torch.tensor([self.labels.get(image_key(image), ABSTAIN) for image in images], dtype=torch.long)
