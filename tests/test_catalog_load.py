"""Queries while processes put, delete, move tags, compact and collect: never stale, never wrong.

Four writer processes put versions to keys of their own, delete some of
them and move a ``best`` tag; a collection process runs ``gc`` back to back
(which rebuilds the catalog); a reader process runs queries, which compact
the catalog themselves when they read more than a few notes. Notes settle
in half a second, so compactions fold them while everything runs. Every
event is journalled with the time it started and ended.

Afterwards, for every query: each version whose put returned before the
query started is in its answer unless its deletion started before the
query ended; no version whose deletion returned before the query started
is; and where a key's tag was last moved before the query started and not
again before it ended, the answer shows it on that version and no other.
On a local store and on the S3 test server.

Run as a script, this file is a child process: ``python test_catalog_load.py
ROLE URI SLOT WORKDIR SECONDS``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from cas.repository import _changes
from cas.store import Store, _index

WRITERS = 4
SECONDS = float(os.environ.get("CAS_CATALOG_LOAD_SECONDS", "8"))


def journal(workdir: Path, role: str, slot: int) -> Any:
    return (workdir / f"{role}-{slot}.log").open("a", buffering=1)


def writer(uri: str, slot: int, workdir: Path, seconds: float) -> None:
    store = Store.open(uri, create=False)
    source = workdir / f"source-{slot}"
    live: list[str] = []
    deadline = time.time() + seconds
    with journal(workdir, "writer", slot) as log:
        step = 0
        while time.time() < deadline:
            step += 1
            key = f"w{slot}/k{step % 3}"
            source.write_bytes(f"{slot}-{step}".encode() * 50)
            start = time.time()
            version = store.put(source, key, metrics={"step": step})
            log.write(
                json.dumps({"event": "put", "ref": version.ref, "start": start, "end": time.time()})
                + "\n"
            )
            live.append(version.ref)
            if step % 3 == 0:
                doomed = live.pop(0)
                start = time.time()
                store.delete(doomed, force=True)
                log.write(
                    json.dumps(
                        {"event": "delete", "ref": doomed, "start": start, "end": time.time()}
                    )
                    + "\n"
                )
            if step % 4 == 0 and live:
                target = live[-1]
                start = time.time()
                store.tag(target, "best")
                log.write(
                    json.dumps({"event": "tag", "ref": target, "start": start, "end": time.time()})
                    + "\n"
                )


def collector(uri: str, workdir: Path, seconds: float) -> None:
    store = Store.open(uri, create=False)
    deadline = time.time() + seconds
    with journal(workdir, "gc", 0) as log:
        while time.time() < deadline:
            report = store.gc()
            log.write(json.dumps({"deleted": report.deleted}) + "\n")
            time.sleep(0.2)


def reader(uri: str, workdir: Path, seconds: float) -> None:
    store = Store.open(uri, create=False)
    deadline = time.time() + seconds
    with journal(workdir, "reader", 0) as log:
        while time.time() < deadline:
            start = time.time()
            versions = store.catalog()
            end = time.time()
            tags = {v.ref: list(v.tags) for v in versions if v.tags}
            log.write(
                json.dumps(
                    {"start": start, "end": end, "refs": [v.ref for v in versions], "tags": tags}
                )
                + "\n"
            )


def read_journal(workdir: Path, pattern: str) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for path in sorted(workdir.glob(pattern))
        for line in path.read_text().splitlines()
    ]


def check_query(query: dict[str, Any], events: list[dict[str, Any]]) -> list[str]:
    """What the query got wrong, against the journal of the writers."""
    answer = set(query["refs"])
    problems = []
    deleting = {e["ref"]: e for e in events if e["event"] == "delete"}
    for event in events:
        ref = event["ref"]
        if event["event"] == "put" and event["end"] < query["start"]:
            deletion = deleting.get(ref)
            if (deletion is None or deletion["start"] > query["end"]) and ref not in answer:
                problems.append(f"missing {ref}, committed before the query")
        if event["event"] == "delete" and event["end"] < query["start"] and ref in answer:
            problems.append(f"shows {ref}, deleted before the query")
    tag_events: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        if event["event"] == "tag":
            tag_events.setdefault(event["ref"].rpartition("@")[0], []).append(event)
    for key, moves in tag_events.items():
        before = [m for m in moves if m["end"] < query["start"]]
        during = [m for m in moves if m["start"] <= query["end"] and m["end"] >= query["start"]]
        if not before or during:
            continue
        last = max(before, key=lambda m: m["end"])
        tagged = sorted(
            r for r, tags in query["tags"].items() if r.startswith(key + "@") and "best" in tags
        )
        deleted_since = deleting.get(last["ref"])
        if deleted_since is not None and deleted_since["start"] <= query["end"]:
            continue  # deleting it removed the tag: the tag may be gone
        if tagged != [last["ref"]]:
            problems.append(f"{key}:best on {tagged}, set on {last['ref']} before the query")
    return problems


def spawn(role: str, uri: str, slot: int, workdir: Path, seconds: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, role, uri, str(slot), str(workdir), str(seconds)],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_queries_under_writers_compaction_and_gc_are_exact(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    uri = str(tmp_path / "store") if kind == "local" else request.getfixturevalue("s3_backend").uri
    store = Store.init(uri)
    store.set_gc_grace(3.0)
    workdir = tmp_path / "work"
    workdir.mkdir()
    children = [spawn("writer", uri, slot, workdir, SECONDS) for slot in range(WRITERS)]
    children.append(spawn("gc", uri, 0, workdir, SECONDS))
    children.append(spawn("reader", uri, 0, workdir, SECONDS + 1))
    for child in children:
        _, err = child.communicate(timeout=SECONDS * 20 + 60)
        assert child.returncode == 0, err[-3000:]

    events = read_journal(workdir, "writer-*.log")
    queries = read_journal(workdir, "reader-*.log")
    problems = [p for query in queries for p in check_query(query, events)]
    assert problems == [], problems[:10]
    assert len(queries) >= 3
    assert sum(e["event"] == "delete" for e in events) >= WRITERS
    assert read_journal(workdir, "gc-*.log"), "no collection ran"
    status = store.catalog_status(check=True)
    assert status.problem is None
    assert status.generation >= 2  # compacted while the others ran


if __name__ == "__main__" and len(sys.argv) == 6:
    # Notes settle fast, and queries compact after a few: compactions happen all the time.
    _changes.SETTLE = 0.5
    _index.COMPACT_AFTER = 4
    role, uri_arg, slot_arg, workdir_arg, seconds_arg = sys.argv[1:]
    if role == "writer":
        writer(uri_arg, int(slot_arg), Path(workdir_arg), float(seconds_arg))
    elif role == "gc":
        collector(uri_arg, Path(workdir_arg), float(seconds_arg))
    else:
        reader(uri_arg, Path(workdir_arg), float(seconds_arg))
