"""People's labels: the SQLite store, aggregation, export, the people oracle and the labelling page in a
real browser (Debian's chromium through Playwright)."""

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
from invarbench.attacks.oracles import ABSTAIN, load_invariance_sets, resolve_oracle
from invarbench.cli import main
from invarbench.errors import ConfigError, DataError
from invarbench.labelling import LabelStore, PeopleOracle, fleiss_kappa, majority_label

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _folder(root: Path, mnist, count: int) -> Path:
    root.mkdir(parents=True)
    np.save(root / "indexs.npy", np.arange(count))
    np.save(root / "digits.npy", (mnist.test_images[:count, 0].numpy() * 255).round().astype(np.uint8))
    # The labels already in a folder are never shown nor used by the labelling app.
    np.save(root / "digits_labels.npy", np.zeros(count, dtype=np.int64))
    return root


def test_fleiss_kappa_against_the_textbook_example():
    # Fleiss (1971)-style example: 10 items, 14 raters, 5 categories; P-bar 0.378, P-e 0.213, kappa 0.210.
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1], [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    ratings = [[str(category) for category, count in enumerate(row) for _ in range(count)] for row in table]
    assert fleiss_kappa(ratings) == pytest.approx(0.2099, abs=1e-3)
    assert fleiss_kappa([["3", "3"], ["5", "5"]]) == pytest.approx(1.0)
    assert fleiss_kappa([["3"], ["5"]]) is None, "undefined without two raters on an item"


def test_majority_needs_more_than_half_of_the_votes():
    assert majority_label(["7", "7", "1"]) == 7
    assert majority_label(["7", "1"]) is None
    assert majority_label(["n", "n", "7"]) is None, "not a digit wins: no digit"
    assert majority_label(["?", "7", "7"]) == 7
    assert majority_label([]) is None


def test_store_labels_undo_resume_export_and_people_oracle(mnist, tmp_path):
    folder = _folder(tmp_path / "set", mnist, 6)
    store = LabelStore.create(tmp_path / "labels.sqlite", folder)
    assert store.total() == 6 and store.next_item("ann") is not None
    first = store.next_item("ann")
    store.label("ann", first, "3")
    assert store.next_item("ann") != first and store.done("ann") == 1
    assert store.undo("ann") == first and store.next_item("ann") == first
    truth = {item_id: int(mnist.test_labels[index]) for item_id, _, _, index, _ in store.items()}
    for annotator in ("ann", "bob"):
        while (item := store.next_item(annotator)) is not None:
            store.label(annotator, item, str(truth[item]))
    out = tmp_path / "export"
    store.export(out)
    (exported,) = load_invariance_sets(out)
    assert exported.labels.tolist() == mnist.test_labels[exported.original_indices].tolist()
    oracle = PeopleOracle(tmp_path / "labels.sqlite")
    assert oracle.label(exported.images).tolist() == exported.labels.tolist()
    assert oracle.label(torch.zeros(1, 1, 28, 28)).tolist() == [ABSTAIN]
    assert resolve_oracle(f"people:{tmp_path / 'labels.sqlite'}", mnist).name == "people:labels.sqlite"
    with pytest.raises(ConfigError, match="unknown oracle"):
        resolve_oracle("people-ish", mnist)
    (row,) = store.summary()
    assert (row["items"], row["labelled_twice"], row["majority"]) == (6, 6, 6) and row["fleiss_kappa"] == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="not one of 0-9"):
        store.label("ann", first, "x")


