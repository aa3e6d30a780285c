"""Distributed training checkpoints: written atomically, resumed exactly.

A checkpoint is a folder output_dir/step_00000012 holding
    .metadata, __*_*.distcp   torch.distributed.checkpoint of {"model", "optim"}: every rank writes its
                              own shards; any world size can load them (resharding on load)
    rank00000.pt ...          per rank: LR schedule, data loader position, step, RNG states
    train_config.toml         the run's configuration
    COMPLETE                  written last
It is written under a temporary name (.step_00000012.tmp), the marker goes in last, and only then is
the folder renamed into place; resume takes the newest folder that has the marker, so a run killed
while saving never resumes from a half-written checkpoint. The last `keep_last` are kept.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from skyt1.config import ConfigError, TrainConfig, load_train_config

MARKER = "COMPLETE"
CONFIG_FILE = "train_config.toml"
_NAME = re.compile(r"^step_(\d{8})$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in output_dir, oldest first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = []
    for d in out.iterdir():
        m = _NAME.match(d.name)
        if m and d.is_dir() and (d / MARKER).is_file():
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def saved_config(ckpt: str | Path) -> TrainConfig:
    path = Path(ckpt) / CONFIG_FILE
    try:
        return load_train_config(path)
    except ConfigError as e:
        raise ConfigError(f"{ckpt}: its saved configuration cannot be read ({e})") from None


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _fsync_write(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(output_dir: str | Path, step: int, model, optimizer, scheduler, loader, cfg: TrainConfig,
                    rank: int, world_size: int, device: torch.device) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint folder."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    out = Path(output_dir)
    final = out / checkpoint_name(step)
    tmp = out / f".{checkpoint_name(step)}.tmp"
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a run killed while saving
        tmp.mkdir(parents=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    extra = {"step": step, "world_size": world_size, "scheduler": scheduler.state_dict(),
             "loader": loader.state_dict(), "rng": _rng_state(device)}
    torch.save(extra, tmp / f"rank{rank:05d}.pt")
    dist.barrier()  # every rank's files are on disk
    if rank == 0:
        _fsync_write(tmp / CONFIG_FILE, cfg.to_toml())
        _fsync_write(tmp / MARKER, json.dumps({"step": step, "world_size": world_size}) + "\n")
        if final.exists():  # a checkpoint of the same step from an earlier attempt of this run
            shutil.rmtree(final)
        os.rename(tmp, final)
        fd = os.open(out, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself is durable
        finally:
            os.close(fd)
        for old in list_checkpoints(out)[:-cfg.train.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(ckpt: str | Path, model, optimizer, scheduler, loader, rank: int, device: torch.device) -> int:
    """Collective. Restores model, optimizer, schedule, loader position and RNG; returns the step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    ckpt = Path(ckpt)
    if not is_checkpoint(ckpt):
        raise ConfigError(f"{ckpt}: not a complete checkpoint (no {MARKER} marker)")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(ckpt))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    # The schedule and the data position are the same on every rank: take rank 0's. RNG is per rank,
    # when the world size is unchanged.
    common = torch.load(ckpt / "rank00000.pt", weights_only=False)
    scheduler.load_state_dict(common["scheduler"])
    loader.load_state_dict(common["loader"])
    own = ckpt / f"rank{rank:05d}.pt"
    if own.is_file() and common["world_size"] == dist.get_world_size():
        _set_rng_state(torch.load(own, weights_only=False)["rng"], device)
    return int(common["step"])
