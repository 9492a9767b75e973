"""Concurrent writers: separate processes and threads putting to one key all succeed."""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

from helpers import CAS, MiB, cas_env, digests, ok, random_bytes, run_cas, small_store, text_bytes

import cas


def make_tree(root: Path, seed: int) -> dict[str, str]:
    (root / "sub").mkdir(parents=True)
    (root / "shared.bin").write_bytes(random_bytes(1 * MiB, 4242))  # the same in every tree
    (root / "own.bin").write_bytes(random_bytes(1 * MiB, seed))
    (root / "sub" / "log.txt").write_bytes(text_bytes(200_000, seed))
    return digests(root)


def test_four_processes_put_to_one_key(tmp_path: Path) -> None:
    store = tmp_path / "store"
    ok(run_cas("init", "--chunk-avg", "64K", store=store))
    sources = {i: tmp_path / f"src{i}" for i in range(4)}
    expected = {i: make_tree(src, seed=i) for i, src in sources.items()}

    procs = {
        i: subprocess.Popen(
            [
                *CAS,
                "--store",
                str(store),
                "put",
                str(src),
                "runs/shared",
                "--json",
                "--meta",
                f"writer={i}",
            ],
            env=cas_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, src in sources.items()
    }
    numbers = {}
    for i, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"writer {i} failed: {err}"
        numbers[i] = json.loads(out)["version"]
    assert sorted(numbers.values()) == [1, 2, 3, 4], numbers

    log = json.loads(ok(run_cas("log", "runs/shared", "--json", store=store)).stdout)
    assert sorted(v["version"] for v in log) == [1, 2, 3, 4]
    assert {v["version"]: v["metadata"]["writer"] for v in log} == {
        n: i for i, n in numbers.items()
    }
    for i, number in numbers.items():
        dest = tmp_path / f"out{i}"
        ok(run_cas("get", f"runs/shared@{number}", dest, store=store))
        assert digests(dest) == expected[i]
    ok(run_cas("verify", "--deep", store=store))


def test_threads_put_and_get_through_one_store(tmp_path: Path) -> None:
    store = small_store(tmp_path / "store")
    sources = {i: tmp_path / f"src{i}" for i in range(6)}
    expected = {i: make_tree(src, seed=100 + i) for i, src in sources.items()}
    barrier = threading.Barrier(len(sources))
    results: dict[int, int] = {}
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            barrier.wait()
            results[i] = store.put(sources[i], "k", metadata={"writer": i}).number
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(i,)) for i in sources]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert sorted(results.values()) == list(range(1, 7))

    # Concurrent restores of every version, through a second handle on the store.
    reader = cas.open(tmp_path / "store", create=False)
    restored: dict[int, dict[str, str]] = {}

    def restore(i: int) -> None:
        try:
            dest = tmp_path / f"out{i}"
            reader.get(f"k@{results[i]}", dest)
            restored[i] = digests(dest)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=restore, args=(i,)) for i in sources]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert restored == expected


def test_concurrent_puts_of_identical_data_share_chunks(tmp_path: Path) -> None:
    store_root = tmp_path / "store"
    ok(run_cas("init", "--chunk-avg", "64K", store=store_root))
    src = tmp_path / "same"
    make_tree(src, seed=7)
    procs = [
        subprocess.Popen(
            [*CAS, "--store", str(store_root), "put", str(src), f"k{i}"],
            env=cas_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    stats = cas.open(store_root, create=False).stats()
    assert stats.versions == 3
    assert stats.chunks == stats.referenced_chunks, "racing writers stored a chunk twice"
    assert stats.dedup_ratio == 3.0
