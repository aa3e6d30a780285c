"""Distributed training checkpoints: written atomically, verified before trusted, resumed exactly.

A checkpoint is a folder output_dir/step_00000012 holding
    .metadata, __*_*.distcp   torch.distributed.checkpoint of {"model", "optim"}: every rank writes its
                              own shards; any world size can load them (resharding on load)
    rank00000.pt ...          per rank: LR schedule, data loader position, step, RNG states
    train_config.toml         the run's configuration
    MANIFEST.json             every file above with its size and CRC-32, the model shape and the
                              environment that bit-exactness depends on (torch threads, device, world size)
    COMPLETE                  written last
It is written under a temporary name unique to the writing run (.step_00000012.tmp-<pid>-<hex>), the
manifest and the marker go in last, and only then is the folder renamed into place (the one step two
runs sharing a folder have in common); resume takes the newest folder that has the marker and whose
files match its manifest, so neither a run killed while saving nor a file damaged afterwards is ever
resumed from. The last `keep_last` are kept, older ones deleted only after the new one is in place.

Checkpoints written before manifests existed have none: they are accepted with a warning (their files
are checked for presence only), since refusing them would strand every older run.
"""
from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import uuid
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from skyt1.checkpoint import CheckpointError
from skyt1.config import ConfigError, ModelConfig, TrainConfig, load_train_config

MARKER = "COMPLETE"
CONFIG_FILE = "train_config.toml"
MANIFEST = "MANIFEST.json"
MANIFEST_VERSION = 1
_NAME = re.compile(r"^step_(\d{8})$")
_TEMP = re.compile(r"^\.step_\d{8}\.tmp(?:-(\d+)-[0-9a-f]+)?$")  # old fixed name, or unique per run
_OWNER = re.compile(r"^(?:__(\d+)_\d+\.distcp|rank(\d+)\.pt)$")  # the rank that wrote a file
# Fields that give tensors their shapes: a checkpoint differing in one cannot be loaded into this model.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "tie_word_embeddings", "attention_bias")
_CHUNK = 1 << 22


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


