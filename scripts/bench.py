"""Benchmark cas against ``tar | zstd -3 -T2``, restic and a plain copy on synthetic ML artifacts.

Run from the repository root (the virtualenv provides numpy and cas)::

    .venv/bin/python scripts/bench.py                          # full run (~1.6 GB), 3 repeats
    .venv/bin/python scripts/bench.py --scale 0.1 --repeat 1   # quick smoke test (~165 MB)
    .venv/bin/python scripts/bench.py --tools tar,restic,copy  # without cas
    .venv/bin/python scripts/bench.py --rss-scaling --tools cas  # + 256 MiB / 1 GiB / 4 GiB files
    .venv/bin/python scripts/bench.py --json bench-out/bench.json

The data (see ``bench_data.py``: 3 series x 5 versions, and 2 fine-tuning
series x 20 versions) is generated once,
deterministically, under ``--workdir`` (default ``/tmp/cas-bench``) and reused
while its manifest matches. Each round, every tool gets a fresh repository and
ingests every version directory in order, one timed subprocess per version;
then restores every version into a fresh directory (timed), checked file by
file against the SHA-256 recorded at generation. The tools take turns version
by version, so load from elsewhere on the machine falls on all of them alike,
and who goes first moves on each round (the first restore of a round writes
into memory the VM's host must back again, at half speed for whoever it is).
MB/s = logical bytes (10^6) / summed wall time of those subprocesses; ``CPU s``
is their summed user + system time, which load on a shared machine disturbs
far less than wall time. With ``--repeat N`` the report gives medians over N
rounds, and cas's ratios are medians of the ratios within each round.

* Stored bytes: apparent size of every file in the repository or archive
  directory (what an object store bills); ``on disk`` is allocated (``du``).
  The restic cache lives outside its repository and counts for nothing.
* Peak RSS: GNU ``/usr/bin/time`` (``ru_maxrss`` from ``wait4``) around each
  command, max over a tool's runs. For ``bash -c 'tar | zstd'`` it is the
  largest single process of the pipeline, not their sum. (``os.wait4`` from
  this script would overstate it: on exec, Linux carries the forking Python
  process's high-water mark into the child.)
* The page cache cannot be dropped without root: the source data is read once
  before measuring (warm cache for every tool) and ``sync`` runs, untimed,
  after every command. A tool's own fsync calls are timed.
* cas runs once untimed before each round (a tiny put and get), without
  PYTHONDONTWRITEBYTECODE, so it is measured with its bytecode cached, as an
  installed package is.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_data import (
    Dataset,
    ToolError,
    Version,
    generate_dataset,
    hash_tree,
    human,
    remove,
    tree_bytes,
    verify,
    write_big_file,
)
from bench_report import make_log, report, report_rss, report_versions

MB = 1_000_000
ROOT = Path(__file__).resolve().parent.parent
ALL_TOOLS = ("cas", "tar", "restic", "copy")
RSS_SIZES = (256 << 20, 1 << 30, 4 << 30)

LogFn = Callable[[str], None]

# GNU time reports the wait4() ru_maxrss of the command it forks from its own small
# process. os.wait4() straight from this (large) Python process would not do: on exec
# Linux folds the forking process's high-water mark into the child's ru_maxrss.
TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else ""
# Tools run from here, so that "python -m cas" imports the cas on its PYTHONPATH or the
# installed one, never a cas/ directory that happens to be in the current directory.
NEUTRAL_CWD = tempfile.gettempdir()


@dataclass
class Run:
    seconds: float
    maxrss_kib: int
    stdout: str
    cpu_s: float = 0.0


def run(cmd: list[str], env: dict[str, str] | None = None) -> Run:
    """Run ``cmd`` under GNU time; its wall time, peak RSS (KiB) and CPU time (user + sys)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        with tempfile.NamedTemporaryFile("r") as rss:
            timed = [TIME, "-f", "%M %U %S", "-o", rss.name, *cmd] if TIME else cmd
            t0 = time.perf_counter()
            proc = subprocess.Popen(
                timed, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env, cwd=NEUTRAL_CWD
            )
            _pid, status, usage = os.wait4(proc.pid, 0)
            seconds = time.perf_counter() - t0
            proc.returncode = os.waitstatus_to_exitcode(status)
            if TIME:
                kib, user, system = rss.read().splitlines()[-1].split()
                maxrss, cpu = int(kib), float(user) + float(system)
            else:
                maxrss, cpu = usage.ru_maxrss, usage.ru_utime + usage.ru_stime
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        if proc.returncode != 0:
            tail = err.read().decode(errors="replace")[-3000:]
            raise ToolError(f"{' '.join(cmd)!r} exited {proc.returncode}:\n{stdout[-2000:]}{tail}")
    return Run(seconds, maxrss, stdout, cpu)


