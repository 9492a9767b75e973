"""The tables scripts/bench.py prints: medians, ratios against the other tools,
per-version figures and the memory scaling runs."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from bench_data import Dataset, human

if TYPE_CHECKING:
    from bench import Result

MB = 1_000_000
LogFn = Callable[[str], None]


def make_log(verbose: bool) -> tuple[LogFn, LogFn]:
    """(progress, info): progress lines only when verbose, info lines always; on stderr."""
    t0 = time.monotonic()

    def info(msg: str) -> None:
        print(f"[{time.monotonic() - t0:6.0f}s] {msg}", file=sys.stderr, flush=True)

    return (info if verbose else lambda _msg: None), info


def ratio_vs(runs: dict[str, list[Result]], other: str, key: str) -> float:
    """Median over repeats of cas's ``key`` over ``other``'s in the same repeat."""
    return statistics.median(
        float(getattr(c, key)) / float(getattr(o, key))
        for c, o in zip(runs["cas"], runs[other], strict=True)
    )


def report(data: Dataset, med: dict[str, dict[str, float]], runs: dict[str, list[Result]]) -> str:
    repeat = len(next(iter(runs.values())))
    lines = [
        f"logical data: {human(data.logical_bytes)} ({data.logical_bytes / MB:.0f} MB) in "
        f"{len(data.versions)} versions, scale {data.scale}; medians of {repeat} run(s)",
        "",
        f"{'tool':<8}{'ingest MB/s':>12}{'restore MB/s':>13}{'stored':>12}{'on disk':>12}"
        f"{'logical/stored':>16}{'peak RSS MiB':>14}{'CPU s put/get':>15}",
    ]
    for name, m in med.items():
        lines.append(
            f"{name:<8}{m['ingest_mbs']:>12.1f}{m['restore_mbs']:>13.1f}"
            f"{human(m['stored_bytes']):>12}{human(m['disk_bytes']):>12}"
            f"{m['ratio']:>16.2f}{m['peak_rss_mib']:>14.1f}"
            f"{m['ingest_cpu_s']:>9.1f}/{m['restore_cpu_s']:<5.1f}"
        )
    if "cas" in med and len(med) > 1:
        c = med["cas"]
        lines += [
            "",
            "cas vs      ingest x   restore x   stored (cas/other)  (medians of per-run ratios)",
        ]
        for name in med:
            if name != "cas":
                lines.append(
                    f"  {name:<8}{ratio_vs(runs, name, 'ingest_mbs'):>9.2f}"
                    f"{ratio_vs(runs, name, 'restore_mbs'):>12.2f}"
                    f"{ratio_vs(runs, name, 'stored_bytes'):>13.3f}"
                )
        if "restic" in med:
            checks = [
                ("ingest >= 4x restic", ratio_vs(runs, "restic", "ingest_mbs") >= 4),
                ("restore >= 4x restic", ratio_vs(runs, "restic", "restore_mbs") >= 4),
                ("stored <= restic", ratio_vs(runs, "restic", "stored_bytes") <= 1),
                ("peak RSS <= 200 MB", c["peak_rss_mib"] * 1.048576 <= 200),
            ]
            lines += [
                "",
                "targets: " + ", ".join(f"{n}: {'ok' if ok else 'MISSED'}" for n, ok in checks),
            ]
    return "\n".join(lines)


def report_versions(data: Dataset, runs: dict[str, list[Result]]) -> str:
    """Stored bytes each version added (first run), and median put MB/s per version."""
    tools = [t for t, r in runs.items() if r]
    head = f"{'version':<15}{'MB':>7}" + "".join(f"{t + ' +MB':>12}{'MB/s':>7}" for t in tools)
    lines = ["", "per version: stored bytes added, put MB/s (median)", head]
    for i, v in enumerate(data.versions):
        row = f"{v.series + '/v' + str(v.number):<15}{v.logical_bytes / MB:>7.1f}"
        for t in tools:
            pv = [r.per_version for r in runs[t]]
            added = pv[0][i].stored_after - (pv[0][i - 1].stored_after if i else 0)
            secs = statistics.median(p[i].ingest_s for p in pv)
            row += f"{added / MB:>12.1f}{v.logical_bytes / MB / secs:>7.0f}"
        lines.append(row)
    return "\n".join(lines)


def report_rss(rows: list[dict[str, float]]) -> str:
    lines = [
        "",
        "cas peak RSS as files grow (one file per store)",
        f"{'file':>10}{'put MB/s':>10}{'put RSS MiB':>13}{'get MB/s':>10}{'get RSS MiB':>13}",
    ]
    for r in rows:
        lines.append(
            f"{human(r['file_bytes']):>10}{r['put_mbs']:>10.1f}{r['put_rss_mib']:>13.1f}"
            f"{r['get_mbs']:>10.1f}{r['get_rss_mib']:>13.1f}"
        )
    return "\n".join(lines)