# ------------------------------------------------------------------------------------------------
# the manifest: sizes and checksums, and what bit-exact resume depends on
# ------------------------------------------------------------------------------------------------
def file_crc32(path: Path) -> int:
    """CRC-32 of a file: ~5 GiB/s on one core (zlib), so checking costs about as much as reading."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def run_environment(device: torch.device, world_size: int) -> dict[str, Any]:
    """What a bit-exact continuation needs to be the same: CPU kernels split work by thread count, so
    1 and 2 threads differ in the last bits; the device kind and the world size change reduction orders."""
    kind = device.type
    if kind == "cuda":
        kind = f"cuda:{torch.cuda.get_device_name(device)}"
    return {"torch_threads": torch.get_num_threads(), "device": kind, "world_size": world_size,
            "torch": torch.__version__}


def environment_warnings(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """A line per difference between the environment a checkpoint was written in and this one."""
    what = {"torch_threads": "torch threads", "device": "device", "world_size": "world size", "torch": "torch"}
    return [f"{label}: {saved[k]!r} when saved, {now[k]!r} now" for k, label in what.items()
            if k in saved and k in now and saved[k] != now[k]]


def read_manifest(ckpt: str | Path) -> dict | None:
    """The manifest, None for a checkpoint written before manifests; CheckpointError when unreadable."""
    path = Path(ckpt) / MANIFEST
    if not path.is_file():
        return None
    try:
        man = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(man, dict) or not isinstance(man.get("files"), dict):
            raise ValueError("no 'files' table")
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable manifest ({e})") from None
    return man


@dataclass
class Verdict:
    """What verify_checkpoint found: `problems` names each damaged file; empty means intact."""
    path: Path
    problems: list[str] = field(default_factory=list)
    manifest: dict | None = None
    checked_bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def legacy(self) -> bool:
        return self.ok and self.manifest is None

    def summary(self) -> str:
        if self.problems:
            more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
            return self.problems[0] + more
        if self.manifest is None:
            return (f"{self.path}: no {MANIFEST} (written by an older skyt1): only the presence of its files "
                    "was checked")
        return f"{self.path}: intact ({len(self.manifest['files'])} files, {self.checked_bytes / 2**20:,.1f} MiB)"


def verify_checkpoint(ckpt: str | Path, deep: bool = True,
                      select: Callable[[int, str], bool] | None = None) -> Verdict:
    """Check a checkpoint against its manifest: every file present with its size, and (deep) its CRC-32.
    select(i, name) limits the checksums to some files (ranks share the reading); sizes are always all
    checked."""
    ckpt = Path(ckpt)
    v = Verdict(ckpt)
    if not ckpt.is_dir():
        v.problems.append(f"{ckpt}: no such folder")
        return v
    if not (ckpt / MARKER).is_file():
        v.problems.append(f"{ckpt}/{MARKER}: missing (the save did not complete)")
        return v
    try:
        v.manifest = read_manifest(ckpt)
    except CheckpointError as e:
        v.problems.append(str(e))
        return v
    if v.manifest is None:
        for name in (".metadata", "rank00000.pt", CONFIG_FILE):
            if not (ckpt / name).is_file():
                v.problems.append(f"{ckpt}/{name}: missing")
        return v
    for i, (name, want) in enumerate(sorted(v.manifest["files"].items())):
        path = ckpt / name
        if not path.is_file():
            v.problems.append(f"{path}: missing (the manifest lists {want['bytes']:,} bytes)")
            continue
        size = path.stat().st_size
        if size != want["bytes"]:
            v.problems.append(f"{path}: {size:,} bytes, the manifest says {want['bytes']:,} (truncated or "
                              "overwritten)")
            continue
        if deep and (select is None or select(i, name)):
            crc = file_crc32(path)
            v.checked_bytes += size
            if crc != want["crc32"]:
                v.problems.append(f"{path}: checksum {crc:08x}, the manifest says {want['crc32']:08x} (corrupted)")
    return v


def verify_distributed(ckpt: Path, rank: int, world_size: int) -> Verdict:
    """Collective: each rank checksums every world_size-th file; all ranks get the same verdict."""
    v = verify_checkpoint(ckpt, deep=True, select=lambda i, _name: i % world_size == rank)
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, v.problems)
    problems = sorted({p for ps in gathered for p in ps})
    return Verdict(ckpt, problems, v.manifest, v.checked_bytes)


def checkpoint_model_shape(ckpt: Path) -> dict[str, Any] | None:
    """The model shape a checkpoint holds: from its manifest, else from its saved configuration."""
    try:
        man = read_manifest(ckpt)
    except CheckpointError:
        man = None
    if man is not None and "model" in man:
        return {k: man["model"].get(k) for k in SHAPE_FIELDS}
    try:
        from skyt1.train import resolve_model_config
        mcfg = resolve_model_config(saved_config(ckpt), need_path=False)
    except (ConfigError, CheckpointError, OSError, ImportError):
        return None
    return {k: getattr(mcfg, k) for k in SHAPE_FIELDS} if mcfg is not None else None


def shape_differences(ckpt: Path, mcfg: ModelConfig) -> list[str] | None:
    """How the checkpoint's model shape differs from mcfg ([] when equal, None when unknown)."""
    theirs = checkpoint_model_shape(ckpt)
    if theirs is None:
        return None
    return [f"{k}: {getattr(mcfg, k)!r} here vs {theirs[k]!r} in the checkpoint" for k in SHAPE_FIELDS
            if theirs.get(k) != getattr(mcfg, k)]


