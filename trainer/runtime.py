"""Where and how a run executes: device, mixed precision, RNG state, torch.distributed, and
the one function that puts a batch on the device (train, eval, report and bench use it)."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from dynavit.trainer.data import Batch, normalize

AMP_MODES = ("auto", "bf16", "fp16", "off")
DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype, or None for full fp32. `auto` = bf16 on GPUs that have it, else off
    (CPU bf16 autocast is correct but rarely faster)."""
    if mode == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[mode]


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)


def to_device(batch: Batch, device: torch.device, mean, std) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(normalised float images, keep_idx, labels) on `device`. uint8 crosses the bus (4×
    fewer bytes than float) and is normalised there (timm's PrefetchLoader idea)."""
    images = normalize(batch.images.to(device, non_blocking=True), mean, std)
    keep_idx = None if batch.keep_idx is None else batch.keep_idx.to(device, non_blocking=True)
    return images, keep_idx, batch.labels.to(device, non_blocking=True)


# --- RNG ---------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain lists: loadable with torch.load(weights_only=True)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def cpu(value):
    """RNG states gathered from other ranks may sit on their devices; checkpoints keep CPU tensors."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, list):
        return [cpu(v) for v in value]
    if isinstance(value, dict):
        return {k: cpu(v) for k, v in value.items()}
    return value


# --- distributed -------------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(t)
        return t

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def gather_rng(self) -> list[dict]:
        """Every rank's RNG state (each resumes its own stream)."""
        if self.world_size == 1:
            return [cpu(rng_state())]
        states = [None] * self.world_size
        dist.all_gather_object(states, rng_state())
        return [cpu(s) for s in states]


def init_distributed(device_name: str) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; without them this is a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device = resolve_device(device_name if device_name in DEVICES else "auto")
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if world_size > 1 else 0
    return Dist(rank=rank, world_size=world_size, device=device)
