"""`make bench`: run every benchmark and write docs/BENCHMARKS.md from what they print.

    dynatrain bench-report --out docs/BENCHMARKS.md [--quick]      (= make bench)

Each benchmark runs as its own command (the one shown in the report, so a reader can re-run
it), its output is quoted verbatim, and the targets of the issues are checked against its
JSON. Nothing here is typed in by hand.
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
import click
from dynavit.pipeline.cli_types import renamed
from dynavit.pipeline.cli_types import out_file

BIN = Path(sys.executable).parent


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


KEPT = "<!-- measured by hand below this line: kept by make bench -->"


def write_marked_section(doc: Path, begin: str, end: str, lines: list[str]) -> None:
    """Put `lines` between the markers `begin` and `end` of `doc`, in place (atomically); a
    doc without them gets the section appended below KEPT, which `make bench` keeps."""
    text = doc.read_text() if doc.exists() else ""
    body = "\n".join([begin, *lines, end])
    if begin in text and end in text:
        text = text[:text.index(begin)] + body + text[text.index(end) + len(end):]
    else:
        if KEPT not in text:
            text = text.rstrip() + "\n\n" + KEPT + "\n"
        text = text.rstrip() + "\n\n" + body + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    tmp = doc.with_suffix(doc.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, doc)


class BenchmarkFailed(RuntimeError):
    """A benchmark command exited non-zero; the message has its command and stderr tail."""


def _run(cmd: list[str], log) -> str:
    shown = " ".join(shlex.quote(c) for c in cmd).replace(str(BIN) + "/", "")
    log(f"$ {shown}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise BenchmarkFailed(f"{shown} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    log(f"  ({time.perf_counter() - t0:.0f} s)")
    return shown, proc.stdout.strip()


def _check(ok: bool, text: str) -> str:
    return f"- {'met' if ok else '**missed**'}: {text}"


def write_report(out, work, quick: bool, log=print) -> None:
    """Run the kernel, dynaprep, FLOP and dynatrain benchmarks; write the Markdown report."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    py = str(BIN / "python")
    sections, checks = [], []

    kernels_json = work / "kernels.json"
    cmd, text = _run([py, "-m", "dynavit.pipeline.bench.kernels", "--batch-size", "32" if quick else "256",
                      "--json", str(kernels_json)], log)
    sections.append(("Saliency kernels (µs per 224×224 image)", cmd, text))
    k = json.loads(kernels_json.read_text())
    rows = {r["scorer"]: r for r in k["results"]}
    for scorer, r in rows.items():
        checks.append(_check(r["speedup_vs_numpy"] >= 5, f"{scorer}: Numba {r['speedup_vs_numpy']:.1f}× faster than the NumPy reference (target ≥ 5×)"))
    if "l2" in rows:
        checks.append(_check(rows["l2"]["numba_over_copy"] <= 4, f"l2: {rows['l2']['numba_over_copy']:.2f}× the np.copy floor (target ≤ 4×)"))

    for mix in ("500x375", "mixed"):  # ImageNet's most common size, and photos of 150–900 px
        index_json = work / f"index-{mix}.json"
        cmd, text = _run([py, "-m", "dynavit.pipeline.bench.index", "--n", "400" if quick else "4000", "--mix", mix,
                          "--workers", "1,2", "--repeats", "1" if quick else "3", "--workdir", str(work / "jpegs"),
                          "--json", str(index_json)], log)
        sections.append((f"dynaprep index vs the decode + resize + encode floor ({mix})", cmd, text))
        rows = json.loads(index_json.read_text())
        for r in rows:
            checks.append(_check(r["ratio"] >= 0.9, f"dynaprep ({mix}) at {r['workers']} worker(s): {r['ratio']:.3f}× "
                                 f"the floor, median of {r['repeats']} pairs (CPU time: {r['cpu_ratio']:.3f}×; "
                                 "target ≥ 0.9×)"))
        if len(rows) > 1:
            floor_scaling = rows[-1]["floor_img_s"] / rows[0]["floor_img_s"]  # what this machine allows
            checks.append(_check(rows[-1]["scaling"] >= 1.8, f"dynaprep ({mix}) 1 → {rows[-1]['workers']} workers: "
                                 f"{rows[-1]['scaling']:.2f}× (the floor: {floor_scaling:.2f}×; target ≥ 1.8×)"))

    flops_json = work / "flops.json"
    cmd, text = _run([str(BIN / "dynatrain"), "flops", "--model", "vit_base_patch16_224",
                      "--k", "100,90,70,60,50,30,25", "--json", str(flops_json)], log)
    sections.append(("Exact MACs of the sparse forward (ViT-B/16)", cmd, text))

    data = work / "demo224"
    if not (data / "dataset.json").exists():
        _run([str(BIN / "dynaprep"), "index", "--data", "demo", "-o", f"n_train={256 if quick else 1024}", "-o", "n_val=64",
              "--k", "70,50,25", "--scorer", "l2", "--shard-size", "128", "--out", str(data), "--overwrite",
              "--no-progress"], log)
    bench_json = work / "train.json"
    cmd, text = _run([str(BIN / "dynatrain"), "bench", "--shards", str(data), "--model", "vit_tiny_patch16_224",
                      "--k", "100,70,50,25", "--batch-size", "32", "--steps", "2" if quick else "4", "--repeats", "3",
                      "--workers", "1,2", "--json", str(bench_json)], log)
    sections.append(("dynatrain: train step, inference and the loader (ViT-Ti/16 at 224)", cmd, text))
    b = json.loads(bench_json.read_text())
    for r in b["train_step"]:
        if r["K"] not in ("dense", 100):
            checks.append(_check(r["efficiency"] >= 0.9, f"train step K={r['K']}: {r['speedup']:.2f}× measured vs {r['ideal_speedup']:.2f}× ideal = {r['efficiency']:.2f} of ideal (target ≥ 0.9)"))
    for r in b["loader"]:
        checks.append(_check(r["ratio"] >= 0.75, f"loader with {r['workers']} worker(s): {r['ratio']:.2f}× the bare decode floor (target ≥ 0.75×)"))

    _write_markdown(out, quick, sections, checks)


