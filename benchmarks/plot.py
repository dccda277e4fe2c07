"""PNG plots of the benchmark results.

    python benchmarks/plot.py [--results-dir benchmarks/results] [--session ID]

serving_throughput.png  aggregate output tokens/s vs concurrent streams, one line per configuration
                        (medians of the runs, min-max as error bars), from serving.jsonl's newest
                        session (or --session).
provision.png           provisioning time vs number of hosts, cold and warm, from the newest run of
                        each fleet size in provision.jsonl (records {"date": str, "hosts": int,
                        "phase": "cold"|"warm", "seconds": float}), when that file exists.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the non-interactive backend
from provision import newest, read_jsonl  # benchmarks/provision.py, beside this file

RESULTS = Path(__file__).resolve().parent / "results"
LABELS = {
    "recipe": "recipe (vLLM defaults)",
    "tuned": "tuned (this project's service)",
    "llamacpp": "llama.cpp llama-server",
}


def spread(values: list[float]) -> tuple[float, float, float]:
    """Median and the distances down to the min and up to the max."""
    med = statistics.median(values)
    return med, med - min(values), max(values) - med


def plot_serving(records: list[dict[str, Any]], session: str | None, out: Path) -> str:
    """Throughput vs concurrency per configuration; returns the session plotted."""
    records = [r for r in records if r.get("benchmark") == "serving"]
    if not records:
        raise SystemExit("no serving records to plot")
    session = session or records[-1]["session"]
    records = [r for r in records if r["session"] == session and "error" not in r]
    if not records:
        raise SystemExit(f"session {session} has no successful serving records")
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name in records[0]["params"]["configs"]:
        runs = [r for r in records if r["config"] == name]
        if not runs:
            continue
        xs = sorted({int(c) for r in runs for c in r["throughput"]})
        points = [spread([r["throughput"][str(x)]["tokens_per_s"] for r in runs]) for x in xs]
        ax.errorbar(
            xs,
            [p[0] for p in points],
            yerr=[[p[1] for p in points], [p[2] for p in points]],
            marker="o",
            capsize=3,
            label=f"{LABELS.get(name, name)}, {len(runs)} run{'s' if len(runs) > 1 else ''}",
        )
    first = records[0]
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({int(c) for r in records for c in r["throughput"]}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("aggregate output tokens/s")
    ax.set_ylim(bottom=0)
    ax.set_title(
        f"{first['model']['name']} on {first['host']['cpu_model']},"
        f" {first['host']['physical_cores']} cores\n"
        f"{first['params']['stream_tokens']} output tokens per stream; median of the runs,"
        " min-max bars",
        fontsize=9,
    )
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return session


def plot_provision(records: list[dict[str, Any]], out: Path) -> str:
    """Provisioning seconds vs hosts, one line per phase, from the newest run of each fleet size
    (as results/provision.md); returns the dates of the runs shown."""
    records = newest(records)
    session = ", ".join(sorted({str(r["date"])[:10] for r in records}))
    by_phase: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        by_phase[str(r["phase"])][int(r["hosts"])].append(float(r["seconds"]))
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for phase in sorted(by_phase):
        xs = sorted(by_phase[phase])
        points = [spread(by_phase[phase][x]) for x in xs]
        ax.errorbar(
            xs,
            [p[0] for p in points],
            yerr=[[p[1] for p in points], [p[2] for p in points]],
            marker="o",
            capsize=3,
            label=f"{phase} site.yml",
        )
    ax.set_xticks(sorted({int(r["hosts"]) for r in records}))
    ax.set_xlabel("hosts")
    ax.set_ylabel("seconds")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Provisioning time vs number of hosts (runs of {session})", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return session


def main(argv: list[str] | None = None) -> int:
    """Write the plots whose data exist."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    ap.add_argument("--session", help="serving session to plot (default: the newest)")
    args = ap.parse_args(argv)
    serving = args.results_dir / "serving.jsonl"
    if serving.is_file():
        out = args.results_dir / "serving_throughput.png"
        session = plot_serving(read_jsonl(serving), args.session, out)
        print(f"wrote {out} (session {session})")
    else:
        print(f"no {serving}: run benchmarks/serving.py first", file=sys.stderr)
    provision = args.results_dir / "provision.jsonl"
    if provision.is_file():
        out = args.results_dir / "provision.png"
        session = plot_provision(read_jsonl(provision), out)
        print(f"wrote {out} (runs of {session})")
    return 0 if serving.is_file() else 1


if __name__ == "__main__":
    sys.exit(main())