def test_bad_inputs_get_clear_errors_and_write_nothing(mnist, tmp_path):
    with pytest.raises(DataError, match="does not exist; create it with"):
        LabelStore.open(tmp_path / "missing.sqlite")
    assert main(["label", "summary", "--db", str(tmp_path / "missing.sqlite")]) == 1
    mismatched = tmp_path / "mismatched"
    mismatched.mkdir()
    np.save(mismatched / "indexs.npy", np.arange(3))
    np.save(mismatched / "x.npy", np.zeros((3, 28, 28), np.uint8))
    np.save(mismatched / "x_labels.npy", np.zeros(2, np.int64))
    with pytest.raises(DataError, match="expected 3 integer labels"):
        LabelStore.create(tmp_path / "a.sqlite", mismatched)
    outside = _folder(tmp_path / "outside", mnist, 3)
    np.save(outside / "digits_labels.npy", np.array([1, 2, 12]))
    with pytest.raises(DataError, match="digits 0-9"):
        LabelStore.create(tmp_path / "b.sqlite", outside)
    # A run without invariance candidates.
    from invarbench.attacks import ThreatModel
    from invarbench.runner import AttackSpec, ModelSpec, RunConfig, run_benchmark

    run_benchmark(RunConfig((ModelSpec("spheres-mlp-standard", "spheres"),), (ThreatModel("linf", (0.02,)),), (AttackSpec("fgsm"),), n=10, shard_size=10), tmp_path / "runs", name="plain", progress=False)
    with pytest.raises(DataError, match="no invariance candidates to label"):
        LabelStore.create(tmp_path / "c.sqlite", tmp_path / "runs" / "plain")
    assert sorted(path.name for path in tmp_path.glob("*.sqlite*")) == [], "no database left behind"
    # A database of another source is not silently mixed with this one.
    LabelStore.create(tmp_path / "d.sqlite", _folder(tmp_path / "first", mnist, 2))
    before = (tmp_path / "d.sqlite").read_bytes()
    with pytest.raises(ConfigError, match="holds items of"):
        LabelStore.create(tmp_path / "d.sqlite", _folder(tmp_path / "second", mnist, 2))
    assert (tmp_path / "d.sqlite").read_bytes() == before


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


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed (make test installs it with apt-get)")
def test_labelling_page_in_headless_chromium(mnist, tmp_path):
    from playwright.sync_api import sync_playwright

    folder = _folder(tmp_path / "set", mnist, 24)
    db, port = tmp_path / "labels.sqlite", _free_port()
    server = _start_server(folder, db, port)
    url = f"http://127.0.0.1:{port}/"
    truth = {}
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"])

            def current_item(page) -> int:
                page.wait_for_function("document.getElementById('image').src.includes('/image/')")
                return int(page.get_attribute("#image", "src").split("/image/")[1].split(".")[0])

            def press_and_wait(page, key: str, done: int):
                page.keyboard.press(key)
                page.wait_for_function(f"document.getElementById('progress').textContent.startsWith('{done} / 24')")

            store = LabelStore.open(db)
            truth = {item_id: int(mnist.test_labels[index]) for item_id, _, _, index, _ in store.items()}
            alice = browser.new_page()
            alice.goto(url)
            alice.fill("#annotator", "alice")
            alice.click("#who button")
            for done in range(1, 21):
                item = current_item(alice)
                if done == 5:
                    # A wrong key, undone with Backspace: the same image comes back.
                    press_and_wait(alice, "n", 5)
                    press_and_wait(alice, "Backspace", 4)
                    assert current_item(alice) == item
                press_and_wait(alice, str(truth[item]), done)
            assert float(alice.locator("#fill").evaluate("element => element.style.width").rstrip("%")) == pytest.approx(100 * 20 / 24, abs=1e-3)
            # The page never shows the original image or its label: one image, the candidate.
            assert alice.locator("img").count() == 1
            Path(os.environ.get("INVARBENCH_SCREENSHOT", tmp_path / "labelling-page.png")).parent.mkdir(parents=True, exist_ok=True)
            alice.screenshot(path=str(os.environ.get("INVARBENCH_SCREENSHOT", tmp_path / "labelling-page.png")))
            resumed = browser.new_page()
            resumed.goto(url + "?annotator=alice")
            resumed.wait_for_function("document.getElementById('progress').textContent.startsWith('20 / 24')")
            assert current_item(resumed) == store.next_item("alice")

            bob = browser.new_context().new_page()
            bob.goto(url + "?annotator=bob")
            for done in range(1, 25):
                item = current_item(bob) if done < 25 else None
                press_and_wait(bob, "?" if done == 3 else str(truth[item]), done)
            bob.wait_for_selector("#done", state="visible")
            browser.close()
    finally:
        # Killed, not stopped: every label must already be on disk.
        server.send_signal(signal.SIGKILL)
        server.wait()
    store = LabelStore.open(db)
    assert store.done("alice") == 20 and store.done("bob") == 24
    server = _start_server(folder, db, port)
    try:
        assert urllib.request.urlopen(f"{url}api/next?annotator=alice", timeout=5).read().count(b'"done":20') == 1
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait()

    out = tmp_path / "export"
    assert main(["label", "export", "--db", str(db), "--out", str(out)]) == 0
    assert main(["label", "summary", "--db", str(db)]) == 0
    (exported,) = load_invariance_sets(out)
    # Alice and bob agree everywhere except bob's "unsure" (no majority of two votes there when alice
    # labelled it too); items only bob labelled have his single vote as majority.
    assert len(exported.labels) in (23, 24)
    assert exported.labels.tolist() == mnist.test_labels[exported.original_indices].tolist()
    # A run judged by the export: the fixed set with people's labels, on a zoo model.
    assert main(["run", "mnist-cnn-standard", "--invariance-set", str(out), "--out", str(tmp_path / "runs"), "--name", "people", "--no-progress"]) == 0
    import json

    summary = json.loads((tmp_path / "runs" / "people" / "summary.json").read_text())
    (metrics,) = summary["models"]["mnist-cnn-standard"]["invariance"]["invariance-set:directory=" + str(out.resolve())].values()
    assert metrics["candidates"] == len(exported.labels) and metrics["label_changed"] == 0
