"""People's labels: the SQLite store, aggregation, export, the people oracle and the labelling page in a
real browser (Debian's chromium through Playwright, never a browser Playwright downloads itself)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from invarbench.attacks.oracles import ABSTAIN, LabelFileOracle, load_invariance_sets
from invarbench.cli import main
from invarbench.errors import ConfigError, DataError
from invarbench.labelling import LabelStore, PeopleOracle, fleiss_kappa, majority_label, majority_sets, resolve_oracle

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "figures" / "labelling-page.png"


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


def test_fleiss_kappa_against_hand_computed_examples():
    # The textbook example (Fleiss 1971's form, as on Wikipedia's "Fleiss' kappa"): 10 items, 14 raters,
    # 5 categories; P-bar = 0.378, P-e = 0.213, kappa = 0.210.
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1], [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
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
    assert store.total() == 12 and store.meta("kind") == "folder"
    # A fixed shuffled order, the same for every database of this source, that mixes the sets.
    set_names = {item_id: set_name for item_id, set_name, *_ in store.items()}
    shown = [set_names[item_id] for item_id in _shown_order(store)]
    assert shown != sorted(shown) and shown != sorted(shown, reverse=True)
    assert _shown_order(LabelStore.create(tmp_path / "again.sqlite", folder)) == _shown_order(store)
    first = store.next_item("ann")
    store.label("ann", first, "3")
    assert store.next_item("ann") != first and store.done("ann") == 1
    store.label("ann", first, "5")
    assert store.done("ann") == 1 and store.votes()[first] == ["5"], "re-labelling replaces"
    assert store.undo("ann") == first and store.next_item("ann") == first and store.done("ann") == 0
    assert store.undo("ann") is None
    truth = {item_id: int(mnist.test_labels[index]) for item_id, _, _, index, _ in store.items()}
    for annotator in ("ann", "bob"):
        while (item := store.next_item(annotator)) is not None:
            store.label(annotator, item, str(truth[item]))
    out = tmp_path / "export"
    store.export(out)
    assert sorted(path.name for path in out.iterdir()) == ["digits.npy", "digits_indexs.npy", "digits_labels.npy", "more.npy", "more_indexs.npy", "more_labels.npy"]
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


def _shown_order(store: LabelStore) -> list[int]:
    return [item_id for (item_id,) in store.connection.execute("SELECT id FROM items ORDER BY shown_order")]


def test_resolve_oracle_people_and_unknown_names(mnist, tmp_path):
    LabelStore.create(tmp_path / "labels.sqlite", _folder(tmp_path / "set", mnist, range(2))).close()
    assert resolve_oracle(f"people:{tmp_path / 'labels.sqlite'}", mnist).name == "people:labels.sqlite"
    with pytest.raises(DataError, match="does not exist; create it with"):
        resolve_oracle(f"people:{tmp_path / 'missing.sqlite'}", mnist)
    with pytest.raises(ConfigError, match="unknown oracle 'people-ish'.*people:DB"):
        resolve_oracle("people-ish", mnist)


def test_run_items_are_the_existing_candidates_one_per_image_of_a_set(mnist, tmp_path):
    # Two models judge the same fixed set over three shards of 4 points: 6 candidates that exist (of
    # 20 records), 3 distinct images, each kept once, with its test index and original label.
    indices = [1, 6, 9]
    _folder(tmp_path / "set", mnist, indices)
    assert main(["run", "mnist-cnn-standard", "mnist-cnn-pgd-linf-0.1", "--invariance-set", str(tmp_path / "set"), "--out", str(tmp_path / "runs"), "--name", "r", "--shard-size", "4", "--no-progress"]) == 0
    store = LabelStore.create(tmp_path / "labels.sqlite", tmp_path / "runs" / "r")
    assert store.meta("kind") == "run"
    rows = store.items()
    assert [(set_name, position, index, label) for _, set_name, position, index, label in rows] == [("invariance-set/set:0", position, index, int(mnist.test_labels[index])) for position, index in enumerate(indices)]
    expected = (mnist.test_images[indices, 0].numpy() * 255).round().astype(np.uint8)
    assert np.array_equal(np.stack([store.image(item_id) for item_id, *_ in rows]), expected)
    for item_id, *_ in rows:
        store.label("ann", item_id, "n" if item_id == rows[0][0] else "4")
    store.export(tmp_path / "export")
    (exported,) = load_invariance_sets(tmp_path / "export")
    assert exported.name == "invariance-set_set_0" and exported.original_indices.tolist() == indices[1:] and exported.labels.tolist() == [4, 4]


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
    from invarbench.runner import AttackSpec, ModelSpec, RunConfig, run_benchmark

    run_benchmark(RunConfig((ModelSpec("spheres-mlp-standard", "spheres"),), (ThreatModel("linf", (0.02,)),), (AttackSpec("fgsm"),), n=10, shard_size=10), tmp_path / "runs", name="plain", progress=False)
    with pytest.raises(DataError, match="no invariance candidates to label; run it with an invariance attack"):
        LabelStore.create(tmp_path / "c.sqlite", tmp_path / "runs" / "plain")
    assert main(["label", "serve", str(tmp_path / "runs" / "plain"), "--db", str(tmp_path / "c.sqlite")]) == 1
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


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_server(folder: Path, db: Path, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "invarbench.cli", "label", "serve", str(folder), "--db", str(db), "--port", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).read()
            return server
        except OSError:
            if server.poll() is not None:
                raise AssertionError(f"the label server exited: {server.stdout.read().decode()}") from None
            time.sleep(0.2)
    server.kill()
    raise AssertionError("the label server did not answer within 60 s")


def _kill(server: subprocess.Popen) -> None:
    # Killed, not stopped: every label must already be on disk.
    server.send_signal(signal.SIGKILL)
    server.wait()


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed (make test installs it with apt-get)")
def test_labelling_page_in_headless_chromium(mnist, tmp_path):
    from playwright.sync_api import sync_playwright

    folder = _folder(tmp_path / "set", mnist, range(24))
    db, port = tmp_path / "labels.sqlite", _free_port()
    url = f"http://127.0.0.1:{port}/"
    server = _start_server(folder, db, port)
    store = LabelStore.open(db)
    order = _shown_order(store)
    truth = {item_id: int(mnist.test_labels[index]) for item_id, _, _, index, _ in store.items()}
    # Alice reads "not a digit" on order[7]; bob is unsure of order[2] and misreads order[10]. So those
    # three have no majority (one digit vote of two), the other 17 of alice's 20 have two agreeing
    # votes, and the last 4 bob's single vote: 21 items with a majority digit, all the true digit.
    alice_keys = {item: str(truth[item]) for item in order[:20]} | {order[7]: "n"}
    bob_keys = {item: str(truth[item]) for item in order} | {order[2]: "?", order[10]: str((truth[order[10]] + 1) % 10)}
    no_majority = {order[2], order[7], order[10]}
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)

            def wait_done(page, done: int) -> None:
                # The progress line changes once the next image has loaded (or when none is left).
                page.wait_for_function(f"document.getElementById('progress').textContent.startsWith('{done} / 24 ')")

            def shown_item(page) -> int:
                return int(page.get_attribute("#image", "src").split("/image/")[1].split(".")[0])

            alice = browser.new_context(viewport={"width": 800, "height": 600}).new_page()
            alice.goto(url)
            alice.fill("#annotator", "alice")
            alice.click("#who button")
            wait_done(alice, 0)
            for done, item in enumerate(order[:20], start=1):
                assert shown_item(alice) == item
                alice.keyboard.press(alice_keys[item])
                wait_done(alice, done)
            # Reload: alice resumes at her first unlabelled item, the 21st, with the bar at 20/24.
            alice.reload()
            wait_done(alice, 20)
            assert shown_item(alice) == order[20]
            assert alice.eval_on_selector("#bar", "bar => [bar.value, bar.max]") == [20, 24]
            # Backspace undoes her last label and goes back to that image; she labels it again.
            alice.keyboard.press("Backspace")
            wait_done(alice, 19)
            assert shown_item(alice) == order[19]
            alice.keyboard.press(alice_keys[order[19]])
            wait_done(alice, 20)
            assert shown_item(alice) == order[20]
            # One image on the page, the candidate; the API tells the page nothing about where it came from.
            assert alice.locator("img").count() == 1 and alice.locator("img").is_visible()
            assert json.loads(urllib.request.urlopen(f"{url}api/next?annotator=alice").read()) == {"item": order[20], "done": 20, "total": 24}
            alice.screenshot(path=str(SCREENSHOT if os.environ.get("INVARBENCH_SCREENSHOT") else tmp_path / "labelling-page.png"), full_page=True)

            # Bob, in a browser context of his own, has his own progress; his first label by mouse.
            bob = browser.new_context().new_page()
            bob.goto(url + "?annotator=bob")
            wait_done(bob, 0)
            bob.click(f"#buttons button:text-is('{bob_keys[order[0]]}')")
            wait_done(bob, 1)
            for done, item in enumerate(order[1:], start=2):
                assert shown_item(bob) == item
                bob.keyboard.press(bob_keys[item])
                wait_done(bob, done)
            assert bob.locator("#done").is_visible()

            # Kill the server and start it again on the same database: nothing is lost.
            _kill(server)
            server = _start_server(folder, db, port)
            alice.reload()
            wait_done(alice, 20)
            assert shown_item(alice) == order[20]
            bob.reload()
            wait_done(bob, 24)
            browser.close()
    finally:
        _kill(server)
    store = LabelStore.open(db)
    assert store.votes() == {item: [alice_keys[item], bob_keys[item]] if item in alice_keys else [bob_keys[item]] for item in order}

    out = tmp_path / "export"
    assert main(["label", "summary", "--db", str(db)]) == 0
    (row,) = store.summary()
    assert (row["items"], row["labelled"], row["labelled_twice"], row["majority"]) == (24, 24, 20, 21)
    assert row["fleiss_kappa"] == pytest.approx(fleiss_kappa([store.votes()[item] for item in order[:20]]))
    assert main(["label", "export", "--db", str(db), "--out", str(out)]) == 0
    (exported,) = load_invariance_sets(out)
    assert len(exported.labels) == 21 and exported.labels.tolist() == mnist.test_labels[exported.original_indices].tolist()
    # The people oracle and the exported folder's label-file oracle judge those images by the majority,
    # and the people oracle abstains on the three without one.
    people, label_file = PeopleOracle(db), LabelFileOracle([exported])
    assert people.label(exported.images).tolist() == label_file.label(exported.images).tolist() == exported.labels.tolist()
    assert people.label(_as_images([store.image(item) for item in sorted(no_majority)])).tolist() == [ABSTAIN] * 3
    # A run judged by the export: the fixed set with people's labels, on a zoo model.
    assert main(["run", "mnist-cnn-standard", "--invariance-set", str(out), "--out", str(tmp_path / "runs"), "--name", "people", "--no-progress"]) == 0
    summary = json.loads((tmp_path / "runs" / "people" / "summary.json").read_text())
    (metrics,) = summary["models"]["mnist-cnn-standard"]["invariance"]["invariance-set:directory=" + str(out.resolve())].values()
    assert metrics["candidates"] == 21 and metrics["label_changed"] == 0
