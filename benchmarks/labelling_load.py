"""Many annotators labelling at once through the labelling app's HTTP API, on loopback only.

Fills a labels database with MNIST test images (a folder in Tramèr et al.'s layout) and 10% control
items, ``--items`` in all, invites ``--annotators`` annotators, starts ``invarbench label serve`` on
127.0.0.1 and lets every annotator label every item at once, each on a keep-alive connection of their
own, as the page does: fetch the image, post the label, take the next item from the answer. Then it
checks the database: every acknowledged label is stored once, as acknowledged, and nothing else is.
It reports the p50 and p99 latency of label and image requests and the labels stored per second, as
JSON for the table in docs/labelling.md (``python benchmarks/report.py``).

Bounded: every request has a 10 s timeout and every annotator stops at ``--seconds``; the server is
stopped at the end, whatever happens. ``tests/test_labelling.py`` uses the same annotators to SIGKILL
the server in the middle of a load.

    python benchmarks/labelling_load.py [--annotators 20] [--items 200] [--out benchmarks/results/labelling_load.json]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from invarbench.datasets import load_dataset
from invarbench.environment import measurement_header
from invarbench.labelling import DEFAULT_CONTROL_SHARE, LabelStore, control_count

HOST = "127.0.0.1"
REQUEST_TIMEOUT = 10.0


def digits_folder(folder: Path, count: int) -> Path:
    """A folder in Tramèr et al.'s layout holding the first ``count`` MNIST test images (labels all 0:
    the app never shows or uses them)."""
    mnist = load_dataset("mnist")
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "digits_indexs.npy", np.arange(count))
    np.save(folder / "digits.npy", (mnist.test_images[:count, 0].numpy() * 255).round().astype(np.uint8))
    np.save(folder / "digits_labels.npy", np.zeros(count, dtype=np.int64))
    return folder


def create_study(db: Path, folder: Path, annotators: int) -> dict[str, str]:
    """A labels database of ``folder`` with the default share of control items; annotator name -> token."""
    with LabelStore.create(db, folder) as store:
        return {name: store.invite(name) for name in (f"annotator-{number:02d}" for number in range(annotators))}


class LabelServer:
    """``invarbench label serve`` in a process of its own, on 127.0.0.1; stopped on leaving the ``with``."""

    def __init__(self, db: Path):
        self.db = db
        self.process: subprocess.Popen | None = None
        self.port = 0

    def start(self, port: int = 0) -> LabelServer:
        """Start on ``port`` (0: a free one) and return once it listens (the CLI prints its address then)."""
        command = [
            sys.executable,
            "-m",
            "invarbench.cli",
            "label",
            "serve",
            "--db",
            str(self.db),
            "--host",
            HOST,
            "--port",
            str(port),
        ]
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        line = self.process.stdout.readline()  # the address, or the error, or "" when it exited
        found = re.search(rf"http://{re.escape(HOST)}:(\d+)/", line)
        if found is None:
            self.kill()
            raise RuntimeError(f"the label server did not start: {line}{self.process.stdout.read()}")
        self.port = int(found.group(1))
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown, no flush; every acknowledged label must already be on disk."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.process.stdout.close()

    def __enter__(self) -> LabelServer:
        return self

    def __exit__(self, *exception) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill()


@dataclass
class Annotation:
    """What one annotator's client saw: the labels the server acknowledged (item -> label), request
    latencies in seconds, and how often the connection was lost."""

    token: str
    acknowledged: dict[int, str] = field(default_factory=dict)
    label_seconds: list[float] = field(default_factory=list)
    image_seconds: list[float] = field(default_factory=list)
    reconnects: int = 0
    error: str | None = None


class ConnectionLost(Exception):
    pass


def _request(
    connection: http.client.HTTPConnection, token: str, method: str, path: str, body: dict | None = None
) -> tuple[int, bytes, float]:
    headers = {"Authorization": f"Bearer {token}"}
    payload = None if body is None else json.dumps(body).encode()
    if payload is not None:
        headers["Content-Type"] = "application/json"
    began = time.perf_counter()
    try:
        connection.request(method, path, body=payload, headers=headers)
        response = connection.getresponse()
        return response.status, response.read(), time.perf_counter() - began
    except (OSError, http.client.HTTPException) as error:
        connection.close()  # reconnects on the next request
        raise ConnectionLost(str(error)) from error


def annotate(port: int, annotation: Annotation, stop_at: float) -> None:
    """Label every item in the order the server gives, until none is left or ``stop_at`` (monotonic); a
    lost connection is opened again (a killed server restarted on the same port)."""
    connection = http.client.HTTPConnection(HOST, port, timeout=REQUEST_TIMEOUT)
    state = None
    try:
        while time.monotonic() < stop_at:
            try:
                if state is None:
                    status, body, _ = _request(connection, annotation.token, "GET", "/api/next")
                    if status != 200:
                        raise AssertionError(f"GET /api/next answered {status}: {body!r}")
                    state = json.loads(body)
                if state["item"] is None:
                    return
                item = state["item"]
                status, body, seconds = _request(connection, annotation.token, "GET", f"/image/{item}.png")
                if status != 200 or not body.startswith(b"\x89PNG"):
                    raise AssertionError(f"GET /image/{item}.png answered {status}: {body[:200]!r}")
                annotation.image_seconds.append(seconds)
                label = str(item % 10)
                status, body, seconds = _request(
                    connection, annotation.token, "POST", "/api/label", {"item": item, "label": label}
                )
                if status == 200:
                    annotation.acknowledged[item] = label
                    annotation.label_seconds.append(seconds)
                    state = json.loads(body)
                elif status == 409:
                    state = None  # stored before its answer was lost: ask for the item shown now
                else:
                    raise AssertionError(f"POST /api/label answered {status}: {body!r}")
            except ConnectionLost:
                annotation.reconnects += 1
                state = None
                time.sleep(0.05)
        raise AssertionError(f"did not finish before the deadline ({len(annotation.acknowledged)} labels acknowledged)")
    except Exception as error:  # noqa: BLE001  (handed to Load.wait, which raises it in the main thread)
        annotation.error = repr(error)
    finally:
        connection.close()


class Load:
    """One thread per annotator running :func:`annotate`; ``wait`` joins them."""

    def __init__(self, port: int, tokens: dict[str, str], *, seconds: float):
        self.annotations = {name: Annotation(token) for name, token in tokens.items()}
        stop_at = time.monotonic() + seconds
        self.threads = [
            threading.Thread(target=annotate, args=(port, annotation, stop_at), daemon=True)
            for annotation in self.annotations.values()
        ]
        self.started = time.perf_counter()
        for thread in self.threads:
            thread.start()

    def acknowledged(self) -> int:
        return sum(len(annotation.acknowledged) for annotation in self.annotations.values())

    def wait(self) -> float:
        """Join the annotators (each stops by its deadline); the wall seconds they took. Raises on a failed one."""
        for thread in self.threads:
            thread.join()
        seconds = time.perf_counter() - self.started
        failed = {name: annotation.error for name, annotation in self.annotations.items() if annotation.error}
        if failed:
            raise AssertionError(f"annotators failed: {failed}")
        return seconds


def stored_labels(db: Path) -> dict[tuple[str, int], list[str]]:
    """Every stored label by (annotator, item), read straight from the SQLite file."""
    stored: dict[tuple[str, int], list[str]] = {}
    with contextlib.closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)) as connection:
        for annotator, item, label in connection.execute("SELECT annotator, item_id, label FROM labels"):
            stored.setdefault((annotator, item), []).append(label)
    return stored


def check_stored(db: Path, annotations: dict[str, Annotation], items: int) -> int:
    """Every acknowledged label is stored once, as acknowledged; every annotator labelled each of the
    ``items`` once, and nobody else labelled anything. Returns the labels stored."""
    stored = stored_labels(db)
    duplicated = {key: labels for key, labels in stored.items() if len(labels) != 1}
    assert not duplicated, f"labels stored more than once: {duplicated}"
    for name, annotation in annotations.items():
        wrong = {
            item: (label, stored.get((name, item)))
            for item, label in annotation.acknowledged.items()
            if stored.get((name, item)) != [label]
        }
        assert not wrong, (
            f"{name}: acknowledged labels not stored as acknowledged (item: (acknowledged, stored)): {wrong}"
        )
        assert sorted(item for annotator, item in stored if annotator == name) == list(range(items)), (
            f"{name} did not label every item once"
        )
    assert {annotator for annotator, _ in stored} == set(annotations), "labels of annotators nobody invited"
    return len(stored)


def _percentiles(seconds: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(seconds, n=100, method="inclusive")
    return {"p50_ms": 1000 * cuts[49], "p99_ms": 1000 * cuts[98], "requests": len(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotators", type=int, default=20)
    parser.add_argument(
        "--items", type=int, default=200, help="items per annotator, control items included (default 200)"
    )
    parser.add_argument("--seconds", type=float, default=600, help="every annotator stops by then (default 600)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "labelling_load.json")
    args = parser.parse_args()
    candidates = round(args.items * (1 - DEFAULT_CONTROL_SHARE))
    if candidates + control_count(candidates, DEFAULT_CONTROL_SHARE) != args.items:
        parser.error(
            f"--items {args.items} cannot be split into candidates and {DEFAULT_CONTROL_SHARE:.0%} control items; pass"
            " a multiple of 10"
        )
    load_average = os.getloadavg()[0]  # other work on the machine shares its cores with the server and the clients
    with tempfile.TemporaryDirectory() as work:
        db = Path(work) / "labels.sqlite"
        tokens = create_study(db, digits_folder(Path(work) / "digits", candidates), args.annotators)
        with LabelServer(db) as server:
            server.start()
            load = Load(server.port, tokens, seconds=args.seconds)
            seconds = load.wait()
        stored = check_stored(db, load.annotations, args.items)
    annotations = load.annotations.values()
    report = {
        **measurement_header("labelling_load"),
        "cores": os.cpu_count(),
        "load_average_before": load_average,
        "annotators": args.annotators,
        "items": args.items,
        "control_items": args.items - candidates,
        "labels_stored": stored,
        "labels_acknowledged": sum(len(annotation.acknowledged) for annotation in annotations),
        "reconnects": sum(annotation.reconnects for annotation in annotations),
        "seconds": seconds,
        "labels_per_second": stored / seconds,
        "label_requests": _percentiles([value for annotation in annotations for value in annotation.label_seconds]),
        "image_requests": _percentiles([value for annotation in annotations for value in annotation.image_seconds]),
    }
    del report["threads"]  # torch's threads: not what this measures (the server's threads, its cores)
    print(
        f"{args.annotators} annotators x {args.items} items: {stored} labels stored once each, as acknowledged, in"
        f" {seconds:.1f} s ({report['labels_per_second']:.0f} labels/s); label requests p50"
        f" {report['label_requests']['p50_ms']:.1f} ms, p99 {report['label_requests']['p99_ms']:.1f} ms; image requests"
        f" p50 {report['image_requests']['p50_ms']:.1f} ms, p99 {report['image_requests']['p99_ms']:.1f} ms"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