def sync() -> None:
    os.sync()


# --------------------------------------------------------------------------- tools


class Tool:
    """One way of storing versions: ``ingest`` returns a handle that ``restore`` takes."""

    name = ""

    def __init__(self, repo: Path) -> None:
        self.repo = repo

    def init(self) -> None:
        self.repo.mkdir(parents=True)

    def warm_up(self, scratch: Path) -> None:
        """Untimed: whatever a first run would pay once (bytecode compilation, page cache)."""

    def ingest(self, v: Version) -> tuple[Run, str]:
        raise NotImplementedError

    def restore(self, handle: str, v: Version, dest: Path) -> tuple[Run, Path]:
        """Restore into ``dest`` (absent); return the directory that holds the files."""
        raise NotImplementedError


def default_cas_command() -> str:
    script = ROOT / ".venv" / "bin" / "cas"
    return str(script) if script.exists() else f"{sys.executable} -m cas"


def run_cas(cmd: list[str]) -> Run:
    """Run cas with its bytecode cached, as an installed package has it (the warm-up
    writes the cache even where PYTHONDONTWRITEBYTECODE is set)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return run(cmd, env)


class Cas(Tool):
    name = "cas"
    command: ClassVar[list[str]] = []

    def _cas(self, *args: str) -> list[str]:
        return [*self.command, "--store", str(self.repo), "--no-progress", *args]

    def init(self) -> None:
        self.repo.parent.mkdir(parents=True, exist_ok=True)
        run_cas(self._cas("init"))

    def warm_up(self, scratch: Path) -> None:
        tmp = scratch / "cas-warm-up"
        remove(tmp)
        (tmp / "src").mkdir(parents=True)
        (tmp / "src" / "f").write_bytes(b"warm-up " * 100_000)
        warm = type(self)(tmp / "store")
        warm.init()
        run_cas(warm._cas("put", str(tmp / "src"), "warm"))
        run_cas(warm._cas("get", "warm@1", str(tmp / "dest")))
        remove(tmp)

    def ingest(self, v: Version) -> tuple[Run, str]:
        key = f"bench/{v.series}"
        r = run_cas(self._cas("put", str(v.path), key))
        found = re.findall(rf"{re.escape(key)}@\d+", r.stdout)
        if not found:
            raise ToolError(f"cas put printed no {key}@N:\n{r.stdout[-2000:]}")
        return r, found[-1]

    def restore(self, handle: str, v: Version, dest: Path) -> tuple[Run, Path]:
        return run_cas(self._cas("get", handle, str(dest))), dest


class TarZstd(Tool):
    name = "tar"

    def ingest(self, v: Version) -> tuple[Run, str]:
        out = self.repo / f"{v.series}-v{v.number}.tar.zst"
        script = 'tar -C "$1" -cf - "$2" | zstd -3 -T2 -q -f -o "$3"'
        cmd = ["bash", "-o", "pipefail", "-c", script, "-", str(v.path.parent), v.path.name]
        return run([*cmd, str(out)]), str(out)

    def restore(self, handle: str, v: Version, dest: Path) -> tuple[Run, Path]:
        dest.mkdir(parents=True)
        script = 'zstd -d -q -c "$1" | tar -C "$2" -xf -'
        return run(["bash", "-o", "pipefail", "-c", script, "-", handle, str(dest)]), dest / (
            v.path.name
        )


class Restic(Tool):
    name = "restic"

    def __init__(self, repo: Path) -> None:
        super().__init__(repo)
        self.env = dict(os.environ, RESTIC_PASSWORD="bench", RESTIC_REPOSITORY=str(repo))
        self.cache = repo.parent / f"{repo.name}-cache"

    def _restic(self, *args: str) -> list[str]:
        return ["restic", "--cache-dir", str(self.cache), *args]

    def init(self) -> None:
        self.repo.parent.mkdir(parents=True, exist_ok=True)
        run(self._restic("init", "--repository-version", "2"), self.env)

    def ingest(self, v: Version) -> tuple[Run, str]:
        tag = f"{v.series}-v{v.number}"
        r = run(
            self._restic("backup", "--json", "--host", "bench", "--tag", tag, str(v.path)), self.env
        )
        for line in reversed(r.stdout.splitlines()):
            if '"summary"' in line:
                return r, str(json.loads(line)["snapshot_id"])
        raise ToolError(f"restic backup printed no summary:\n{r.stdout[-2000:]}")

    def restore(self, handle: str, v: Version, dest: Path) -> tuple[Run, Path]:
        r = run(self._restic("restore", handle, "--target", str(dest)), self.env)
        return r, dest / v.path.relative_to("/")


class Copy(Tool):
    name = "copy"

    def ingest(self, v: Version) -> tuple[Run, str]:
        out = self.repo / v.series / f"v{v.number}"
        out.parent.mkdir(parents=True, exist_ok=True)
        return run(["cp", "-r", str(v.path), str(out)]), str(out)

    def restore(self, handle: str, v: Version, dest: Path) -> tuple[Run, Path]:
        dest.parent.mkdir(parents=True, exist_ok=True)
        return run(["cp", "-r", handle, str(dest)]), dest


class CasBase(Cas):
    """cas as some other version of it runs (``--baseline-cas-command``), for ratios
    of a change against what it changes, measured in the same rounds."""

    name = "cas-base"
    command: ClassVar[list[str]] = []


TOOL_CLASSES: dict[str, type[Tool]] = {c.name: c for c in (Cas, CasBase, TarZstd, Restic, Copy)}


# --------------------------------------------------------------------------- measuring


@dataclass
class VersionRun:
    version: str
    logical_bytes: int
    ingest_s: float
    ingest_cpu_s: float
    ingest_rss_mib: float
    stored_after: int
    restore_s: float = 0.0
    restore_cpu_s: float = 0.0
    restore_rss_mib: float = 0.0


@dataclass
class Result:
    tool: str
    logical_bytes: int
    ingest_s: float = 0.0
    restore_s: float = 0.0
    ingest_cpu_s: float = 0.0
    restore_cpu_s: float = 0.0
    stored_bytes: int = 0
    disk_bytes: int = 0
    ingest_rss_mib: float = 0.0
    restore_rss_mib: float = 0.0
    per_version: list[VersionRun] = field(default_factory=list)

    @property
    def ingest_mbs(self) -> float:
        return self.logical_bytes / MB / self.ingest_s

    @property
    def restore_mbs(self) -> float:
        return self.logical_bytes / MB / self.restore_s

    @property
    def ratio(self) -> float:
        return self.logical_bytes / self.stored_bytes

    @property
    def peak_rss_mib(self) -> float:
        return max(self.ingest_rss_mib, self.restore_rss_mib)


def bench_round(
    tools: list[str], data: Dataset, scratch: Path, log: LogFn, round_index: int = 0
) -> dict[str, Result]:
    """One run of every tool on fresh repositories. The tools take turns version by
    version (in a rotating order), so load from elsewhere on the machine falls on all
    of them alike.

    The rotation also moves on by one each round. On this VM, the first writes of a
    phase go to memory the host has to back again (freed page cache, returned to it
    between rounds): the first restore of a round ran at half speed whichever tool
    made it, and with the same order every round one tool paid it every time."""
    objs: dict[str, Tool] = {}
    res = {name: Result(name, data.logical_bytes) for name in tools}
    handles: dict[str, list[str]] = {name: [] for name in tools}
    for name in tools:
        for p in (scratch / name, scratch / f"{name}-cache", scratch / f"restore-{name}"):
            remove(p)
        objs[name] = TOOL_CLASSES[name](scratch / name)
        objs[name].warm_up(scratch)
        objs[name].init()
    sync()
    for i, v in enumerate(data.versions):
        vname = f"{v.series}/v{v.number}"
        turn = (i + round_index) % len(tools)
        for name in tools[turn:] + tools[:turn]:
            r, handle = objs[name].ingest(v)
            sync()
            handles[name].append(handle)
            rss = r.maxrss_kib / 1024
            x = res[name]
            x.ingest_s += r.seconds
            x.ingest_cpu_s += r.cpu_s
            x.ingest_rss_mib = max(x.ingest_rss_mib, rss)
            stored = tree_bytes(objs[name].repo)[0]
            x.per_version.append(
                VersionRun(vname, v.logical_bytes, r.seconds, r.cpu_s, rss, stored)
            )
            log(f"    {name} put {vname}: {v.logical_bytes / MB / r.seconds:7.1f} MB/s")
    for name in tools:
        res[name].stored_bytes, res[name].disk_bytes = tree_bytes(objs[name].repo)
    for i, v in enumerate(data.versions):
        vname = f"{v.series}/v{v.number}"
        turn = (i + round_index) % len(tools)
        for name in tools[turn:] + tools[:turn]:
            dest = scratch / f"restore-{name}" / f"{v.series}-v{v.number}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            r, where = objs[name].restore(handles[name][i], v, dest)
            sync()
            verify(hash_tree(where), v.files, f"{name} {vname}")
            remove(dest)
            x = res[name]
            x.restore_s += r.seconds
            x.restore_cpu_s += r.cpu_s
            x.restore_rss_mib = max(x.restore_rss_mib, r.maxrss_kib / 1024)
            x.per_version[i].restore_s = r.seconds
            x.per_version[i].restore_cpu_s = r.cpu_s
            x.per_version[i].restore_rss_mib = r.maxrss_kib / 1024
            log(f"    {name} get {vname}: {v.logical_bytes / MB / r.seconds:7.1f} MB/s")
    for name in tools:
        for p in (scratch / name, scratch / f"{name}-cache", scratch / f"restore-{name}"):
            remove(p)
    return res


def median_result(runs: list[Result]) -> dict[str, float]:
    keys = ["ingest_mbs", "restore_mbs", "stored_bytes", "disk_bytes", "ratio"]
    keys += ["ingest_rss_mib", "restore_rss_mib", "peak_rss_mib", "ingest_s", "restore_s"]
    keys += ["ingest_cpu_s", "restore_cpu_s"]
    return {k: statistics.median(float(getattr(r, k)) for r in runs) for k in keys}


def rss_scaling(workdir: Path, scale: float, log: LogFn) -> list[dict[str, float]]:
    """Put and get single files of growing size through cas; peak RSS of each."""
    rows = []
    for size in RSS_SIZES:
        total = max(1 << 20, int(size * scale))
        path = workdir / "big" / f"weights-{total}.safetensors"
        log(f"  big file {human(total)}: generating (streaming)")
        info = write_big_file(path, total)
        store = workdir / "scratch" / "cas-big"
        shutil.rmtree(store, ignore_errors=True)
        tool = Cas(store)
        tool.init()
        sync()
        put = run_cas(tool._cas("put", str(path), "bench/big"))
        sync()
        handle = re.findall(r"bench/big@\d+", put.stdout)[-1]
        dest = workdir / "scratch" / "big-restored"
        remove(dest)
        get = run_cas(tool._cas("get", handle, str(dest)))
        sync()
        restored = dest if dest.is_file() else dest / path.name
        verify({"f": hash_tree(restored.parent)[restored.name]}, {"f": info}, "big file")
        stored = tree_bytes(store)[0]
        remove(dest)
        shutil.rmtree(store)
        row = {
            "file_bytes": float(info.size),
            "put_mbs": info.size / MB / put.seconds,
            "put_rss_mib": put.maxrss_kib / 1024,
            "get_mbs": info.size / MB / get.seconds,
            "get_rss_mib": get.maxrss_kib / 1024,
            "stored_bytes": float(stored),
        }
        log(f"    {json.dumps({k: round(x, 1) for k, x in row.items()})}")
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "cas-bench")
    ap.add_argument(
        "--tools", default=",".join(ALL_TOOLS), help="comma-separated subset of %(default)s"
    )
    ap.add_argument("--scale", type=float, default=1.0, help="data size factor (0.1 = smoke test)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per tool; medians are reported")
    ap.add_argument(
        "--rss-scaling", action="store_true", help="also 256 MiB/1 GiB/4 GiB files through cas"
    )
    ap.add_argument(
        "--cas-command",
        default=default_cas_command(),
        help="how to run cas (default %(default)s); e.g. 'python -m cas' with PYTHONPATH "
        "pointing at an exported commit, to measure a fixed version",
    )
    ap.add_argument(
        "--baseline-cas-command",
        help="also run cas this way, as the tool cas-base (e.g. 'python -m cas' with "
        "PYTHONPATH at an exported commit): ratios of cas against it come from the same rounds",
    )
    ap.add_argument("--json", type=Path, help="write every number to this file")
    ap.add_argument("-q", "--quiet", action="store_true", help="no per-version progress")
    args = ap.parse_args(argv)
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    unknown = set(tools) - set(ALL_TOOLS)
    if unknown:
        ap.error(f"unknown tools: {sorted(unknown)}")
    if "restic" in tools and shutil.which("restic") is None:
        print("restic not installed: skipping it", file=sys.stderr)
        tools.remove("restic")
    log, info = make_log(not args.quiet)
    Cas.command = shlex.split(args.cas_command)
    if args.baseline_cas_command:
        CasBase.command = shlex.split(args.baseline_cas_command)
        tools.append(CasBase.name)
    started = time.monotonic()
    workdir: Path = args.workdir.resolve()
    info(f"data under {workdir} (scale {args.scale})")
    data = generate_dataset(workdir / f"data-{args.scale:g}", args.scale, log=info)
    info("reading the source data once (warms the page cache, checks hashes)")
    for v in data.versions:
        verify(hash_tree(v.path), v.files, f"source {v.series}/v{v.number}")
    scratch = workdir / "scratch"
    runs: dict[str, list[Result]] = {t: [] for t in tools}
    for i in range(args.repeat):
        info(f"run {i + 1}/{args.repeat}: {', '.join(tools)}")
        for name, res in bench_round(tools, data, scratch, log, round_index=i).items():
            info(
                f"  {name}: ingest {res.ingest_mbs:.1f} MB/s, restore {res.restore_mbs:.1f} MB/s, "
                f"stored {human(res.stored_bytes)}, peak RSS {res.peak_rss_mib:.1f} MiB"
            )
            runs[name].append(res)
    med = {t: median_result(r) for t, r in runs.items()}
    print(report_versions(data, runs))
    print(report(data, med, runs), flush=True)
    doc: dict[str, object] = {
        "scale": data.scale,
        "repeat": args.repeat,
        "logical_bytes": data.logical_bytes,
        "versions": [f"{v.series}/v{v.number}" for v in data.versions],
        "median": med,
        "runs": {t: [asdict(r) for r in rs] for t, rs in runs.items()},
    }
    if args.rss_scaling:
        write_json(args.json, doc, started)
        doc["rss_scaling"] = rows = rss_scaling(workdir, args.scale, info)
        print(report_rss(rows))
    print(f"\nload average (1/5/15 min): {os.getloadavg()}")
    print(f"total wall time: {time.monotonic() - started:.0f} s")
    write_json(args.json, doc, started)
    return 0


def write_json(path: Path | None, doc: dict[str, object], started: float) -> None:
    if path:
        doc.update(wall_s=time.monotonic() - started, loadavg=os.getloadavg())
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    sys.exit(main())
