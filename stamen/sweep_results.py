"""What a study writes next to its runs: ``results.csv`` and ``study.json``.

``DIR/results.csv`` has one row per finished run (read back from the runs' own files) and is
rewritten atomically after every point; ``DIR/study.json`` holds the study, its points and
their status (done, failed with the error, pending).
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Any

from stamen.server.results import atomic_write
from stamen.sweep_points import Study, _fmt_value

#: outcome columns of results.csv, in order (optional ones only when some run has them)
OUTCOME_COLUMNS = ("final_test_accuracy", "best_test_accuracy", "total_uplink_bytes", "total_downlink_bytes")
OPTIONAL_COLUMNS = ("epsilon", "delta", "robust_accuracy")
TAIL_COLUMNS = ("rounds", "wall_s", "run_dir")


def results_rows(out_dir: Path, study: Study) -> list[dict[str, Any]]:
    """One row per finished run of the study (read back from the runs' own files)."""
    from stamen.report import read_outcome

    rows = []
    for p in study.runs:
        run_dir = Path(out_dir) / "runs" / p.id
        if not (run_dir / "summary.json").is_file():
            continue
        outcome = read_outcome(run_dir)
        cfg = p.cfg.to_dict()
        row: dict[str, Any] = {"point_id": p.id}
        for key in study.varied_keys:
            section, _, name = key.partition(".")
            row[key] = cfg.get(section, {}).get(name)
        row["seed"] = p.seed
        row.update({k: outcome.get(k) for k in (*OUTCOME_COLUMNS, *OPTIONAL_COLUMNS, "rounds", "wall_s")})
        row["run_dir"] = f"runs/{p.id}"
        rows.append(row)
    return rows


def write_results(out_dir: Path, study: Study) -> Path:
    """``results.csv``: the varied keys, seed, accuracy, bytes, ε/δ and robust accuracy (when
    some run has them), rounds, wall time; written atomically."""
    rows = results_rows(out_dir, study)
    optional = [c for c in OPTIONAL_COLUMNS if any(r.get(c) is not None for r in rows)]
    columns = ["point_id", *study.varied_keys, "seed", *OUTCOME_COLUMNS, *optional, *TAIL_COLUMNS]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for r in rows:
        writer.writerow([_csv_cell(r.get(c)) for c in columns])
    path = Path(out_dir) / "results.csv"
    atomic_write(path, buf.getvalue())
    return path


def _csv_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    return _fmt_value(v)


def _write_study(out: Path, study: Study, engine: str, jobs: int, status: dict[str, str],
                 errors: dict[str, str]) -> None:
    runs = [{"id": p.id, "dir": f"runs/{p.id}", "seed": p.seed, "overrides": dict(p.overrides[:-1]),
             "status": status[p.id], **({"error": errors[p.id]} if p.id in errors else {})} for p in study.runs]
    counts = {s: sum(1 for v in status.values() if v == s) for s in ("done", "failed", "pending")}
    doc = {"format": 1, **study.describe(), "engine": engine, "jobs": jobs, "counts": counts,
           "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "results": "results.csv", "runs": runs}
    atomic_write(out / "study.json", json.dumps(doc, indent=2, default=str) + "\n")
