"""People's labels: the SQLite store, control items, invitations, aggregation, export, the people oracle,
the web app's answers to bad requests, a server killed under load, and the labelling page in a real
browser (Debian's chromium through Playwright, never a browser Playwright downloads itself)."""

import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from invarbench.cli import main
from invarbench.errors import ConfigError, DataError
from invarbench.labelling import LabelStore, fleiss_kappa
from invarbench.labelling_app import MAX_BODY_BYTES, create_app
from invarbench.oracles import ABSTAIN, LabelFileOracle, PeopleOracle, load_invariance_sets, resolve
from invarbench.oracles.people import majority_label, majority_sets

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOT = ROOT / "docs" / "figures" / "labelling-page.png"


def _load_benchmark():
    """benchmarks/labelling_load.py: its server process, annotators and database checks."""
    spec = importlib.util.spec_from_file_location("labelling_load", ROOT / "benchmarks" / "labelling_load.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _folder(root: Path, mnist, indices, name: str = "digits") -> Path:
    """A folder in Tramèr et al.'s layout holding real MNIST test images (its labels are all 0: the
    labelling app never shows nor uses a folder's labels)."""
    root.mkdir(parents=True, exist_ok=True)
    indices = np.asarray(indices)
    np.save(root / f"{name}_indexs.npy", indices)
    np.save(root / f"{name}.npy", (mnist.test_images[indices, 0].numpy() * 255).round().astype(np.uint8))
    np.save(root / f"{name}_labels.npy", np.zeros(len(indices), dtype=np.int64))
    return root


def _as_images(pixels: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(pixels).astype(np.float32) / 255).unsqueeze(1)


def _truth(store: LabelStore, mnist) -> dict[int, int]:
    """Every item's digit, control items included (the test folders hold unchanged MNIST test images)."""
    return {
        item_id: int(mnist.test_labels[index])
        for item_id, index in store.connection.execute("SELECT id, test_index FROM items")
    }


def _controls(store: LabelStore) -> set[int]:
    return {item_id for (item_id,) in store.connection.execute("SELECT id FROM items WHERE control")}


def test_fleiss_kappa_against_hand_computed_examples():
    # The textbook example (Fleiss 1971's form, as on Wikipedia's "Fleiss' kappa"): 10 items, 14 raters,
    # 5 categories; P-bar = 0.378, P-e = 0.213, kappa = 0.210.
    table = [
        [0, 0, 0, 0, 14],
        [0, 2, 6, 4, 2],
        [0, 0, 3, 5, 6],
        [0, 3, 9, 2, 0],
        [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0],
        [3, 2, 6, 3, 0],
        [2, 5, 3, 2, 2],
        [6, 5, 2, 1, 0],
        [0, 2, 2, 3, 7],
    ]
    ratings = [[str(category) for category, count in enumerate(row) for _ in range(count)] for row in table]
    assert fleiss_kappa(ratings) == pytest.approx(0.2099, abs=1e-3)
    # By hand, two raters: items {1,1}, {1,2}, {2,2}. P_i = 1, 0, 1, so P-bar = 2/3; category shares
    # p_1 = p_2 = 3/6, so P-e = 1/4 + 1/4 = 1/2; kappa = (2/3 - 1/2) / (1 - 1/2) = 1/3. An item with one
    # rater and one with three (fewer than the most common count, two) are left out of kappa.
    assert fleiss_kappa([["1", "1"], ["1", "2"], ["2", "2"], ["3"], ["1", "1", "1"]]) == pytest.approx(1 / 3)
    # n and ? are categories of their own: {n,n}, {?,7}, {7,7}: P-bar = 2/3, shares n 2/6, ? 1/6, 7 3/6,
    # P-e = (4 + 1 + 9) / 36 = 7/18; kappa = (2/3 - 7/18) / (11/18) = 5/11.
    assert fleiss_kappa([["n", "n"], ["?", "7"], ["7", "7"]]) == pytest.approx(5 / 11)
    assert fleiss_kappa([["3", "3"], ["5", "5"]]) == pytest.approx(1.0)
    assert fleiss_kappa([["3"], ["5"]]) is None, "undefined without two raters on an item"
    assert fleiss_kappa([["3", "3"], ["3", "3"]]) is None, "undefined when every vote is one category"


def test_majority_needs_more_than_half_of_all_votes():
    assert majority_label(["7", "7", "1"]) == 7
    assert majority_label(["7"]) == 7
    assert majority_label(["7", "1"]) is None, "a tie is no majority"
    assert majority_label(["n", "n", "7"]) is None, "not a digit wins: no digit"
    assert majority_label(["?", "7", "7"]) == 7
    assert majority_label(["?", "?", "7", "7"]) is None, "unsure votes count: 2 of 4 is not more than half"
    assert majority_label([]) is None


def test_store_labels_undo_resume_export_and_people_oracle(mnist, tmp_path):
    folder = _folder(tmp_path / "set", mnist, range(6))
    _folder(folder, mnist, range(100, 106), name="more")
    store = LabelStore.create(tmp_path / "labels.sqlite", folder)
    # 12 candidates and, for the default 10% of the items shown, one control item.
    assert store.total() == 13 and len(store.items()) == 12 and store.meta("kind") == "folder"
    # Ids are a fixed shuffled order, the same for every database of this source, that mixes the sets.
    set_names = {item_id: set_name for item_id, set_name, *_ in store.items()}
    shown = [set_names[item_id] for item_id in range(13) if item_id in set_names]
    assert shown != sorted(shown) and shown != sorted(shown, reverse=True)
    assert LabelStore.create(tmp_path / "again.sqlite", folder).items() == store.items()
    first = store.next_item("ann")
    assert first == 0
    store.label("ann", first, "3")
    assert store.next_item("ann") != first and store.done("ann") == 1
    store.label("ann", first, "5")
    assert store.done("ann") == 1 and store.votes()[first] == ["5"], "re-labelling replaces"
    assert store.undo("ann") == first and store.next_item("ann") == first and store.done("ann") == 0
    assert store.undo("ann") is None
    truth = _truth(store, mnist)
    for annotator in ("ann", "bob"):
        while (item := store.next_item(annotator)) is not None:
            store.label(annotator, item, str(truth[item]))
    out = tmp_path / "export"
    store.export(out)
    assert sorted(path.name for path in out.iterdir()) == [
        "digits.npy",
        "digits_indexs.npy",
        "digits_labels.npy",
        "more.npy",
        "more_indexs.npy",
        "more_labels.npy",
    ]
    exported = load_invariance_sets(out)
    assert [item.name for item in exported] == ["digits", "more"]
    for item, expected in zip(exported, majority_sets(tmp_path / "labels.sqlite")):
        assert item.labels.tolist() == mnist.test_labels[item.original_indices].tolist() == expected.labels.tolist()
        assert torch.equal(item.images, expected.images) and item.images.shape == (6, 1, 28, 28)
    images = torch.cat([item.images for item in exported])
    labels = torch.cat([item.labels for item in exported])
    oracle = PeopleOracle(tmp_path / "labels.sqlite")
    assert oracle.name == "people:labels.sqlite"
    assert oracle.label(images).tolist() == LabelFileOracle(exported).label(images).tolist() == labels.tolist()
    assert oracle.label(torch.zeros(1, 1, 28, 28)).tolist() == [ABSTAIN], "an unknown image"
    assert [row["majority_rate"] for row in store.summary()] == [1.0, 1.0]
    assert all(row["fleiss_kappa"] == pytest.approx(1.0) and row["labelled_twice"] == 6 for row in store.summary())
    with pytest.raises(ConfigError, match="not one of 0-9"):
        store.label("ann", first, "x")


def test_resolve_oracle_people_and_unknown_names(mnist, tmp_path):
    LabelStore.create(tmp_path / "labels.sqlite", _folder(tmp_path / "set", mnist, range(2))).close()
    assert resolve(f"people:{tmp_path / 'labels.sqlite'}", mnist).name == "people:labels.sqlite"
    with pytest.raises(DataError, match="does not exist; create it with"):
        resolve(f"people:{tmp_path / 'missing.sqlite'}", mnist)
    with pytest.raises(ConfigError, match="unknown oracle 'people-ish'.*people:DB"):
        resolve("people-ish", mnist)


def test_run_items_are_the_existing_candidates_one_per_image_of_a_set(mnist, tmp_path):
    # Two models judge the same fixed set over three shards of 4 points: 6 candidates that exist (of
    # 20 records), 3 distinct images, each kept once, with its test index and original label.
    indices = [1, 6, 9]
    _folder(tmp_path / "set", mnist, indices)
    assert (
        main(
            [
                "run",
                "mnist-cnn-standard",
                "mnist-cnn-pgd-linf-0.1",
                "--invariance-set",
                str(tmp_path / "set"),
                "--out",
                str(tmp_path / "runs"),
                "--name",
                "r",
                "--shard-size",
                "4",
                "--no-progress",
            ]
        )
        == 0
    )
    store = LabelStore.create(tmp_path / "labels.sqlite", tmp_path / "runs" / "r")
    assert store.meta("kind") == "run"
    rows = store.items()
    assert [(set_name, position, index, label) for _, set_name, position, index, label in rows] == [
        ("invariance-set/set:0", position, index, int(mnist.test_labels[index]))
        for position, index in enumerate(indices)
    ]
    expected = (mnist.test_images[indices, 0].numpy() * 255).round().astype(np.uint8)
    assert np.array_equal(np.stack([store.image(item_id) for item_id, *_ in rows]), expected)
    for item_id, *_ in rows:
        store.label("ann", item_id, "n" if item_id == rows[0][0] else "4")
    store.export(tmp_path / "export")
    (exported,) = load_invariance_sets(tmp_path / "export")
    assert (
        exported.name == "invariance-set_set_0"
        and exported.original_indices.tolist() == indices[1:]
        and exported.labels.tolist() == [4, 4]
    )


def test_bad_inputs_get_clear_errors_and_write_nothing(mnist, tmp_path, capsys):
    with pytest.raises(DataError, match="does not exist; create it with"):
        LabelStore.open(tmp_path / "missing.sqlite")
    assert main(["label", "summary", "--db", str(tmp_path / "missing.sqlite")]) == 1
    assert main(["label", "export", "--db", str(tmp_path / "missing.sqlite"), "--out", str(tmp_path / "out")]) == 1
    assert "labels database" in capsys.readouterr().err
    (tmp_path / "notes.sqlite").write_text("not a database")
    with pytest.raises(DataError, match="is not a labels database"):
        LabelStore.open(tmp_path / "notes.sqlite")
    with pytest.raises(DataError, match="does not exist; create it or pass another --db"):
        LabelStore.create(tmp_path / "no" / "such" / "folder.sqlite", _folder(tmp_path / "ok", mnist, range(2)))
    mismatched = tmp_path / "mismatched"
    mismatched.mkdir()
    np.save(mismatched / "indexs.npy", np.arange(3))
    np.save(mismatched / "x.npy", np.zeros((3, 28, 28), np.uint8))
    np.save(mismatched / "x_labels.npy", np.zeros(2, np.int64))
    with pytest.raises(DataError, match="expected 3 integer labels"):
        LabelStore.create(tmp_path / "a.sqlite", mismatched)
    outside = _folder(tmp_path / "outside", mnist, range(3))
    np.save(outside / "digits_labels.npy", np.array([1, 2, 12]))
    with pytest.raises(DataError, match="digits 0-9"):
        LabelStore.create(tmp_path / "b.sqlite", outside)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no invariance set found"):
        LabelStore.create(tmp_path / "e.sqlite", tmp_path / "empty")
    # A run without invariance candidates.
    from invarbench.attacks import ThreatModel
    from invarbench.config import AttackSpec, ModelSpec, RunConfig
    from invarbench.runner import run_benchmark

    run_benchmark(
        RunConfig(
            (ModelSpec("spheres-mlp-standard", "spheres"),),
            (ThreatModel("linf", (0.02,)),),
            (AttackSpec("fgsm"),),
            n=10,
            shard_size=10,
        ),
        tmp_path / "runs",
        name="plain",
        progress=False,
    )
    with pytest.raises(DataError, match="no invariance candidates to label; run it with an invariance attack"):
        LabelStore.create(tmp_path / "c.sqlite", tmp_path / "runs" / "plain")
    assert main(["label", "create", str(tmp_path / "runs" / "plain"), "--db", str(tmp_path / "c.sqlite")]) == 1
    assert "no invariance candidates" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.glob("*.sqlite*")) == ["notes.sqlite"], "no database left behind"
    # A database of another source is not silently mixed with this one.
    LabelStore.create(tmp_path / "d.sqlite", _folder(tmp_path / "first", mnist, range(2))).close()
    before = (tmp_path / "d.sqlite").read_bytes()
    with pytest.raises(ConfigError, match="holds items of"):
        LabelStore.create(tmp_path / "d.sqlite", _folder(tmp_path / "second", mnist, range(2)))
    assert (tmp_path / "d.sqlite").read_bytes() == before
    # Nothing labelled yet: no export; an export onto a file is refused.
    with pytest.raises(DataError, match="no item with a majority label yet"):
        LabelStore.open(tmp_path / "d.sqlite").export(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    store = LabelStore.open(tmp_path / "d.sqlite")
    store.label("ann", 0, "1")
    with pytest.raises(DataError, match="is a file"):
        store.export(tmp_path / "notes.sqlite")
    with pytest.raises(ConfigError, match="was created with --control-share 0.1, not 0.2; leave the option out"):
        LabelStore.create(tmp_path / "d.sqlite", tmp_path / "first", control_share=0.2)
    # A database of the first labelling app (no control items, no invitations) is named as such.
    store.connection.executescript("DROP TABLE annotators; ALTER TABLE items DROP COLUMN control")
    store.close()
    with pytest.raises(
        DataError, match="made by an earlier invarbench, without control items and invitations; create a new one"
    ):
        LabelStore.open(tmp_path / "d.sqlite")


def test_control_items_judge_annotators_and_flagged_ones_are_left_out(mnist, tmp_path, capsys):
    folder = _folder(tmp_path / "set", mnist, range(6))
    db = tmp_path / "labels.sqlite"
    assert (
        main(
            [
                "label",
                "create",
                str(folder),
                "--db",
                str(db),
                "--control-share",
                "0.25",
                "--min-control-accuracy",
                "0.6",
            ]
        )
        == 0
    )
    store = LabelStore.open(db)
    # 6 candidates and 2 control items (a quarter of 8): unchanged MNIST test images other than the
    # candidates' test points, with their test labels.
    controls = _controls(store)
    control_rows = store.connection.execute(
        "SELECT test_index, original_label, image FROM items WHERE control"
    ).fetchall()
    assert len(controls) == 2 and store.total() == 8
    for index, label, image in control_rows:
        assert index >= 6 and label == int(mnist.test_labels[index])
        assert (
            np.frombuffer(image, np.uint8).tolist()
            == (mnist.test_images[index, 0] * 255).round().to(torch.uint8).flatten().tolist()
        )
    truth = _truth(store, mnist)
    first, second = sorted(controls)
    # careful: every item right; careless: one control item wrong (50% < 60%); late: no control item yet.
    for item, digit in truth.items():
        store.label("careful", item, str(digit))
        store.label(
            "careless", item, "n" if item == first else str((digit + 1) % 10) if item not in controls else str(digit)
        )
    late_item = min(set(truth) - controls)
    store.label("late", late_item, str((truth[late_item] + 5) % 10))
    quality = {row.name: row for row in store.annotators()}
    assert list(quality) == ["careful", "careless", "late"] and {row.invitation for row in quality.values()} == {"none"}
    assert [
        (row.labelled, row.controls, row.controls_right, row.accuracy, row.flagged) for row in quality.values()
    ] == [(8, 2, 2, 1.0, False), (8, 2, 1, 0.5, True), (1, 0, 0, None, False)]
    # The careless annotator's labels are left out of the majorities, the export and people:DB; control
    # items are in none of them.
    candidates = set(truth) - controls
    assert store.votes() == {
        item: [str(truth[item])] + ([str((truth[item] + 5) % 10)] if item == late_item else []) for item in candidates
    }
    assert store.votes(keep_flagged=True)[late_item] == [
        str(truth[late_item]),
        str((truth[late_item] + 1) % 10),
        str((truth[late_item] + 5) % 10),
    ]
    assert [row["majority"] for row in store.summary()] == [5], "the late annotator's vote ties the item they labelled"
    assert main(["label", "export", "--db", str(db), "--out", str(tmp_path / "out")]) == 0
    assert "left out: careless (flagged)" in capsys.readouterr().out
    (exported,) = load_invariance_sets(tmp_path / "out")
    assert (
        len(exported.labels) == 5 and exported.labels.tolist() == mnist.test_labels[exported.original_indices].tolist()
    )
    assert PeopleOracle(db).label(exported.images).tolist() == exported.labels.tolist()
    assert (
        PeopleOracle(db).label(_as_images([store.image(item) for item in sorted(controls)])).tolist() == [ABSTAIN] * 2
    )
    # Kept, the careless labels tie every item: no majority is left to export.
    assert main(["label", "export", "--db", str(db), "--out", str(tmp_path / "all"), "--keep-flagged"]) == 1
    assert "no item with a majority label yet" in capsys.readouterr().err
    assert main(["label", "summary", "--db", str(db)]) == 0
    summary = capsys.readouterr().out
    assert re.search(r"\ncareless +none +8 +2 +1 +50% +FLAGGED\n", summary) and re.search(
        r"\nlate +none +1 +0 +0 +- *\n", summary
    ), summary
    assert "accuracy on control items below 60%" in summary


def test_invitations_tokens_stored_hashed_and_names_only_from_tokens(mnist, tmp_path, capsys):
    db = tmp_path / "labels.sqlite"
    with LabelStore.create(db, _folder(tmp_path / "set", mnist, range(4)), control_share=0) as store:
        local, network = TestClient(create_app(store, loopback=True)), TestClient(create_app(store, loopback=False))
        # Loopback, nobody invited: the name typed on the page. Off loopback a token is needed even then.
        assert local.post("/api/label", json={"annotator": "me", "item": 0, "label": "7"}).json() == {
            "annotator": "me",
            "item": 1,
            "done": 1,
            "total": 4,
        }
        assert network.get("/api/next", params={"annotator": "me"}).status_code == 401
        assert main(["label", "invite", "alice", "--db", str(db), "--url", "http://lab-pc.example.org:8000/"]) == 0
        link = capsys.readouterr().out.splitlines()[-1]
        assert link.startswith("http://lab-pc.example.org:8000/#token=")
        token = link.split("#token=")[1]
        # Once anyone is invited, the running loopback server takes labels only with a token, and the
        # annotator's name comes from the token alone.
        assert local.get("/api/next", params={"annotator": "me"}).status_code == 401
        alice = {"Authorization": f"Bearer {token}"}
        assert local.post("/api/label", headers=alice, json={"item": 0, "label": "5"}).json()["annotator"] == "alice"
        assert (
            local.post("/api/label", headers=alice, json={"item": 1, "label": "5", "annotator": "me"}).status_code
            == 400
        )
        assert store.votes() == {0: ["5", "7"]}
        # Revoked: the link stops working at once; invited again, a new link works and the old does not.
        assert main(["label", "revoke", "alice", "--db", str(db)]) == 0
        assert "the 1 labels they gave stay" in capsys.readouterr().out
        assert local.get("/api/next", headers=alice).status_code == 403
        assert local.get("/api/next", params={"annotator": "me"}).status_code == 401, (
            "a revocation does not reopen typed names"
        )
        again = {"Authorization": f"Bearer {store.invite('alice')}"}
        assert local.get("/api/next", headers=again).json() == {"annotator": "alice", "item": 1, "done": 1, "total": 4}
        assert local.get("/api/next", headers=alice).status_code == 403
        assert store.invitations() == {"alice": True}
    # The database holds each token's SHA-256, never the token.
    data = db.read_bytes() + (Path(f"{db}-wal").read_bytes() if Path(f"{db}-wal").exists() else b"")
    assert token.encode() not in data and hashlib.sha256(token.encode()).hexdigest().encode() not in data, (
        "a revoked token's hash is dropped"
    )
    with LabelStore.open(db) as store:
        assert (
            store.annotator_for(token) is None
            and len(store.connection.execute("SELECT token_sha256 FROM annotators").fetchone()[0]) == 64
        )


def _database_bytes(db: Path) -> bytes:
    """The database file and its write-ahead log: a committed write changes one of them."""
    wal = Path(f"{db}-wal")
    return db.read_bytes() + b"|" + (wal.read_bytes() if wal.exists() else b"")


def test_bad_requests_get_a_4xx_with_a_clear_message_and_change_nothing(mnist, tmp_path):
    db = tmp_path / "labels.sqlite"
    with LabelStore.create(db, _folder(tmp_path / "set", mnist, range(9))) as store:
        alice, revoked = store.invite("alice"), store.invite("bob")
        store.revoke("bob")
        client = TestClient(create_app(store, loopback=True))
        auth, json_type = (
            {"Authorization": f"Bearer {alice}"},
            {
                "Authorization": f"Bearer {alice}",
                "Content-Type": "application/json",
            },
        )
        labelled = client.get("/api/next", headers=auth).json()["item"]
        shown = client.post("/api/label", headers=auth, json={"item": labelled, "label": "3"}).json()["item"]
        # (what, method, path, request options, status, words of the message)
        cases = [
            (
                "malformed JSON",
                "POST",
                "/api/label",
                {"headers": json_type, "content": b'{"item": 1, "label": '},
                422,
                "body: not valid JSON",
            ),
            (
                "JSON not an object",
                "POST",
                "/api/label",
                {"headers": json_type, "content": b"[1, 7]"},
                422,
                'send JSON like {"item": 12, "label": "7"}',
            ),
            (
                "missing label",
                "POST",
                "/api/label",
                {"headers": auth, "json": {"item": shown}},
                422,
                "body.label: Field required",
            ),
            (
                "unknown field",
                "POST",
                "/api/label",
                {"headers": auth, "json": {"item": shown, "label": "3", "weight": 2}},
                422,
                "body.weight: Extra inputs are not permitted",
            ),
            (
                "item id a string",
                "POST",
                "/api/label",
                {"headers": auth, "json": {"item": str(shown), "label": "3"}},
                422,
                "body.item: Input should be a valid integer",
            ),
            (
                "unknown item id",
                "POST",
                "/api/label",
                {"headers": auth, "json": {"item": 10_000, "label": "3"}},
                404,
                "no item 10000 in this study",
            ),
            (
                "item id not the one shown",
                "POST",
                "/api/label",
                {"headers": auth, "json": {"item": labelled, "label": "4"}},
                409,
                f"item {labelled} is not the item shown to alice (the item shown to you is {shown})",
            ),
            (
                "label out of range",
                "POST",
                "/api/label",
                {"headers": auth, "json": {"item": shown, "label": "10"}},
                400,
                "label '10' is not one of 0-9, n (not a digit), ? (unsure)",
            ),
            (
                "oversized body",
                "POST",
                "/api/label",
                {"headers": json_type, "content": b'{"item": 1, "label": "' + b"7" * MAX_BODY_BYTES + b'"}'},
                413,
                f"larger than the {MAX_BODY_BYTES} this server takes",
            ),
            (
                "missing token",
                "POST",
                "/api/label",
                {"json": {"item": shown, "label": "3"}},
                401,
                "no invitation token (Authorization: Bearer TOKEN)",
            ),
            (
                "wrong token",
                "POST",
                "/api/label",
                {"headers": {"Authorization": "Bearer " + "x" * 43}, "json": {"item": shown, "label": "3"}},
                403,
                "unknown or was revoked",
            ),
            (
                "revoked token",
                "POST",
                "/api/undo",
                {"headers": {"Authorization": f"Bearer {revoked}"}, "json": {}},
                403,
                "unknown or was revoked",
            ),
            (
                "name in the request",
                "POST",
                "/api/undo",
                {"headers": auth, "json": {"annotator": "bob"}},
                400,
                "never from the request; leave out annotator 'bob'",
            ),
            (
                "image path out of its folder",
                "GET",
                "/image/..%2F..%2Flabels.sqlite",
                {"headers": auth},
                404,
                "GET /image/../../labels.sqlite: not found; this server answers",
            ),
            (
                "image path with encoded dots",
                "GET",
                "/image/%2e%2e%2f0.png",
                {"headers": auth},
                404,
                "GET /image/../0.png: not found",
            ),
            (
                "image id not a number",
                "GET",
                "/image/0x1.png",
                {"headers": auth},
                422,
                "path.item_id: Input should be a valid integer",
            ),
            ("image without token", "GET", f"/image/{shown}.png", {}, 401, "no invitation token"),
        ]
        before = _database_bytes(db)
        for what, method, path, options, status, words in cases:
            response = client.request(method, path, **options)
            assert response.status_code == status, f"{what}: {response.status_code} {response.text}"
            assert words in response.json()["detail"], f"{what}: {response.json()['detail']}"
        assert _database_bytes(db) == before, "a bad request changed the database"
        assert client.get("/api/next", headers=auth).json() == {
            "annotator": "alice",
            "item": shown,
            "done": 1,
            "total": 10,
        }
        assert client.get(f"/image/{shown}.png", headers=auth).content.startswith(b"\x89PNG")


def test_a_server_killed_under_load_keeps_every_acknowledged_label_once(mnist, tmp_path):
    load = _load_benchmark()
    db = tmp_path / "labels.sqlite"
    # 27 candidates and 3 control items; four annotators label all 30 at once through HTTP.
    tokens = load.create_study(db, _folder(tmp_path / "set", mnist, range(27)), annotators=4)
    with load.LabelServer(db) as server:
        server.start()
        running = load.Load(server.port, tokens, seconds=90)
        deadline = time.monotonic() + 30
        while running.acknowledged() < 30 and time.monotonic() < deadline:
            time.sleep(0.005)
        server.kill()
        killed_at = running.acknowledged()
        server.start(port=server.port)
        running.wait()
    assert 30 <= killed_at < 100, f"killed after {killed_at} of 120 labels, not in the middle"
    assert sum(annotation.reconnects for annotation in running.annotations.values()) >= 1, (
        "the annotators lost their connections"
    )
    assert running.acknowledged() >= 120 - 4, "at most one label per annotator was in flight, stored without its answer"
    assert load.check_stored(db, running.annotations, 30) == 120


def _invite(db: Path, name: str, url: str, capsys) -> str:
    assert main(["label", "invite", name, "--db", str(db), "--url", url]) == 0
    return capsys.readouterr().out.splitlines()[-1]


@pytest.mark.browser
@pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="Debian chromium is not installed (make test installs it with apt-get)"
)
def test_invited_annotators_label_in_headless_chromium(mnist, tmp_path, capsys):
    from playwright.sync_api import sync_playwright

    load = _load_benchmark()
    folder = _folder(tmp_path / "set", mnist, range(24))
    db = tmp_path / "labels.sqlite"
    assert main(["label", "create", str(folder), "--db", str(db)]) == 0
    store = LabelStore.open(db)
    truth, controls = _truth(store, mnist), _controls(store)
    order = list(range(store.total()))
    assert len(order) == 27 and len(controls) == 3
    # Alice reads "not a digit" on order[7]; bob is unsure of order[2] and misreads order[10]. Both read
    # every other item, control items included, right.
    alice_keys = {item: str(truth[item]) for item in order[:20]} | {order[7]: "n"}
    bob_keys = {item: str(truth[item]) for item in order} | {order[2]: "?", order[10]: str((truth[order[10]] + 1) % 10)}
    assert not controls & {order[2], order[7], order[10]}, "the misreadings are of candidates"
    with load.LabelServer(db) as server:
        server.start()
        url = f"http://127.0.0.1:{server.port}/"
        # Invited while the server runs: from then on it takes labels only through invitation links.
        alice_link, bob_link = _invite(db, "alice", url, capsys), _invite(db, "bob", url, capsys)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)

            def wait_done(page, done: int, name: str) -> None:
                # The progress line changes once the next image has loaded (or when none is left).
                page.wait_for_function(
                    f"document.getElementById('progress').textContent === '{done} / 27 labelled by {name}'"
                )

            def shown_item(page) -> int:
                return int(page.get_attribute("#image", "data-item"))

            # Someone without a link types a name: refused, and told why.
            stranger = browser.new_context().new_page()
            stranger.goto(url)
            stranger.fill("#annotator", "alice")
            stranger.click("#who button")
            stranger.wait_for_function("document.getElementById('error').textContent.includes('no invitation token')")

            alice = browser.new_context(viewport={"width": 800, "height": 600}).new_page()
            alice.goto(alice_link)
            wait_done(alice, 0, "alice")
            assert alice.locator("#who").is_hidden(), "an invited annotator types no name"
            for done, item in enumerate(order[:20], start=1):
                assert shown_item(alice) == item
                alice.keyboard.press(alice_keys[item])
                wait_done(alice, done, "alice")
            # Reload: alice resumes at her first unlabelled item, the 21st, with the bar at 20/27.
            alice.reload()
            wait_done(alice, 20, "alice")
            assert shown_item(alice) == order[20]
            assert alice.eval_on_selector("#bar", "bar => [bar.value, bar.max]") == [20, 27]
            # Backspace undoes her last label and goes back to that image; she labels it again.
            alice.keyboard.press("Backspace")
            wait_done(alice, 19, "alice")
            assert shown_item(alice) == order[19]
            alice.keyboard.press(alice_keys[order[19]])
            wait_done(alice, 20, "alice")
            assert shown_item(alice) == order[20]
            # One image on the page, the item; the API tells the page nothing about where it came from.
            assert alice.locator("img").count() == 1 and alice.locator("img").is_visible()
            request = urllib.request.Request(
                f"{url}api/next", headers={"Authorization": "Bearer " + alice_link.split("#token=")[1]}
            )
            assert json.loads(urllib.request.urlopen(request).read()) == {
                "annotator": "alice",
                "item": order[20],
                "done": 20,
                "total": 27,
            }
            alice.screenshot(
                path=str(SCREENSHOT if os.environ.get("INVARBENCH_SCREENSHOT") else tmp_path / "labelling-page.png"),
                full_page=True,
            )

            # Bob, in a browser context of his own, has his own progress; his first label by mouse.
            bob = browser.new_context().new_page()
            bob.goto(bob_link)
            wait_done(bob, 0, "bob")
            bob.click(f"#buttons button:text-is('{bob_keys[order[0]]}')")
            wait_done(bob, 1, "bob")
            for done, item in enumerate(order[1:], start=2):
                assert shown_item(bob) == item
                bob.keyboard.press(bob_keys[item])
                wait_done(bob, done, "bob")
            assert bob.locator("#done").is_visible()

            # Kill the server and start it again on the same database: nothing is lost.
            server.kill()
            server.start(port=server.port)
            alice.reload()
            wait_done(alice, 20, "alice")
            assert shown_item(alice) == order[20]
            # Bob's invitation revoked: his link stops working at once.
            assert main(["label", "revoke", "bob", "--db", str(db)]) == 0
            bob.reload()
            bob.wait_for_function("document.getElementById('error').textContent.includes('unknown or was revoked')")
            browser.close()
    assert store.votes() == {
        item: [alice_keys[item], bob_keys[item]] if item in alice_keys else [bob_keys[item]]
        for item in order
        if item not in controls
    }
    assert [
        (row.name, row.invitation, row.labelled, row.controls, row.controls_right, row.flagged)
        for row in store.annotators()
    ] == [
        ("alice", "active", 20, len(controls & set(order[:20])), len(controls & set(order[:20])), False),
        ("bob", "revoked", 27, 3, 3, False),
    ]

    out = tmp_path / "export"
    assert main(["label", "summary", "--db", str(db)]) == 0
    (row,) = store.summary()
    twice = [item for item in order[:20] if item not in controls]
    # Three candidates have no majority (one digit vote of two); every other candidate's majority is its digit.
    assert (row["items"], row["labelled"], row["labelled_twice"], row["majority"]) == (24, 24, len(twice), 21)
    assert row["fleiss_kappa"] == pytest.approx(fleiss_kappa([store.votes()[item] for item in twice]))
    assert main(["label", "export", "--db", str(db), "--out", str(out)]) == 0
    (exported,) = load_invariance_sets(out)
    assert (
        len(exported.labels) == 21 and exported.labels.tolist() == mnist.test_labels[exported.original_indices].tolist()
    )
    # The people oracle and the exported folder's label-file oracle judge those images by the majority,
    # and the people oracle abstains on the three without one.
    people, label_file = PeopleOracle(db), LabelFileOracle([exported])
    assert (
        people.label(exported.images).tolist() == label_file.label(exported.images).tolist() == exported.labels.tolist()
    )
    assert (
        people.label(_as_images([store.image(item) for item in (order[2], order[7], order[10])])).tolist()
        == [ABSTAIN] * 3
    )
    # A run judged by the export: the fixed set with people's labels, on a zoo model.
    assert (
        main(
            [
                "run",
                "mnist-cnn-standard",
                "--invariance-set",
                str(out),
                "--out",
                str(tmp_path / "runs"),
                "--name",
                "people",
                "--no-progress",
            ]
        )
        == 0
    )
    summary = json.loads((tmp_path / "runs" / "people" / "summary.json").read_text())
    (metrics,) = summary["models"]["mnist-cnn-standard"]["invariance"][
        "invariance-set:directory=" + str(out.resolve())
    ].values()
    assert metrics["candidates"] == 21 and metrics["label_changed"] == 0
