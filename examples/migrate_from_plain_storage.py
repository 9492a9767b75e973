"""Move code from a plain storage layer to cas without changing it.

    python examples/migrate_from_plain_storage.py [STORE_DIR]

`save_model` and `load_model` below are written against the usual storage
interface (upload, download, exists, list). Given a cas store they run as
they are, and gain versions, dedup and verified downloads.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from cas.ml.plain_storage import get_default_storage, get_storage_backend, set_default_storage

# -- code written for a plain storage layer: unchanged --------------------------------


def save_model(storage: Any, weights: np.ndarray, name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.npy")
        np.save(path, weights)
        storage.upload(path, f"models/{name}/model.npy")


def load_model(storage: Any, name: str, cache_dir: str) -> np.ndarray:
    remote = f"models/{name}/model.npy"
    if not storage.exists(remote):
        raise FileNotFoundError(remote)
    local = os.path.join(cache_dir, name, "model.npy")
    storage.download_if_newer(remote, local)  # a no-op when the cache is current
    model: np.ndarray = np.load(local)
    return model


# -- the migration: only how the storage object is made changes ----------------------


def main() -> None:
    base = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="cas-example-")
    # The same environment variables a plain storage layer reads.
    os.environ["STORAGE_BACKEND"] = "local"
    os.environ["STORAGE_BASE_PATH"] = base
    os.environ["STORAGE_PREFIX"] = "team-a"
    set_default_storage(None)
    storage = get_default_storage()
    assert storage.uri == get_storage_backend().uri

    rng = np.random.default_rng(0)
    weights = rng.standard_normal(2_000_000).astype(np.float32)  # 8 MB
    save_model(storage, weights, "ranker")
    cache = tempfile.mkdtemp(prefix="cas-cache-")
    assert np.array_equal(load_model(storage, "ranker", cache), weights)

    weights[:10] = 0  # a small update
    save_model(storage, weights, "ranker")
    assert np.array_equal(load_model(storage, "ranker", cache), weights)
    moved = storage.last_transfer
    assert moved is not None
    print(f"update: fetched {moved.fetched_bytes} bytes, reused {moved.reused_bytes} from cache")
    assert moved.fetched_bytes < weights.nbytes

    print(storage.list("models/"))
    assert storage.list("models/") == ["models/ranker/model.npy"]
    # What cas adds: every upload is a version.
    versions = storage.store.log("models/ranker/model.npy")
    print([v.ref for v in versions])
    assert len(versions) == 2
    assert Path(base, "team-a", "config").exists()


if __name__ == "__main__":
    main()
