"""People's labels for invariance candidates: a SQLite store, aggregation and export.

``invarbench label serve`` shows candidates one at a time to annotators (see ``labelling_app.py``);
every label is committed at once (SQLite in WAL mode), so killing the server loses nothing. Items come
from a run directory (its invariance candidates) or from a folder in Tramèr et al.'s layout. A label is
a digit ``0``-``9``, ``n`` (not a digit) or ``?`` (unsure); one row per annotator and item.

Aggregation: an item's *majority* is the digit more than half of its annotators gave; ``n`` and ``?``
are votes for no digit. Agreement per set is Fleiss' kappa over the items with the most common number
of annotators (at least two), the standard form for a fixed number of raters per item; items with
another number of annotators are left out of kappa (not of the majority counts).

A run's items are named ``ATTACK/NORM:EPS`` (e.g. ``invariance-linf/linf:0.4``); an image that occurs
twice in one set (the same candidate for several models) is one item, so nobody labels it twice.

Control items (default 10% of the items shown) are unchanged MNIST test images, other than the
candidates' own test points, shown like any other item; their label is the test label. An annotator whose
accuracy on the control items they labelled is below the database's threshold is *flagged*, and their
labels are left out of the majorities, the export and the ``people:DB`` oracle. Item ids follow the
(shuffled) order items are shown in, so an id tells nothing about an item.

Annotators of a study are invited (:meth:`LabelStore.invite`): each gets a random token, stored only as
its SHA-256, and the server takes the annotator's name from the token alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import random
import re
import secrets
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from invarbench.datasets import load_dataset
from invarbench.errors import ConfigError, DataError, did_you_mean
from invarbench.io import atomic_write_bytes
from invarbench.oracles.people import PeopleLabels, majority_label, wal_connection
from invarbench.oracles.types import image_key, load_invariance_sets
from invarbench.store import RunStore, read_json

LABELS = tuple("0123456789") + ("n", "?")
DEFAULT_CONTROL_SHARE = 0.1
DEFAULT_MIN_CONTROL_ACCURACY = 0.8
#: The set name of control items (in the database only; they belong to no set of the source).
CONTROL = "control"
ANNOTATOR_NAME = re.compile(r"[A-Za-z0-9_.@+-]{1,64}")
SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE items (
    id INTEGER PRIMARY KEY, set_name TEXT NOT NULL, position INTEGER NOT NULL, test_index INTEGER NOT NULL,
    original_label INTEGER NOT NULL, image BLOB NOT NULL, image_key BLOB NOT NULL, control INTEGER NOT NULL);
CREATE TABLE labels (
    annotator TEXT NOT NULL, item_id INTEGER NOT NULL REFERENCES items(id), label TEXT NOT NULL, time REAL NOT NULL,
    PRIMARY KEY (annotator, item_id));
CREATE TABLE annotators (name TEXT PRIMARY KEY, token_sha256 TEXT UNIQUE, invited REAL NOT NULL, revoked REAL);
"""


@dataclass(frozen=True)
class LabelItem:
    """One image to label: where it came from (set, position, test index, original label) and its pixels;
    a control item is an unchanged test image, its original label the known answer."""

    set_name: str
    position: int
    test_index: int
    original_label: int
    pixels: np.ndarray  # (28, 28) uint8
    control: bool = False


def items_from_source(source: str | Path) -> tuple[str, list[LabelItem]]:
    """The items of a run directory (its invariance candidates) or a Tramèr-layout folder, and the kind."""
    path = Path(source)
    if not path.is_dir():
        raise DataError(
            f"label source {path} is not a folder; pass a run directory of `invarbench run` with invariance attacks or"
            " a folder of NAME.npy + NAME_labels.npy + indexs.npy"
        )
    if (path / "manifest.json").exists():
        return "run", _run_items(path)
    return "folder", [
        LabelItem(item.name, row, int(index), int(label), _to_uint8(image))
        for item in load_invariance_sets(path)
        for row, (image, label, index) in enumerate(
            zip(item.images, item.labels.tolist(), item.original_indices.tolist())
        )
    ]


def _to_uint8(image: torch.Tensor | np.ndarray) -> np.ndarray:
    array = np.asarray(image, dtype=np.float64).reshape(28, 28)
    return np.clip(np.round(array * 255), 0, 255).astype(np.uint8)


