"""CUDA code paths (issue 25 item 5): the sparse forward, bf16 autocast, pinned loader batches
and a training run on the device. The "cuda" cases run only where CUDA is present and are
skipped elsewhere; the "cpu" cases of the same checks run everywhere, so the reference side
of each comparison is exercised on every machine.

References: timm's own dense forward with the dropped tokens masked, in float64 on the CPU
(tests/test_sparse.py's masked_dense_features), the fp32 forward for bf16, the CPU loader's
batches for the pinned ones, and the CPU run for the device run.
"""
from __future__ import annotations

import json

import pytest
import torch

from test_sparse import IMG, N, images, masked_dense_features, random_keep, tiny_vit
from test_train import read_metrics, run_cli
from tiny_dataset import make_tiny_dataset

from dynavit.trainer.data import build_loader
from dynavit.trainer.methods.sparse import sparse_forward, sparse_forward_features

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


@pytest.fixture
def exact_cuda_math():
    """TF32 off: cuDNN convolutions (the patch embedding) default to TF32 on Ampere and later,
    whose 10-bit mantissa would hide a real difference behind a loose tolerance."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_forward_on_device_matches_float64_dense_reference(device, exact_cuda_math):
    model = tiny_vit().eval()
    x, keep = images(4), random_keep(4, N // 2)
    with torch.no_grad():
        reference = masked_dense_features(model.double(), x.double(), keep)
        model.float().to(device)
        got = sparse_forward_features(model, x.to(device), keep.to(device))
    assert got.device.type == device and got.dtype == torch.float32
    torch.testing.assert_close(got.cpu().double(), reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_runs_in_bf16_and_stays_near_fp32(device, exact_cuda_math):
    model = tiny_vit().eval().to(device)
    x, keep = images(8).to(device), random_keep(8, N // 4).to(device)
    with torch.no_grad():
        fp32 = sparse_forward(model, x, keep)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            bf16 = sparse_forward(model, x, keep)
    assert bf16.dtype == torch.bfloat16 and fp32.dtype == torch.float32  # autocast engaged
    scale = fp32.abs().max().item()
    assert (bf16.float() - fp32).abs().max().item() <= 0.05 * scale, "bf16 logits far from fp32"
    assert (bf16.float() - fp32).abs().max().item() > 0  # really another precision


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_training_step_gradients_near_fp32(device, exact_cuda_math):
    """One backward under autocast, as the trainer and `dynatrain bench --amp bf16` run it:
    the parameters' gradients (fp32, autocast keeps the weights) point where fp32's do."""
    grads = {}
    for amp in (False, True):
        model = tiny_vit().to(device)
        x, keep = images(8).to(device), random_keep(8, N // 2).to(device)
        y = torch.arange(8, device=device) % 10
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(sparse_forward(model, x, keep), y)
        loss.backward()
        grads[amp] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).float().cpu()
    cosine = torch.nn.functional.cosine_similarity(grads[False], grads[True], dim=0).item()
    assert cosine > 0.98, cosine


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "ds"
    make_tiny_dataset(out, splits=(("train", 32), ("val", 8)), image_size=IMG)
    return out


@needs_cuda
def test_pinned_loader_batches_arrive_on_the_device_unchanged(dataset):
    cpu = build_loader(dataset, "train", k=50, batch_size=8, workers=0)
    pinned = build_loader(dataset, "train", k=50, batch_size=8, workers=2, pin_memory=True, recycle_buffers=True)
    for loader in (cpu, pinned):
        loader.set_epoch(1)
    for a, b in zip(cpu, pinned, strict=True):
        assert b.images.is_pinned() and b.keep_idx.is_pinned() and b.labels.is_pinned()
        moved = b.to(torch.device("cuda"), non_blocking=True)
        torch.cuda.synchronize()
        assert moved.images.is_cuda and moved.keep_idx.is_cuda
        assert torch.equal(moved.images.cpu(), a.images) and torch.equal(moved.keep_idx.cpu(), a.keep_idx)
        assert torch.equal(moved.labels.cpu(), a.labels) and a.keys == b.keys


@needs_cuda
def test_training_on_cuda_matches_cpu(dataset, tmp_path, exact_cuda_math):
    """One epoch with --device cuda (amp off) gives the CPU run's loss; --amp bf16 trains too."""
    kwargs = json.dumps({"img_size": IMG, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 2})
    common = ["--shards", dataset, "--k", 50, "--model", "vit_tiny_patch16_224", "--model-kwargs", kwargs,
              "--batch-size", 8, "--workers", 2, "--epochs", 1, "--lr", "1e-3"]
    losses = {}
    for name, extra in (("cpu", ["--device", "cpu", "--amp", "off"]), ("cuda", ["--device", "cuda", "--amp", "off"]),
                        ("bf16", ["--device", "cuda", "--amp", "bf16"])):
        assert run_cli([*common, *extra, "--out", tmp_path / name]) == 0
        (m,) = read_metrics(tmp_path / name)
        assert m["steps"] == 4
        losses[name] = m["train_loss"]
    assert losses["cuda"] == pytest.approx(losses["cpu"], rel=1e-3)
    assert losses["bf16"] == pytest.approx(losses["cpu"], rel=0.05)


# --- make bench-gpu's plumbing (runs everywhere; the run itself needs a GPU) ---------------------

def test_bench_gpu_commands_parse_and_the_section_is_replaced(tmp_path):
    """The three command lines `make bench-gpu` runs are accepted by the real CLIs (option
    names cannot drift apart), and the doc's marked section is replaced in place."""
    from dynavit.pipeline.cli import main as dynaprep_main
    from dynavit.trainer.cli import cli as dynatrain
    from dynavit.trainer.bench import gpu as bench_gpu

    a = bench_gpu.parse(["--n", "4000"])
    (data := tmp_path / "data").mkdir()
    index, bench, compare = bench_gpu.commands(a, data, tmp_path)
    assert index[index.index("--k") + 1] == "70,50,25" and bench[bench.index("--k") + 1] == "100,70,50,25"
    assert "--amp" in compare and compare[compare.index("--amp") + 1] == "bf16"
    assert index[1] == "index"
    dynaprep_main.commands["index"].make_context("index", index[2:])  # raises on an unknown option or bad value
    if not torch.cuda.is_available():  # --device cuda is refused while parsing where there is none
        _, bench, compare = bench_gpu.commands(bench_gpu.parse(["--n", "4000", "--device", "cpu"]), data, tmp_path)
    dynatrain.commands["bench"].make_context("bench", bench[2:])
    dynatrain.commands["bench-compare"].make_context("bench-compare", compare[2:])
    with pytest.raises(SystemExit):
        bench_gpu.parse(["--n", "100"])  # fewer images than the loader-fed steps read

    doc = tmp_path / "B.md"
    doc.write_text(f"# B\n\nabove\n\n{bench_gpu.BEGIN}\nold\n{bench_gpu.END}\n\nbelow\n")
    bench_gpu.write_section(doc, ["## GPU: new", "figures"])
    assert doc.read_text() == f"# B\n\nabove\n\n{bench_gpu.BEGIN}\n## GPU: new\nfigures\n{bench_gpu.END}\n\nbelow\n"
    # a doc without the markers gets the section appended below the hand-kept line, once
    from dynavit.trainer.bench.report import KEPT
    fresh = tmp_path / "sub" / "C.md"
    bench_gpu.write_section(fresh, ["x"])
    bench_gpu.write_section(fresh, ["y"])
    assert fresh.read_text() == f"\n\n{KEPT}\n\n{bench_gpu.BEGIN}\ny\n{bench_gpu.END}\n"
