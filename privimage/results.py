"""``privimage report <runs...>``: finished runs gathered into one results table.

Reads, per run directory (any folder holding ``evaluate/metrics.json``; folders given
are searched, so a multirun sweep's root will do): ``config.yaml`` (the method, read
from the settings that define it, the preset name, data), ``evaluate/metrics.json``
(fidelity, utility, leakage), ``privacy.json`` (target and spent ε, δ) and
``timings.jsonl`` (wall seconds per stage). Writes to ``--out``: ``results.csv``,
``results.md`` and, when any run spent ε, ``fid_vs_epsilon.png`` and
``accuracy_vs_epsilon.png`` with one line per method (runs without differential privacy
drawn as dashed horizontal lines, for reference).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import yaml

from privimage.config.schema import method_of
from privimage.errors import DataError
from privimage.io import artifacts
from privimage.io.artifacts import (
    AUDIT_RESULT,
    AUDIT_STAGE,
    load_evaluation,
    privacy_status,
    read_done_json,
    read_ledger,
)
from privimage.io.atomic import write_text

METRICS = Path("evaluate") / artifacts.METRICS
RESULTS_CSV, RESULTS_MD = "results.csv", "results.md"

# (column, header in results.md, digits); the CSV keeps full precision.
COLUMNS = [
    ("method", "method", None),
    ("name", "preset", None),
    ("data", "data", None),
    ("differentially_private", "DP", None),
    ("target_epsilon", "target ε", 2),
    ("epsilon_spent", "ε spent", 3),
    ("delta", "δ", None),
    ("fid", "FID", 1),
    ("precision", "precision", 3),
    ("recall", "recall", 3),
    ("accuracy", "accuracy", 3),
    ("real_data_accuracy", "accuracy on as many real", 3),
    ("near_copies", "near-copies", None),
    ("pixel_l2_median", "L2 to nearest", 2),
    ("heldout_pixel_l2_median", "held-out L2 to nearest", 2),
    ("mia_auc", "MIA AUC (cnn)", 3),
    # The one-run audit (privimage.stages.audit), when the run has one: its own small
    # claim and the lower bound measured against it.
    ("audit_claim", "audit: claimed ε", 2),
    ("audit_bound", "audit: measured ε ≥", 3),
    ("seconds", "wall s", 0),
    ("run", "run", None),
]


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run directories with a finished evaluation under (or at) each path, sorted."""
    runs: set[Path] = set()
    for p in map(Path, paths):
        if not p.exists():
            raise DataError(f"{p} does not exist; pass run directories or a sweep's folder")
        if (p / METRICS).exists():
            runs.add(p)
        runs.update(m.parent.parent for m in p.rglob(str(METRICS)))
    if not runs:
        raise DataError(
            f"no evaluate/metrics.json under {[str(p) for p in paths]}; run the evaluate "
            "stage first (stages=[...,evaluate])"
        )
    return sorted(runs)