def _run_items(run_dir: Path) -> list[LabelItem]:
    """The candidates of a run's invariance jobs that exist (record ``ran``), one item per distinct image
    of a set. A record's eps picks the row of its job's candidate array, ``index - shard * shard_size``
    the point (as in ``gallery.candidate_image``)."""
    store = RunStore(run_dir)
    try:
        shard_size = int(read_json(store.manifest_path)["config"]["shard_size"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(
            f"{store.manifest_path} is not a manifest of `invarbench run` ({error!r}); pass a run directory or a folder"
            " in Tramèr et al.'s layout"
        ) from error
    items: list[LabelItem] = []
    seen: set[tuple[str, bytes]] = set()
    positions: Counter[str] = Counter()
    for candidates_path in sorted(store.candidates_dir.glob("*.npz")) if store.candidates_dir.exists() else []:
        job_id = candidates_path.stem
        if not store.job_path(job_id).exists():
            continue  # candidates written, records not yet: the job is unfinished (records mark it done)
        records, _ = store.read_job(job_id)
        candidates = np.load(candidates_path)["candidates"]
        epsilons = sorted(records["eps"].unique())
        for record in records[records["ran"].astype(bool)].sort_values(["eps", "index"]).itertuples(index=False):
            index = int(record.index)
            image = candidates[epsilons.index(record.eps), index - (index // shard_size) * shard_size]
            if image.size != 28 * 28:
                raise DataError(
                    f"run {run_dir} holds candidates of shape {image.shape}; people label 28 x 28 digit images only (an"
                    " MNIST run)"
                )
            set_name, pixels = f"{record.attack}/{record.norm}:{record.eps:g}", _to_uint8(image)
            if (set_name, pixels.tobytes()) in seen:
                continue
            seen.add((set_name, pixels.tobytes()))
            items.append(LabelItem(set_name, positions[set_name], index, int(record.label), pixels))
            positions[set_name] += 1
    if not items:
        raise DataError(
            f"run {run_dir} has no invariance candidates to label; run it with an invariance attack (e.g. --attack"
            " invariance-linf), or pass a folder in Tramèr et al.'s layout"
        )
    return items


def control_items(count: int, excluded: set[int], seed: int) -> list[LabelItem]:
    """``count`` MNIST test images, none of the ``excluded`` test points (the candidates' own: their
    originals would bias the reading), each with its test label."""
    if count == 0:
        return []
    mnist = load_dataset("mnist")
    allowed = [index for index in range(len(mnist.test_labels)) if index not in excluded]
    chosen = sorted(random.Random(seed).sample(allowed, count))
    return [
        LabelItem(
            CONTROL, position, index, int(mnist.test_labels[index]), _to_uint8(mnist.test_images[index]), control=True
        )
        for position, index in enumerate(chosen)
    ]


def control_count(candidates: int, share: float) -> int:
    """How many control items make ``share`` of all items shown, beside ``candidates`` items."""
    return round(share * candidates / (1 - share))


def check_study_settings(control_share: float | None, min_control_accuracy: float | None) -> None:
    if control_share is not None and not 0 <= control_share <= 0.5:
        raise ConfigError(
            f"--control-share {control_share:g} is not between 0 and 0.5; pass e.g. 0.1 (one item in ten is a control"
            " item) or 0 for none"
        )
    if min_control_accuracy is not None and not 0 <= min_control_accuracy <= 1:
        raise ConfigError(
            f"--min-control-accuracy {min_control_accuracy:g} is not between 0 and 1; pass e.g. 0.8 (flag annotators"
            " who get more than one control item in five wrong)"
        )


def check_annotator_name(name: str) -> None:
    if not ANNOTATOR_NAME.fullmatch(name):
        raise ConfigError(
            f"annotator name {name!r} is not 1-64 letters, digits or . _ @ + -; pass e.g. alice or a.smith"
        )


def token_digest(token: str) -> str:
    """What the database stores of a token: its SHA-256 (tokens are 256 random bits, so a fast hash suffices)."""
    return hashlib.sha256(token.encode()).hexdigest()


def png_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


class LabelStore(PeopleLabels):
    """A labels database to fill and label: ``create`` fills it from a source once; the app and the
    commands add labels and invitations. Reading it (votes, majorities, annotators) is
    :class:`~invarbench.oracles.people.PeopleLabels`'s."""

    @classmethod
    def create(
        cls,
        path: str | Path,
        source: str | Path,
        *,
        seed: int = 0,
        control_share: float | None = None,
        min_control_accuracy: float | None = None,
    ) -> LabelStore:
        """Open ``path`` for ``source``, filling a new database with the source's items and control items
        (``control_share`` of the items shown, default 10%) in a shuffled order. ``min_control_accuracy``
        (default 0.8) is the accuracy on control items below which an annotator is flagged. Given for an
        existing database, both must be what it was created with."""
        check_study_settings(control_share, min_control_accuracy)
        path, source_text = Path(path), str(Path(source).resolve())
        settings = {"control_share": control_share, "min_control_accuracy": min_control_accuracy}
        if path.exists():
            store = cls.open(path)
            stored = store.meta("source")
            if stored != source_text:
                store.close()
                raise ConfigError(
                    f"labels database {path} holds items of {stored}, not {source_text}; pass that source again or"
                    " another --db"
                )
            for key, value in settings.items():
                if value is not None and float(created := store.meta(key)) != value:
                    store.close()
                    raise ConfigError(
                        f"labels database {path} was created with --{key.replace('_', '-')} {created}, not {value:g};"
                        " leave the option out or pass another --db"
                    )
            return store
        if not path.parent.is_dir():
            raise DataError(
                f"folder {path.parent} of labels database {path} does not exist; create it or pass another --db"
            )
        kind, items = items_from_source(source)
        share = DEFAULT_CONTROL_SHARE if control_share is None else control_share
        items += control_items(control_count(len(items), share), {item.test_index for item in items}, seed)
        random.Random(seed).shuffle(items)
        # Ids in the shuffled order shown: an id says nothing about an item's set or whether it is a control.
        rows = [
            (
                number,
                item.set_name,
                item.position,
                item.test_index,
                item.original_label,
                item.pixels.tobytes(),
                image_key(torch.from_numpy(item.pixels.astype(np.float32) / 255)),
                item.control,
            )
            for number, item in enumerate(items)
        ]
        meta = {
            "source": source_text,
            "kind": kind,
            "seed": seed,
            "control_share": share,
            "min_control_accuracy": (
                DEFAULT_MIN_CONTROL_ACCURACY if min_control_accuracy is None else min_control_accuracy
            ),
        }
        # Filled under a temporary name: a half-filled database never appears under the final one.
        temporary = path.with_name(path.name + ".tmp")
        leftovers = [temporary.with_name(temporary.name + suffix) for suffix in ("", "-wal", "-shm", "-journal")]
        for leftover in leftovers:
            leftover.unlink(missing_ok=True)
        connection = None
        try:
            connection = wal_connection(temporary)
            connection.executescript(SCHEMA)
            connection.execute("BEGIN")
            connection.executemany("INSERT INTO meta VALUES (?, ?)", [(key, str(value)) for key, value in meta.items()])
            connection.executemany(
                "INSERT INTO items (id, set_name, position, test_index, original_label, image, image_key, control)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            connection.execute("COMMIT")
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            connection.close()
            temporary.replace(path)
        except BaseException:
            if connection is not None:
                connection.close()
            for leftover in leftovers:
                leftover.unlink(missing_ok=True)
            raise
        return cls.open(path)

    @contextlib.contextmanager
    def _transaction(self):
        """One write transaction, begun at once: another process (a server, another command) waits for it."""
        self.connection.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.connection.execute("ROLLBACK")
            raise
        self.connection.execute("COMMIT")

    def total(self) -> int:
        """Items shown to every annotator, control items included."""
        return self.connection.execute("SELECT COUNT(*) FROM items").fetchone()[0]

    def done(self, annotator: str) -> int:
        return self.connection.execute("SELECT COUNT(*) FROM labels WHERE annotator = ?", (annotator,)).fetchone()[0]

    def next_item(self, annotator: str) -> int | None:
        """The first item in shown order this annotator has not labelled, or None when all are."""
        row = self.connection.execute(
            "SELECT id FROM items WHERE id NOT IN (SELECT item_id FROM labels WHERE annotator = ?) ORDER BY id LIMIT 1",
            (annotator,),
        ).fetchone()
        return row[0] if row else None

    def has_item(self, item_id: int) -> bool:
        return self.connection.execute("SELECT 1 FROM items WHERE id = ?", (item_id,)).fetchone() is not None

    def label(self, annotator: str, item_id: int, label: str) -> None:
        if label not in LABELS:
            raise ConfigError(f"label {label!r} is not one of 0-9, n (not a digit), ? (unsure)")
        check_annotator_name(annotator)
        if not self.has_item(item_id):
            raise DataError(f"no item {item_id} in {self.path}")
        self.connection.execute(
            "INSERT OR REPLACE INTO labels VALUES (?, ?, ?, ?)", (annotator, item_id, label, time.time())
        )

    def undo(self, annotator: str) -> int | None:
        """Remove the annotator's most recent label; returns its item (shown again next), or None."""
        row = self.connection.execute(
            "SELECT item_id FROM labels WHERE annotator = ? ORDER BY time DESC, rowid DESC LIMIT 1", (annotator,)
        ).fetchone()
        if row is None:
            return None
        self.connection.execute("DELETE FROM labels WHERE annotator = ? AND item_id = ?", (annotator, row[0]))
        return row[0]

    def invite(self, name: str) -> str:
        """Invite ``name`` (again, after a revocation) and return their new token; only its SHA-256 is stored."""
        check_annotator_name(name)
        token = secrets.token_urlsafe(32)
        with self._transaction():
            row = self.connection.execute("SELECT revoked FROM annotators WHERE name = ?", (name,)).fetchone()
            if row is not None and row[0] is None:
                raise ConfigError(
                    f"annotator {name} already has an invitation to {self.path}; end it with `invarbench label revoke"
                    f" {name} --db {self.path}`, then invite them again for a new link"
                )
            self.connection.execute(
                "INSERT OR REPLACE INTO annotators VALUES (?, ?, ?, NULL)", (name, token_digest(token), time.time())
            )
        return token

    def revoke(self, name: str) -> None:
        """End ``name``'s invitation: their token no longer works; the labels they gave stay."""
        with self._transaction():
            row = self.connection.execute("SELECT revoked FROM annotators WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise ConfigError(
                    f"nobody called {name!r} was invited to {self.path}; `invarbench label summary --db {self.path}`"
                    f" lists the annotators.{did_you_mean(name, self.invitations())}"
                )
            if row[0] is not None:
                raise ConfigError(
                    f"annotator {name}'s invitation to {self.path} is already revoked; `invarbench label invite {name}"
                    f" --db {self.path}` gives them a new one"
                )
            self.connection.execute(
                "UPDATE annotators SET token_sha256 = NULL, revoked = ? WHERE name = ?", (time.time(), name)
            )

    def annotator_for(self, token: str) -> str | None:
        """The annotator whose active invitation ``token`` is, else None."""
        row = self.connection.execute(
            "SELECT name FROM annotators WHERE token_sha256 = ? AND revoked IS NULL", (token_digest(token),)
        ).fetchone()
        return row[0] if row else None

    def summary(self) -> list[dict]:
        """Per set: items, items with a label, with two or more, with a majority digit (and its share of
        the labelled items), Fleiss' kappa; flagged annotators' labels left out."""
        votes = self.votes()
        rows: dict[str, dict] = {}
        for item_id, set_name, *_ in self.items():
            row = rows.setdefault(
                set_name,
                {"set": set_name, "items": 0, "labelled": 0, "labelled_twice": 0, "majority": 0, "ratings": []},
            )
            item_votes = votes.get(item_id, [])
            row["items"] += 1
            row["labelled"] += bool(item_votes)
            row["labelled_twice"] += len(item_votes) >= 2
            row["majority"] += majority_label(item_votes) is not None
            row["ratings"].append(item_votes)
        for row in rows.values():
            row["fleiss_kappa"] = fleiss_kappa(row.pop("ratings"))
            # Of the labelled items, the share with a majority digit (unlabelled items have no say).
            row["majority_rate"] = row["majority"] / row["labelled"] if row["labelled"] else None
        return list(rows.values())

    def export(self, out: str | Path, *, keep_flagged: bool = False) -> list[Path]:
        """Tramèr et al.'s layout: SET.npy (uint8), SET_labels.npy (majority digits), SET_indexs.npy."""
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise DataError(f"export folder {out} is a file; pass a folder path to --out")
        written = []
        sets = self.majority_sets(keep_flagged=keep_flagged)
        if not sets:
            raise DataError(
                f"{self.path} has no item with a majority label yet; label some items first (`invarbench label summary"
                f" --db {self.path}`)"
            )
        out.mkdir(parents=True, exist_ok=True)
        for item in sets:
            stem = safe_name(item.name)
            arrays = {
                f"{stem}.npy": np.clip(np.round(item.images[:, 0].numpy() * 255), 0, 255).astype(np.uint8),
                f"{stem}_labels.npy": item.labels.numpy().astype(np.int64),
                f"{stem}_indexs.npy": item.original_indices.numpy().astype(np.int64),
            }
            for name, array in arrays.items():
                buffer = io.BytesIO()
                np.save(buffer, array)
                written.append(atomic_write_bytes(out / name, buffer.getvalue()))
        return written


def safe_name(set_name: str) -> str:
    """A file name for a set name: ``invariance-linf/linf:0.4`` -> ``invariance-linf_linf_0.4``."""
    return "".join(character if character.isalnum() or character in "-." else "_" for character in set_name)


def fleiss_kappa(ratings: list[list[str]]) -> float | None:
    """Fleiss' kappa over the items rated by the most common number of raters (at least 2); None when
    no item has two ratings or every rating is the same category (kappa undefined)."""
    counts = Counter(len(votes) for votes in ratings if len(votes) >= 2)
    if not counts:
        return None
    raters = max(counts, key=lambda size: (counts[size], size))
    table = np.array(
        [[votes.count(category) for category in LABELS] for votes in ratings if len(votes) == raters], dtype=np.float64
    )
    items = len(table)
    agreement = ((table * (table - 1)).sum(1) / (raters * (raters - 1))).mean()
    shares = table.sum(0) / (items * raters)
    chance = float((shares**2).sum())
    if chance >= 1.0:
        return None
    return float((agreement - chance) / (1 - chance))
