"""`make bench-gpu`: the one-command GPU run (issue 25 item 5), written into docs/BENCHMARKS.md.

    python -m dynavit.trainer.bench.gpu [--device cuda] [--amp bf16] [--model vit_base_patch16_224]
        [--n 4000] [--image-size 224] [--k 100,70,50,25] [--doc docs/BENCHMARKS.md]

1. `dynaprep index --data demo`: --n generated images at --image-size px, K = the --k values below 100;
2. `dynatrain bench`: train step and inference images/s per K against dense with the ideal
   speed-ups, the loader against the decode floor, and train steps fed by the real loader
   (pinned batches, non-blocking copies, autocast);
3. `dynatrain bench-compare`: Dyna-ViT, ToMe, EViT, DynamicViT, TNT and Token Cropr at
   each K's exact MACs, inference images/s;
4. the commands, their outputs, the device and the time of each phase replace the section
   between BEGIN and END of --doc (appended below the kept-by-make-bench line if absent).

On a CPU (--device cpu, for a dry run of the plumbing with a tiny model) the section says so
in its title: such figures are not GPU figures. Meant to take under 8 minutes on one H100.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BEGIN = "<!-- bench_gpu: begin (make bench-gpu writes this section) -->"
END = "<!-- bench_gpu: end -->"


def _run(cmd: list[str], log: list) -> str:
    """Run one phase, echo and keep its output; a failed phase stops the run (exit 1)."""
    shown = " ".join(_quote(c) for c in cmd)
    print(f"$ {shown}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - t0
    print(proc.stdout, end="", flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench-gpu: `{shown}` failed (exit {proc.returncode}); nothing written")
    log.append({"cmd": shown, "seconds": seconds, "output": proc.stdout.rstrip()})
    return proc.stdout


def _quote(arg: str) -> str:
    return arg if arg and all(c.isalnum() or c in "-_=.,/:" for c in arg) else "'" + arg.replace("'", "'\\''") + "'"


def device_line(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        return (f"{props.name} ({props.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, CUDA "
                f"{torch.version.cuda}, {os.cpu_count()} CPUs")
    return f"CPU only ({os.cpu_count()} CPUs), torch {torch.__version__}"


def commands(a: argparse.Namespace, data: Path, out: Path) -> list[list[str]]:
    """The three phases as command lines (the console scripts of this venv)."""
    bindir = Path(sys.executable).parent
    sparse_ks = ",".join(k for k in a.k.split(",") if k.strip() != "100")
    return [
        [str(bindir / "dynaprep"), "index", "--data", "demo", "-o", f"n_train={a.n}", "-o", "n_val=64",
         "--image-size", str(a.image_size), "--k", sparse_ks, "--scorer", "l2", "--shard-size", "500",
         "--workers", str(a.index_workers), "--out", str(data), "--no-progress"],
        [str(bindir / "dynatrain"), "bench", "--shards", str(data), "--model", a.model, "--model-kwargs",
         a.model_kwargs, "--k", a.k, "--batch-size", str(a.batch_size), "--steps", str(a.steps), "--repeats", str(a.repeats),
         "--amp", a.amp, "--device", a.device, "--workers", a.workers, "--json", str(out / "bench.json")],
        [str(bindir / "dynatrain"), "bench-compare", "--model", a.model, "--model-kwargs", a.compare_kwargs,
         "--k", sparse_ks, "--batch-size", str(a.batch_size), "--steps", str(a.steps), "--repeats", str(a.repeats),
         "--amp", a.amp, "--device", a.device, "--ref-model", "", "--json", str(out / "compare.json")],
    ]


def section(a: argparse.Namespace, log: list, total: float) -> list[str]:
    gpu = a.device.startswith("cuda")
    title = (f"## GPU: {a.model} {a.amp} at K={a.k.replace(',', '/')} (make bench-gpu)" if gpu else
             f"## GPU section, DRY RUN on CPU: {a.model} {a.amp} at K={a.k.replace(',', '/')} "
             f"(make bench-gpu BENCH_GPU_DEVICE=cpu; not GPU figures)")
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    phases = ", ".join(f"{name} {r['seconds']:.0f} s" for name, r in zip(("index", "bench", "bench-compare"), log))
    lines = [title, "", f"{when}, {device_line(a.device)}; {total / 60:.1f} min in all ({phases}).",
             "", "`dynatrain bench`: the first two tables time the model alone on a random batch (dense = timm's "
             "forward); the last one is train steps fed by the loader, pinned batches copied non-blocking.", ""]
    for r in log:
        lines += ["```", f"$ {r['cmd']}", r["output"][-6000:], "```", ""]
    return lines[:-1]


def write_section(doc: Path, lines: list[str]) -> None:
    from dynavit.trainer.bench.report import write_marked_section

    write_marked_section(doc, BEGIN, END, lines)


def parse(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dynavit.trainer.bench.gpu", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (the run) or cpu (a dry run)")
    p.add_argument("--amp", default="bf16", choices=["off", "bf16"])
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--model-kwargs", default="{}", help="JSON; the model's img_size follows --image-size")
    p.add_argument("--n", type=int, default=4000, help="demo training images to index")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--k", default="100,70,50,25")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", default=None, help="loader worker counts (default: half the CPUs, all of them)")
    p.add_argument("--index-workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", default="out/bench-gpu")
    p.add_argument("--doc", default="docs/BENCHMARKS.md")
    a = p.parse_args(argv)
    try:
        kwargs = json.loads(a.model_kwargs)
        assert isinstance(kwargs, dict)
    except (ValueError, AssertionError):
        p.error(f"--model-kwargs must be a JSON object, got {a.model_kwargs!r}")
    a.compare_kwargs = json.dumps({**kwargs, "img_size": a.image_size})  # bench takes the size from the dataset
    cpus = os.cpu_count() or 1
    a.workers = a.workers or ",".join(str(w) for w in sorted({max(1, cpus // 2), cpus}))
    if a.n < (2 * a.steps + 1) * a.batch_size:
        p.error(f"--n {a.n} is fewer than the {(2 * a.steps + 1) * a.batch_size} images the loader-fed steps read "
                f"((2 x --steps + 1) x --batch-size)")
    if not set(a.k.split(",")) - {"100"}:
        p.error("--k needs a value below 100")
    return a


def main(argv=None) -> int:
    a = parse(argv)
    import torch

    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench-gpu: no CUDA device here; `make bench-gpu BENCH_GPU_DEVICE=cpu ...` dry-runs the plumbing "
              "on a tiny model (see the Makefile)", file=sys.stderr)
        return 2
    out = Path(a.out)
    data = out / "data"
    if data.exists():  # a previous run's dataset: indexed again, so the figures are this run's
        import shutil

        shutil.rmtree(data)
    out.mkdir(parents=True, exist_ok=True)
    log: list = []
    t0 = time.perf_counter()
    for cmd in commands(a, data, out):
        _run(cmd, log)
    total = time.perf_counter() - t0
    write_section(Path(a.doc), section(a, log, total))
    print(f"bench-gpu: {total / 60:.1f} min; wrote the section of {a.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