# ------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Temporary checkpoint folders of runs that were killed while saving: their pid is gone from this
    host (rank 0 of the run that wrote one made it, so a live run on this host is never disturbed); the
    old fixed-name ones carry no pid and only ever belonged to one run per folder."""
    removed = []
    if not out.is_dir():
        return removed
    for d in out.iterdir():
        m = _TEMP.match(d.name)
        if m and d.is_dir() and (m.group(1) is None or not _pid_alive(int(m.group(1)))):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _local_state_bytes(*state_dicts) -> int:
    """Bytes of the tensors this rank holds in the state dicts (its shards for DTensors)."""
    total = 0

    def walk(obj):
        nonlocal total
        if isinstance(obj, torch.Tensor):
            t = obj.to_local() if hasattr(obj, "to_local") else obj
            total += t.numel() * t.element_size()
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)
    for sd in state_dicts:
        walk(sd)
    return total


def _errnos(e: BaseException) -> set[int]:
    """Every errno in an exception, its causes and (for DCP's CheckpointException) each rank's failure."""
    found, seen, todo = set(), set(), [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno is not None:
            found.add(x.errno)
        todo += [x.__cause__, x.__context__]
        failures = getattr(x, "failures", None)
        if isinstance(failures, dict):
            for f in failures.values():
                todo.append(f[0] if isinstance(f, tuple) else f)
    return found


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def estimate_checkpoint_bytes(previous: Path | None, state_bytes: float) -> int:
    """The previous checkpoint is the best estimate of the next one's size; the first is estimated from
    the tensors plus DCP's and the rank files' overhead."""
    return folder_bytes(previous) if previous is not None else int(state_bytes * 1.02) + 2**20


def disk_full_message(what: str, folder: Path, needed: int, free: int, previous: Path | None,
                      started: bool = True) -> str:
    prev = _previous_words(previous) + (" (resume from it after freeing space)" if previous else "")
    done = "the partial save was removed" if started else "nothing was written"
    return f"{what}: the disk is full: it needs ~{_mib(needed)} and {_mib(free)} is free in {folder}; {done}, {prev}"


def os_error_reason(codes: set[int] | int | None) -> str | None:
    """Words for the file-system faults an operator causes; None for any other errno."""
    codes = {codes} if isinstance(codes, int) else (codes or set())
    if codes & {errno.ENOSPC, errno.EDQUOT}:
        return "the disk is full"
    if errno.EROFS in codes:
        return "a read-only file system"
    if codes & {errno.EACCES, errno.EPERM}:
        return "permission denied"
    return None


def describe_os_error(e: OSError, action: str) -> str:
    """One line for an operator's file-system fault (full disk, read-only, no permission)."""
    where = e.filename or "?"
    reason = os_error_reason(e.errno)
    if reason == "the disk is full":
        free = _free_bytes(Path(where)) if e.filename else None
        return (f"{action}: {where}: the disk is full" + (f" ({_mib(free)} free)" if free is not None else "")
                + "; free some space and run again")
    if reason:
        return f"{action}: {where}: cannot write there ({reason}); choose a writable folder"
    return f"{action}: {where}: {e.strerror or e}"


def _free_bytes(path: Path) -> int | None:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def check_writable(folder: Path, key: str) -> None:
    """Refuse an output folder this process cannot create files in (read-only mount, no permission);
    probes by creating a file, since os.access says yes to root on a read-only mount."""
    probe_dir = folder
    while not probe_dir.exists():
        if probe_dir == probe_dir.parent:
            break
        probe_dir = probe_dir.parent
    probe = probe_dir / f".skyt1-write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        reason = os_error_reason(e.errno) or e.strerror or str(e)
        raise ConfigError(f"{key} = {str(folder)!r}: cannot create files in {probe_dir} ({reason}); choose a "
                          "writable folder") from None


def _agree(message: str | None, world_size: int) -> str | None:
    """Collective: the first rank's error message, so every rank raises the same one (or none)."""
    if world_size == 1:
        return message
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, message)
    return next((m for m in gathered if m), None)