def _write_markdown(out, quick: bool, sections: list, checks: list) -> None:
    """docs/BENCHMARKS.md: the targets met or missed, then each section's command and output;
    what sits below KEPT in the old file is kept."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    head = [
        "# Benchmarks",
        "",
        f"Written by `make bench` (`dynatrain bench-report{' --quick' if quick else ''}`) on "
        f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.",
        "",
        f"Machine: {os.cpu_count()} CPUs ({_cpu_model()}), {gpu or 'no GPU'}, Python {platform.python_version()}, "
        f"torch {torch.__version__}. The CPUs are shared and noisy: every figure that matters is a ratio "
        "measured side by side in one run.",
        "",
        "## Targets",
        "",
        *checks,
    ]
    body = []
    for title, cmd, text in sections:
        body += ["", f"## {title}", "", "```", f"$ {cmd}", text, "```"]
    # Measurements that this script cannot redo (a before/after of code that is gone, GPU
    # runs) live below KEPT in the same file and survive a re-run.
    old = Path(out).read_text() if Path(out).exists() else ""
    if KEPT in old:
        body += ["", old[old.index(KEPT):].rstrip()]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkstemp(dir=Path(out).parent, suffix=".md.tmp")[1])
    tmp.write_text("\n".join(head + body) + "\n")
    os.replace(tmp, out)


@click.command("bench-report", short_help="Run every benchmark; write BENCHMARKS.md.")
@renamed("--work", "--workdir", "workdir", type=click.Path(file_okay=False))
@click.option("--out", default="docs/BENCHMARKS.md", show_default=True, type=click.Path(dir_okay=False),
              callback=out_file)
@click.option("--workdir", default="out/bench", show_default=True, type=click.Path(file_okay=False),
              help="Where benchmark data is generated (kept between runs).")
@click.option("--quick", is_flag=True, help="Smaller sizes (a smoke run, not figures to publish).")
def bench_report_command(out, workdir, quick):
    """Run the kernel, dynaprep, FLOP and dynatrain benchmarks; write the Markdown report (`make bench`)."""
    try:
        write_report(out, workdir, quick, log=lambda m: click.echo(m, err=True))
    except BenchmarkFailed as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    bench_report_command()
