"""Garbage collection removes what writers that died left: temporary files, partial uploads.

Only those older than the grace go (a live writer's are recent), and the
report counts them.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

from gc_helpers import REAL_GRACE, RESOLUTION
from helpers import MiB, ok, run_cas

from cas.backends import Backend
from cas.backends.base import TEMP_PREFIX
from cas.backends.local import RESERVE_NAME
from cas.store import Store


def test_gc_removes_temporary_files_older_than_the_grace(tmp_path: Path) -> None:
    store = tmp_path / "store"
    ok(run_cas("init", store=store))
    directory = store / "chunks" / "ab"
    directory.mkdir(parents=True)
    old = directory / f"{TEMP_PREFIX}-{uuid.uuid4().hex}"
    old.write_bytes(bytes(2 * MiB))  # what a killed put left while writing a chunk
    two_days_ago = time.time() - 2 * 86400
    os.utime(old, (two_days_ago, two_days_ago))
    recent = store / "refs" / f"{TEMP_PREFIX}-{uuid.uuid4().hex}"
    recent.parent.mkdir()
    recent.write_bytes(b"a ref being written")

    dry = ok(run_cas("gc", "--dry-run", store=store)).stdout
    assert "leftovers:     1 temporary file or partial upload of writers" in dry
    assert "2.0 MiB would be removed" in dry
    assert old.exists()
    report = json.loads(ok(run_cas("gc", "--json", store=store)).stdout)
    assert (report["leftovers_removed"], report["leftover_bytes"]) == (1, 2 * MiB)
    assert not old.exists()
    assert recent.exists(), "a recent temporary file (a live writer's) went"
    assert (store / RESERVE_NAME).exists(), "the reserve is not a leftover"
    report = json.loads(ok(run_cas("gc", "--grace", "0", "--json", store=store)).stdout)
    assert report["leftovers_removed"] == 1
    assert not recent.exists()
    assert (store / RESERVE_NAME).exists()


def test_gc_aborts_partial_uploads_older_than_the_grace(s3_backend: Backend) -> None:
    from cas.backends.s3 import S3Backend

    assert isinstance(s3_backend, S3Backend)
    grace = REAL_GRACE["s3"]
    store = Store.init(s3_backend.uri)
    store.set_gc_grace(grace)
    client, bucket = s3_backend._client, s3_backend.bucket
    name = s3_backend._name("chunks/ab/" + "ab" * 32)
    upload = client.create_multipart_upload(Bucket=bucket, Key=name)
    client.upload_part(
        Bucket=bucket, Key=name, UploadId=upload["UploadId"], PartNumber=1, Body=bytes(1000)
    )
    assert store.gc().leftovers_removed == 0  # recent: its writer may be alive
    time.sleep(grace + RESOLUTION["s3"])
    dry = store.gc(dry_run=True)
    assert (dry.leftovers_removed, dry.leftover_bytes) == (1, 1000)
    report = store.gc()
    assert (report.leftovers_removed, report.leftover_bytes) == (1, 1000)
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