def save_checkpoint(output_dir: str | Path, step: int, model, optimizer, scheduler, loader, cfg: TrainConfig,
                    rank: int, world_size: int, device: torch.device,
                    model_config: ModelConfig | None = None) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint folder. Raises CheckpointError on every
    rank when the save fails (full disk, unwritable folder): the partial save is removed and the previous
    checkpoints are left as they were."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException: named here
    from torch.distributed.checkpoint.state_dict import get_state_dict

    out = Path(output_dir)
    final = out / checkpoint_name(step)
    what = f"saving checkpoint {final}"
    previous = (list_checkpoints(out) or [None])[-1]
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state_bytes = torch.tensor([_local_state_bytes(model_sd, optim_sd)], dtype=torch.float64, device=device)
    dist.all_reduce(state_bytes)  # NCCL reduces device tensors only; one sync per checkpoint
    needed = estimate_checkpoint_bytes(previous, state_bytes.item())

    tmp_name, error = None, None
    if rank == 0:
        try:
            remove_stale_temporaries(out)
            free = _free_bytes(out)
            if free is not None and free < needed:
                error = disk_full_message(what, out, needed, free, previous, started=False)
            else:
                tmp_name = f".{checkpoint_name(step)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                (out / tmp_name).mkdir(parents=True)
        except OSError as e:
            error = describe_os_error(e, what)
    names: list = [tmp_name, error]
    dist.broadcast_object_list(names, src=0)
    tmp_name, error = names
    if error:
        raise CheckpointError(error)
    tmp = out / tmp_name

    try:
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        extra = {"step": step, "world_size": world_size, "scheduler": scheduler.state_dict(),
                 "loader": loader.state_dict(), "rng": _rng_state(device)}
        torch.save(extra, tmp / f"rank{rank:05d}.pt")
        error = None
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - reported on every rank below
        error = _write_failure(e, what, out, tmp, needed, previous)
    error = _agree(error, world_size)
    if error is None:
        # Each rank checksums the files it wrote (still in its page cache); rank 0 adds the rest.
        sums, error = {}, None
        try:
            for p in sorted(tmp.iterdir()):
                m = _OWNER.match(p.name)
                owner = int(m.group(1) or m.group(2)) if m else 0
                if (owner if owner < world_size else 0) == rank:
                    sums[p.name] = {"bytes": p.stat().st_size, "crc32": file_crc32(p)}
        except OSError as e:
            error = describe_os_error(e, what)
        gathered: list = [None] * world_size
        dist.all_gather_object(gathered, (sums, error))
        error = next((err for _, err in gathered if err), None)
    if error is None and rank == 0:
        try:
            files = {k: v for s, _ in gathered for k, v in s.items()}
            _fsync_write(tmp / CONFIG_FILE, cfg.to_toml())
            files[CONFIG_FILE] = {"bytes": (tmp / CONFIG_FILE).stat().st_size, "crc32": file_crc32(tmp / CONFIG_FILE)}
            manifest = {"version": MANIFEST_VERSION, "step": step, "files": files,
                        "environment": run_environment(device, world_size),
                        "model": asdict(model_config) if model_config is not None else None,
                        "optim_master": cfg.optim.master}
            _fsync_write(tmp / MANIFEST, json.dumps(manifest, indent=1) + "\n")
            _fsync_write(tmp / MARKER, json.dumps({"step": step, "world_size": world_size}) + "\n")
            if final.exists():  # a checkpoint of the same step from an earlier attempt of this run
                shutil.rmtree(final)
            os.rename(tmp, final)
            fd = os.open(out, os.O_RDONLY)
            try:
                os.fsync(fd)  # the rename itself is durable
            finally:
                os.close(fd)
        except Exception as e:  # noqa: BLE001
            error = _write_failure(e, what, out, tmp, needed, previous)
    error = _agree(error, world_size)
    if error:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        raise CheckpointError(error)
    if rank == 0:
        for old in list_checkpoints(out)[:-cfg.train.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def _write_failure(e: Exception, what: str, out: Path, tmp: Path, needed: int, previous: Path | None) -> str:
    """The operator's view of a failed write. torch.save reports a full disk as 'unexpected pos ...' with
    no errno, so the free space at the moment of failure decides too."""
    codes = _errnos(e)
    reason = os_error_reason(codes)
    free = _free_bytes(out)
    if reason == "the disk is full" or (reason is None and free is not None and free < 16 * 2**20):
        written = folder_bytes(tmp) if tmp.is_dir() else 0
        return disk_full_message(what, out, max(needed, written), free or 0, previous)
    cause = f"cannot write in {out} ({reason})" if reason else f"failed ({type(e).__name__}: {str(e).strip()[:500]})"
    return f"{what}: {cause}; the partial save was removed, {_previous_words(previous)}"


def _previous_words(previous: Path | None) -> str:
    return (f"the previous checkpoint {previous} is intact" if previous is not None
            else "no earlier checkpoint of this run exists")


# ------------------------------------------------------------------------------------------------
# choosing and loading
# ------------------------------------------------------------------------------------------------
def select_intact(candidates: list[Path], explicit: bool, rank: int, world_size: int,
                  say: Callable[[str], None]) -> Path:
    """Collective. The first candidate (newest first) whose files all match its manifest; an explicit
    --train.resume folder that is damaged is refused, naming the file."""
    for i, ckpt in enumerate(candidates):
        v = verify_distributed(ckpt, rank, world_size)
        if v.ok:
            if v.legacy:
                say(f"warning: {v.summary()}")
            if i:
                say(f"falling back to {ckpt}, the newest intact checkpoint")
            return ckpt
        if explicit:
            raise CheckpointError(f"train.resume = {str(ckpt)!r} is damaged: {v.summary()}; pass an intact "
                                  "checkpoint (check one with `python -m skyt1.train --verify-checkpoint DIR`)")
        say(f"warning: {ckpt} is damaged and will not be resumed from: {v.summary()}")
    raise CheckpointError(f"every checkpoint in {candidates[0].parent} is damaged (newest: {candidates[0]}); "
                          "move them away to start over, or pass --train.resume with an intact copy")


def load_checkpoint(ckpt: str | Path, model, optimizer, scheduler, loader, rank: int, device: torch.device,
                    say: Callable[[str], None] = lambda _msg: None) -> int:
    """Collective. Restores model, optimizer, schedule, loader position and RNG; returns the step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    ckpt = Path(ckpt)
    if not is_checkpoint(ckpt):
        raise ConfigError(f"{ckpt}: not a complete checkpoint (no {MARKER} marker)")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    try:
        dcp.load(state, checkpoint_id=str(ckpt))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        # The schedule and the data position are the same on every rank: take rank 0's. RNG is per rank,
        # when the world size is unchanged.
        common = torch.load(ckpt / "rank00000.pt", weights_only=False)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - a checkpoint that does not fit, named
        raise CheckpointError(f"{ckpt}: cannot be loaded into this run's model and optimizer "
                              f"({type(e).__name__}: {str(e).strip()[:400]})") from None
    scheduler.load_state_dict(common["scheduler"])
    loader.load_state_dict(common["loader"])
    own = ckpt / f"rank{rank:05d}.pt"
    if own.is_file() and common["world_size"] == dist.get_world_size():
        _set_rng_state(torch.load(own, weights_only=False)["rng"], device)
    man = read_manifest(ckpt)
    if man is not None and "environment" in man:
        diffs = environment_warnings(man["environment"], run_environment(device, dist.get_world_size()))
        if diffs:
            say(f"warning: {ckpt} was written in another environment ({'; '.join(diffs)}); the run continues, "
                "but not bit-exactly as it would have (set OMP_NUM_THREADS / the world size as before for that)")
    return int(common["step"])


def verify_command(path: str | Path) -> int:
    """`python -m skyt1.train --verify-checkpoint DIR`: DIR is one checkpoint or an output folder of them.
    Prints a line per checkpoint; 0 when all are intact, 1 otherwise."""
    path = Path(path)
    if is_checkpoint(path) or _NAME.match(path.name):
        targets = [path]
    else:
        targets = sorted(d for d in path.iterdir() if _NAME.match(d.name) and d.is_dir()) if path.is_dir() else []
        if not targets:
            print(f"error: {path}: neither a checkpoint folder nor a folder holding step_* checkpoints")
            return 2
    bad = 0
    for ckpt in targets:
        v = verify_checkpoint(ckpt)
        bad += not v.ok
        print(("ok       " if v.ok else "DAMAGED  ") + v.summary())
        for p in v.problems[1:]:
            print("         " + p)
        if v.ok and v.manifest and "environment" in v.manifest:
            print("         written with " + ", ".join(f"{k} {val}" for k, val in v.manifest["environment"].items()))
    return 1 if bad else 0


# ------------------------------------------------------------------------------------------------
# the resume point, before any process group: which checkpoints, in which order
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ResumePlan:
    candidates: tuple[Path, ...] = ()   # newest first; the first that passes the checksums is used
    explicit: bool = False              # --train.resume DIR: no falling back
    notes: tuple[str, ...] = ()         # warnings for the console (damaged checkpoints skipped, ...)


def _incompatible(ckpt: Path, theirs: TrainConfig, cfg: TrainConfig, mcfg: ModelConfig) -> list[str] | None:
    """Why the checkpoint's tensors cannot be loaded into this run ([] when they can, None if unknown)."""
    shape = shape_differences(ckpt, mcfg)
    if shape is None:
        return None
    if theirs.optim.master != cfg.optim.master:  # another parameter dtype and optimizer-state layout
        shape.append(f"optim.master: {cfg.optim.master!r} here vs {theirs.optim.master!r} in the checkpoint")
    return shape


def plan_resume(cfg: TrainConfig, mcfg: ModelConfig) -> ResumePlan:
    """Checks that need no process group: markers, the manifest's file sizes (the checksums are read by all
    ranks together in select_intact), the configuration and model shape of the checkpoints."""
    out = Path(cfg.train.output_dir)
    existing = list_checkpoints(out)
    resume = cfg.train.resume
    if resume == "none":
        if existing:
            raise ConfigError(
                f"train.output_dir = {cfg.train.output_dir!r} already holds checkpoints ({existing[-1].name}, ...); "
                "pass --train.resume auto to continue that run, or choose another --train.output_dir")
        return ResumePlan()
    if resume != "auto":
        path = Path(resume)
        if not is_checkpoint(path):
            raise ConfigError(f"train.resume = {resume!r}: not a complete checkpoint folder (expected a step_* folder "
                              "with a COMPLETE marker), nor 'auto' or 'none'")
        v = verify_checkpoint(path, deep=False)
        if not v.ok:
            raise CheckpointError(f"train.resume = {resume!r} is damaged: {v.summary()}; pass an intact checkpoint")
        why = _incompatible(path, saved_config(path), cfg, mcfg)
        if why:
            raise ConfigError(f"train.resume = {resume!r} holds another model ({'; '.join(why[:4])}): it cannot be "
                              f"loaded into this one; continue it with its own configuration (--config "
                              f"{path / CONFIG_FILE}), or drop --train.resume to train this model")
        return ResumePlan((path,), explicit=True)
    notes, intact = [], []
    for ckpt in reversed(existing):
        # Sizes of every file, and the checksum of the (small) configuration, which is read next.
        v = verify_checkpoint(ckpt, select=lambda _i, name: name == CONFIG_FILE)
        if v.ok:
            try:
                saved_config(ckpt)
            except ConfigError as e:
                v.problems.append(str(e))
        if v.ok:
            intact.append(ckpt)
        else:
            notes.append(f"warning: {ckpt} is damaged and will not be resumed from: {v.summary()}")
    if existing and not intact:
        raise CheckpointError(f"every checkpoint in {out} is damaged ({notes[0][len('warning: '):]}); move them away "
                              "to start over, or pass --train.resume with an intact copy")
    if not intact:
        return ResumePlan(notes=tuple(notes))
    newest = intact[0]
    theirs = saved_config(newest)
    diffs = cfg.run_differences(theirs)
    if diffs:
        shown = "; ".join(diffs[:6]) + (" ..." if len(diffs) > 6 else "")
        why = _incompatible(newest, theirs, cfg, mcfg)
        if why or why is None:
            # Resuming them with this config would fail on the first tensor: do not suggest it.
            shape = f": {'; '.join(why[:4])}" if why else ""
            raise ConfigError(
                f"train.output_dir = {cfg.train.output_dir!r} holds checkpoints of another run with another model"
                f"{shape} (this config vs theirs: {shown}); choose another --train.output_dir for this run, or "
                f"continue that one with its own configuration: --config {newest / CONFIG_FILE}")
        raise ConfigError(
            f"train.output_dir = {cfg.train.output_dir!r} holds checkpoints of another run (this config vs "
            f"theirs: {shown}); choose another --train.output_dir, or pass --train.resume "
            f"{newest} to continue from it with this config")
    older = [ckpt for ckpt in intact[1:] if not cfg.run_differences(saved_config(ckpt))]
    return ResumePlan((newest, *older), notes=tuple(notes))
