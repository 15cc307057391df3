"""`dynatrain report` for `--task segment` runs: mIoU overall and per class.

Reads each run's summary.json (written by trainer/segment/run.py at the end of training) and
writes OUT/segment.md (one row per run: method, K, its parameter, MMACs, best and final mIoU,
pixel accuracy; then the IoU of every class in every run) and OUT/segment.csv (the same per
class, one row per run × class). Numbers are the recorded ones: nothing is re-evaluated.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

__all__ = ["is_segment_run", "segment_report"]


class SegReportError(ValueError):
    pass


def is_segment_run(path) -> bool:
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("task") == "segment"
    except (OSError, ValueError, AttributeError):
        return False


def _load(path: Path) -> dict:
    try:
        s = json.loads((path / "summary.json").read_text())
    except OSError:
        raise SegReportError(f"{path}: no summary.json (the segmentation run has not finished)") from None
    except ValueError as e:
        raise SegReportError(f"{path}: unreadable summary.json ({e})") from None
    if s.get("task") != "segment" or not isinstance(s.get("best"), dict):
        raise SegReportError(f"{path}: summary.json is not a segmentation run's")
    return {"run": path.name, **s}


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def segment_report(runs, out_dir) -> dict:
    """Write segment.md / segment.csv for ``runs``; returns {'rows', 'files'}."""
    rows = [_load(Path(r)) for r in runs]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    classes = rows[0]["classes"]
    lines = ["| run | method | K | parameter | MMACs | best mIoU % | final mIoU % | pixel acc % |",
             "|---|---|--:|---|--:|--:|--:|--:|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['method']}{'' if r.get('preserve', True) else ' (pruned = 0)'} | "
                     f"{r['k']} | {r['method_param']} | {r['macs'] / 1e6:.2f} | {_pct(r['best_miou'])} | "
                     f"{_pct(r['final_miou'])} | {_pct(r['best']['pixel_acc'])} |")
    present = [i for i, _ in enumerate(classes) if any(r["best"]["iou"][i] is not None for r in rows)]
    lines += ["", "IoU % per class (best epoch; classes no run saw or predicted are left out):", "",
              "| run | " + " | ".join(classes[i] for i in present) + " |",
              "|---|" + "--:|" * len(present)]
    for r in rows:
        lines.append(f"| {r['run']} | " + " | ".join(_pct(r["best"]["iou"][i]) for i in present) + " |")
    (out / "segment.md").write_text("\n".join(lines) + "\n")
    with open(out / "segment.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "method", "k", "macs", "class", "iou"])
        for r in rows:
            for i, name in enumerate(classes):
                w.writerow([r["run"], r["method"], r["k"], r["macs"], name,
                            "" if r["best"]["iou"][i] is None else r["best"]["iou"][i]])
    return {"rows": rows, "files": [str(out / "segment.md"), str(out / "segment.csv")]}
