"""A local store on a device that fills up: its own error, and a cleanup that still works.

The store lives on a small tmpfs mounted for the test (the tests run as
root in CI; where mounting is not allowed, the test is skipped and says
why). Puts fill it until one fails with "no space left on device" and exit
status 5; a filler file then takes the last free byte. `cas gc --dry-run`,
`cas rm` and `cas gc` must still work, drawing on the store's reserve, and
free the space for the next put.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import KiB, MiB, ok, random_bytes, run_cas

from cas.backends.local import RESERVE_NAME, RESERVE_SIZE
from cas.errors import EXIT_NO_SPACE
from cas.store import Store

DISK = 6 * MiB


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    argv = ["mount", "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", str(mount)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        pytest.skip("no mount command to make a small file system with")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.strip() or proc.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def free_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def fill(path: Path) -> None:
    """Take every free byte of the device that holds ``path`` (a file made beforehand)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        for size in (64 * KiB, 4 * KiB, 1):
            while _write(fd, bytes(size)):
                pass
    finally:
        os.close(fd)
    assert free_bytes(path.parent) == 0


def _write(fd: int, data: bytes) -> bool:
    try:
        os.write(fd, data)
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        return False
    return True


def test_full_store_says_so_and_can_still_be_cleaned(small_disk: Path, tmp_path: Path) -> None:
    store = small_disk / "store"
    ok(run_cas("init", "--chunk-avg", "64K", store=store))
    (small_disk / "filler").touch()
    assert (store / RESERVE_NAME).stat().st_blocks * 512 >= RESERVE_SIZE
    source = tmp_path / "ckpt.bin"
    for number in range(1, 40):
        source.write_bytes(random_bytes(512 * KiB, seed=number))
        proc = run_cas("put", source, "ckpt", store=store)
        if proc.returncode != 0:
            break
    else:
        pytest.fail("the device never filled up")
    assert number > 3, proc.stderr
    assert proc.returncode == EXIT_NO_SPACE, proc.stderr
    assert f"no space left on device at {store}" in proc.stderr
    assert "storage service" not in proc.stderr
    assert (store / RESERVE_NAME).exists(), "a put used the reserve"
    fill(small_disk / "filler")

    # Every byte taken: looking at what gc would do, deleting and collecting still work.
    dry = json.loads(ok(run_cas("gc", "--dry-run", "--json", store=store)).stdout)
    assert dry["deleted"] == 0
    fill(small_disk / "filler")
    ok(run_cas("rm", "ckpt@1", store=store))
    ok(run_cas("rm", "ckpt@2", store=store))
    fill(small_disk / "filler")
    report = json.loads(ok(run_cas("gc", "--grace", "0", "--json", store=store)).stdout)
    assert report["bytes_reclaimed"] >= 2 * 512 * KiB
    assert (store / RESERVE_NAME).exists(), "the reserve was not set aside again"
    source.write_bytes(random_bytes(512 * KiB, seed=99))
    assert ok(run_cas("put", source, "ckpt", store=store)).stdout.strip() == f"ckpt@{number}"
    assert Store.open(store, create=False).verify(deep=True).ok


def test_without_its_reserve_a_full_store_names_the_device(small_disk: Path) -> None:
    store = small_disk / "store"
    ok(run_cas("init", store=store))
    (store / RESERVE_NAME).unlink()  # a store made before the reserve existed, say
    (small_disk / "filler").touch()
    fill(small_disk / "filler")
    proc = run_cas("gc", store=store)
    assert proc.returncode == EXIT_NO_SPACE
    assert f"no space left on device at {store}" in proc.stderr
    (small_disk / "filler").unlink()
    ok(run_cas("gc", store=store))
    assert (store / RESERVE_NAME).exists()
