"""What the help and the docs say is what cas does."""

from __future__ import annotations

import importlib.metadata
import inspect
import re
import subprocess
from pathlib import Path

import pytest
from helpers import PYTHON, ROOT, cas_env

from cas.backends import local
from cas.cli import main
from cas.store import FOLDER_WORKERS, OBJECT_STORE_WORKERS, ChunkerParams
from cas.units import format_size


@pytest.mark.parametrize("command", ["put", "get"])
def test_jobs_help_states_the_defaults_the_backends_use(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    from cas.backends.azure import AzureBackend
    from cas.backends.gcs import GCSBackend
    from cas.backends.s3 import S3Backend

    for backend in (S3Backend, GCSBackend, AzureBackend):
        default = inspect.signature(backend).parameters["concurrency"].default
        assert default == OBJECT_STORE_WORKERS, backend
    fewest, most = FOLDER_WORKERS
    for cores, workers in [(1, fewest), (fewest + 1, fewest + 1), (most + 50, most)]:
        monkeypatch.setattr(local, "_cores", lambda cores=cores: cores)
        assert local.default_concurrency() == workers

    with pytest.raises(SystemExit):
        main([command, "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert (
        f"(default: {OBJECT_STORE_WORKERS} on S3, GCS and Azure; "
        f"on a folder one per core, {fewest} to {most})"
    ) in help_text


def test_chunk_avg_help_states_the_sizes_new_stores_get(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cas.backends import MemoryBackend
    from cas.store._config import default_chunker

    folder, object_store = ChunkerParams(), ChunkerParams.for_object_store()
    assert default_chunker(local.LocalBackend(tmp_path)) == folder
    remote = MemoryBackend()
    remote.remote = True  # as S3, GCS and Azure say of themselves
    assert default_chunker(remote) == object_store

    with pytest.raises(SystemExit):
        main(["init", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert (
        f"(default {format_size(folder.avg_size)} on a folder, "
        f"{format_size(object_store.avg_size)} on S3, GCS and Azure;"
    ) in help_text


def test_cas_version_is_the_installed_distributions(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out == f"cas {importlib.metadata.version('cas-store')}\n"


def test_the_package_version_is_written_once() -> None:
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"]
    assert pyproject["project"]["dynamic"] == ["version"]
    dynamic = pyproject["tool"]["setuptools"]["dynamic"]
    assert dynamic["version"] == {"attr": "cas.__version__"}


def test_the_readme_demo_says_what_its_checkpoint_is_and_gets_it_back(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    proc = subprocess.run(
        [PYTHON, ROOT / "scripts" / "demo.py", "--workdir", workdir],
        env=cas_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert ("all-MiniLM-L6-v2's real weights" in out) != ("pseudo-random" in out)
    weights = workdir / "ckpt-100" / "model.safetensors"
    match = re.search(r"\((\S+ \S+) of (\S+ \S+)\) moved by", out)
    assert match is not None, out
    assert match.group(2) == format_size(weights.stat().st_size)
    assert "both versions restored byte for byte" in out
    assert out.rstrip().endswith("ok")