def _get(d: dict, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def read_timings(run_dir: Path) -> list[dict]:
    """The run's ``timings.jsonl`` records (stage, seconds, and for a shared stage how and
    key), oldest first; empty when the run has none."""
    timings = run_dir / artifacts.TIMINGS
    if not timings.exists():
        return []
    return [json.loads(line) for line in timings.read_text().splitlines()]


def run_row(run_dir: Path) -> dict:
    """One row of the table from one run directory's files."""
    ev = load_evaluation(run_dir)
    if ev is None:
        raise DataError(f"{run_dir} has no {METRICS}; run the evaluate stage first")
    cfg_file = run_dir / artifacts.RUN_CONFIG
    cfg = yaml.safe_load(cfg_file.read_text()) if cfg_file.exists() else {}
    ledger = read_ledger(run_dir)
    # The last record of a stage is the attempt that finished it; the audit is no part of
    # making the synthetic data.
    seconds = {t["stage"]: t["seconds"] for t in read_timings(run_dir) if t["stage"] != AUDIT_STAGE}
    audit = read_done_json(run_dir, AUDIT_STAGE, AUDIT_RESULT) or {}
    # Unknown (None) for images scored from elsewhere, which have no ledger.
    status = privacy_status(ledger)
    private = None if status == "unknown" else status != "none"
    return {
        "method": method_of(cfg) or run_dir.name,
        "name": cfg.get("name"),
        "data": _get(cfg, "data", "source"),
        "differentially_private": private,
        "target_epsilon": ledger.get("target_epsilon") if private else None,
        "epsilon_spent": ledger.get("epsilon_spent") if private else None,
        "delta": ledger.get("delta") if private else None,
        "fid": ev.fid,
        "precision": ev.precision,
        "recall": ev.recall,
        "accuracy": ev.downstream_accuracy,
        "real_data_accuracy": ev.utility.get("mean_real_data_test_accuracy"),
        "near_copies": _get(ev.leakage, "near_copies", "synthetic_count"),
        "pixel_l2_median": _get(ev.leakage, "nearest_neighbour", "pixel_l2", "synthetic", "median"),
        "heldout_pixel_l2_median": _get(
            ev.leakage, "nearest_neighbour", "pixel_l2", "heldout_real", "median"
        ),
        "mia_auc": _get(ev.leakage, "membership_inference", "cnn", "auc"),
        "audit_claim": audit.get("claimed_epsilon"),
        "audit_bound": audit.get("lower_bound"),
        "seconds": round(sum(seconds.values()), 1) if seconds else None,
        "run": str(run_dir),
    }


def _cell(value, digits) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if digits is not None and isinstance(value, int | float):
        return f"{value:.{digits}f}"
    return str(value)


def render_markdown(rows: list[dict]) -> str:
    lines = [
        "| " + " | ".join(h for _, h, _ in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r[c], d) for c, _, d in COLUMNS) + " |")
    return "# Results\n\n" + "\n".join(lines) + "\n"


def _plot(rows: list[dict], key: str, label: str, path: Path) -> None:
    """One panel per dataset; one line per method over ε spent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["data"] or "?" for r in rows})
    methods = sorted({r["method"] for r in rows})  # one colour per method across panels
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 3.8), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        for i, method in enumerate(methods):
            mine = [r for r in rows if r["method"] == method and (r["data"] or "?") == dataset]
            pts = sorted(
                (r["epsilon_spent"], r[key])
                for r in mine
                if r["epsilon_spent"] is not None and r[key] is not None
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", color=f"C{i}", label=method)
            for r in mine:  # no ε: a reference level, not a point on the axis
                if r["epsilon_spent"] is None and r[key] is not None:
                    ax.axhline(r[key], color=f"C{i}", linestyle="--", label=f"{method} (no DP)")
        ax.set_title(dataset)
        ax.set_xlabel("ε spent")
        ax.set_ylabel(label)
        ax.ticklabel_format(axis="x", useOffset=False)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(rows: list[dict], out: Path) -> list[Path]:
    """Write the table (CSV and markdown) and, when any run spent ε, the two plots."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / RESULTS_CSV).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[c for c, _, _ in COLUMNS])
        writer.writeheader()
        writer.writerows(rows)
    write_text(out / RESULTS_MD, render_markdown(rows))
    written = [out / RESULTS_CSV, out / RESULTS_MD]
    if any(r["epsilon_spent"] is not None for r in rows):
        for key, label, name in (
            ("fid", "FID (lower is better)", "fid_vs_epsilon.png"),
            ("accuracy", "accuracy, trained on synthetic", "accuracy_vs_epsilon.png"),
        ):
            _plot(rows, key, label, out / name)
            written.append(out / name)
    return written


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="privimage report", description="Gather finished runs into one results table."
    )
    parser.add_argument("runs", nargs="+", help="run directories, or folders holding them")
    parser.add_argument("--out", default="results", help="output folder (default: results)")
    args = parser.parse_args(argv)
    rows = [run_row(r) for r in find_runs(args.runs)]
    rows.sort(key=lambda r: (r["method"], r["data"] or "", r["epsilon_spent"] or 0.0))
    for path in write_results(rows, Path(args.out)):
        print(f"privimage report: wrote {path}")
    print(render_markdown(rows))
    return 0
