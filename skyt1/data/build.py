"""Build a tokenized dataset from Sky-T1 JSON / JSONL / OpenAI-messages JSONL files.

Rows stream from the readers in file order, are tokenized in worker processes (order preserved, a
bounded number of batches in flight so memory stays flat), and are appended to the arrays of a
temporary folder that is renamed into place once meta.json is written. A build whose inputs (by
content hash), tokenizer (by hash) and options equal those of the existing output is a no-op.

Builds of one output take a lock (.<name>.lock beside it, flock): a second build of the same output
waits for the first and then finds it up to date. Holding the lock, a build removes the temporary
folders that killed builds left behind: no live build can be using them, since every build holds the
lock while it writes.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
import uuid
from array import array
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

import numpy as np

from skyt1.data.dataset import FILES, FORMAT, read_meta
from skyt1.data.readers import DataError, RowReader
from skyt1.tokenizer import QWEN25_DEFAULT_SYSTEM, ChatTokenizer, messages_from_row

ROWS_PER_TASK = 16
MAX_REPORTED_SKIPS = 20


@dataclass(frozen=True)
class BuildOptions:
    max_seq_len: int = 16384
    end_token: str = "im_end"              # "im_end" | "endoftext", see skyt1.tokenizer
    on_overflow: str = "truncate"          # "truncate" (keep the first max_seq_len tokens, as Sky-T1) | "drop"
    skip_bad_rows: bool = False            # count and skip rows that fail to parse or convert, else stop
    default_system: str | None = QWEN25_DEFAULT_SYSTEM  # for rows without a system prompt; None: no system turn

    def __post_init__(self):
        if not isinstance(self.max_seq_len, int) or self.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be an integer >= 2, got {self.max_seq_len!r}")
        if self.on_overflow not in ("truncate", "drop"):
            raise ValueError(f"on_overflow must be 'truncate' or 'drop', got {self.on_overflow!r}")
        if self.end_token not in ("im_end", "endoftext"):
            raise ValueError(f"end_token must be 'im_end' or 'endoftext', got {self.end_token!r}")


@dataclass(frozen=True)
class BuildResult:
    path: Path
    meta: dict
    rebuilt: bool  # False when the existing build already matched (no-op)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


class Progress:
    """A one-line progress report on stderr with rates; a line every 10 s when stderr is not a terminal."""

    def __init__(self, total_bytes: int, enabled: bool = True, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval = 0.5 if self.tty else 10.0
        self.total_bytes = max(total_bytes, 1)
        self.t0 = self.last = time.perf_counter()

    def update(self, rows: int, tokens: int, bytes_read: int, force: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not force and now - self.last < self.interval):
            return
        self.last = now
        dt = max(now - self.t0, 1e-9)
        frac = min(bytes_read / self.total_bytes, 1.0)
        eta = dt * (1 - frac) / frac if frac > 0 else float("nan")
        line = (f"build: {rows:,} rows  {rows / dt:,.1f} rows/s  {tokens / 1e6:,.2f}M tokens  "
                f"{tokens / dt / 1e3:,.1f}K tok/s  {bytes_read / 2**20:,.1f}/{self.total_bytes / 2**20:,.1f} MiB "
                f"{100 * frac:.0f}%  ETA {eta:,.0f}s")
        self.stream.write(("\r" + line + "\x1b[K") if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


# -- tokenization, in worker processes or inline -----------------------------------------------------------
_WORKER: dict = {}


def _init_worker(tokenizer_path: str, end_token: str, default_system: str | None, sources: list[str]) -> None:
    _WORKER["tok"] = ChatTokenizer.from_pretrained(tokenizer_path, end_token=end_token, default_system=default_system)
    _WORKER["sources"] = sources


def _tokenize_rows(batch: list[tuple[int, int, object]]) -> list[tuple]:
    """[(source index, row index, row)] -> [(source index, row index, ids uint32, mask uint8, error)]."""
    tok, sources = _WORKER["tok"], _WORKER["sources"]
    out = []
    for src, ri, row in batch:
        try:
            ids, mask = tok.encode_chat(messages_from_row(row, sources[src], ri))
        except Exception as e:  # noqa: BLE001 - whatever one row does, it is that row's error
            out.append((src, ri, None, None, row_error_message(e, row, sources[src], ri)))
            continue
        out.append((src, ri, np.asarray(ids, dtype=np.uint32), np.asarray(mask, dtype=np.uint8), None))
    return out


def _has_lone_surrogate(obj, depth: int = 0) -> bool:
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if depth > 100:
        return False
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else ()
    return any(_has_lone_surrogate(v, depth + 1) for v in items)


def row_error_message(e: Exception, row, source: str, ri: int) -> str:
    """The error of one row, naming the file and the row; ValueErrors from messages_from_row already do."""
    msg = str(e)
    if isinstance(e, ValueError) and msg.startswith(source):
        return msg
    if _has_lone_surrogate(row):
        why = "holds a lone UTF-16 surrogate (e.g. \"\\ud800\"), valid JSON but not text any tokenizer can encode"
    elif isinstance(e, RecursionError):
        why = "nested too deeply to process"
    elif isinstance(e, ValueError):
        why = msg
    else:
        why = f"cannot be tokenized ({type(e).__name__}: {msg[:200]})"
    return f"{source}: row {ri}: {why}"


class _Inline:
    """A finished 'future' for the single-process path."""

    def __init__(self, value):
        self._value = value
        self.batch = None

    def result(self):
        return self._value


# -- the build ---------------------------------------------------------------------------------------------
def build_dataset(inputs: Iterable[str | Path], tokenizer: str | Path, output: str | Path,
                  options: BuildOptions = BuildOptions(), *, workers: int = 1, overwrite: bool = False,
                  progress: bool = True) -> BuildResult:
    """Tokenize `inputs` into a dataset folder `output` (see skyt1.data.dataset for the format).

    Raises DataError for bad input (naming file and row) unless options.skip_bad_rows, and when
    `output` holds a build made with another tokenizer (unless overwrite) or a folder that is not a
    dataset. Returns without work when `output` already holds this exact build. workers > 1 spawns
    processes, so a script calling this needs the usual `if __name__ == "__main__":` guard.
    """
    t_start = time.perf_counter()
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise ValueError("build_dataset: no input files")
    for p in inputs:
        if not p.is_file():
            raise FileNotFoundError(f"input {p} does not exist or is not a file")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    output = Path(output).absolute()
    tok = ChatTokenizer.from_pretrained(tokenizer, end_token=options.end_token, default_system=options.default_system)
    sources = [{"path": str(p), "sha256": file_sha256(p), "bytes": p.stat().st_size} for p in inputs]
    key_doc = {"format": FORMAT, "tokenizer": tok.hash, "sources": [s["sha256"] for s in sources],
               "options": asdict(options)}
    build_key = hashlib.sha256(json.dumps(key_doc, sort_keys=True).encode()).hexdigest()

    with build_lock(output, progress):
        replace = _check_output(output, build_key, tok.hash, overwrite)
        if replace == "up-to-date":
            if progress:
                print(f"{output}: up to date (same inputs, tokenizer and options); nothing to do", file=sys.stderr)
            return BuildResult(output, read_meta(output), rebuilt=False)

        tmp = output.parent / f".{output.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            meta = _write(tmp, inputs, sources, tok, options, workers, progress)
            meta.update(build_key=build_key, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        build_seconds=round(time.perf_counter() - t_start, 3))
            _fsync_write(tmp / "meta.json", json.dumps(meta, indent=1).encode())
            _replace_dir(tmp, output, replace)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return BuildResult(output, meta, rebuilt=True)


@contextlib.contextmanager
def build_lock(target: Path, progress: bool = True):
    """Hold the build lock of `target` (a file .<name>.lock beside it, released when the process dies);
    wait for another holder, saying so. Holding it, remove the temporaries of killed builds of target."""
    lock = target.parent / f".{target.name}.lock"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        f = open(lock, "a+")
    except OSError as e:
        if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        # Nobody can build here, so nobody is: an up-to-date build is still usable (and a stale one is
        # refused when its folder cannot be written).
        yield
        return
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            print(f"{target}: another build (pid {holder}) is writing it; waiting for it to finish",
                  file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
            for stale in remove_stale_temporaries(target):
                if progress:
                    print(f"removed {stale}, left by a build that was killed", file=sys.stderr)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def remove_stale_temporaries(target: Path) -> list[Path]:
    """.<name>.tmp-* / .<name>.old-* beside target: only call with target's build lock held."""
    removed = []
    for p in target.parent.glob(f".{target.name}.*"):
        if p.name.startswith((f".{target.name}.tmp-", f".{target.name}.old-")):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _check_output(output: Path, build_key: str, tok_hash: str, overwrite: bool) -> str:
    """'up-to-date', 'replace' (an older dataset is there) or 'new'."""
    if not output.exists():
        return "new"
    if not output.is_dir():
        raise DataError(f"output {output} exists and is not a folder")
    if not (output / "meta.json").exists():
        if any(output.iterdir()):
            raise DataError(f"output {output} exists, is not empty and is not a skyt1 dataset; refusing to replace it")
        return "replace"
    try:
        old = read_meta(output)
    except DataError as e:
        if not overwrite:
            raise DataError(f"output {output} holds a damaged dataset ({e}); pass --overwrite to replace it") from None
        return "replace"
    if old.get("build_key") == build_key:
        return "up-to-date"
    old_hash = old["tokenizer"]["sha256"]
    if old_hash != tok_hash and not overwrite:
        raise DataError(f"output {output} was built with another tokenizer (sha256 {old_hash[:16]}..., now "
                        f"{tok_hash[:16]}...); pass --overwrite to replace it or choose another --output")
    return "replace"


def _replace_dir(tmp: Path, output: Path, replace: str) -> None:
    if replace == "new":
        os.rename(tmp, output)
        return
    trash = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(output, trash)
    os.rename(tmp, output)
    shutil.rmtree(trash, ignore_errors=True)


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write(tmp: Path, inputs: list[Path], sources: list[dict], tok: ChatTokenizer, options: BuildOptions,
           workers: int, progress: bool) -> dict:
    names = [str(p) for p in inputs]
    files = {name: open(tmp / FILES[name][0], "wb") for name in ("tokens", "mask", "loss_tokens", "origin")}
    offsets = array("q", [0])
    lengths = array("q")
    per_src = [dict(rows=0, documents=0, skipped=0, truncated=0, dropped_too_long=0, dropped_no_loss=0)
               for _ in inputs]
    totals = dict(tokens=0, loss_tokens=0, tokens_before_truncation=0)
    skipped_msgs: list[str] = []
    bar = Progress(sum(s["bytes"] for s in sources), enabled=progress)
    done_bytes = 0
    rows_seen = 0

    def skip(src: int, msg: str) -> None:
        per_src[src]["skipped"] += 1
        if len(skipped_msgs) < MAX_REPORTED_SKIPS:
            skipped_msgs.append(msg)

    def consume(task) -> None:
        try:
            results = task.result()
        except Exception:  # noqa: BLE001 - the batch could not go through a worker (e.g. a row too deep to
            # pickle): tokenize it here, where each row's failure is that row's error
            results = _tokenize_rows(task.batch)
        for src, ri, ids, mask, err in results:
            st = per_src[src]
            st["rows"] += 1
            if err is not None:
                if not options.skip_bad_rows:
                    raise DataError(err + " (pass --skip-bad-rows to skip such rows)")
                skip(src, err)
                continue
            n = len(ids)
            totals["tokens_before_truncation"] += n
            if n > options.max_seq_len:
                if options.on_overflow == "drop":
                    st["dropped_too_long"] += 1
                    continue
                st["truncated"] += 1
                ids, mask = ids[:options.max_seq_len], mask[:options.max_seq_len]
                n = options.max_seq_len
            loss = int(mask[1:].sum())  # the first token is never a label
            if loss == 0:  # e.g. a prompt longer than max_seq_len: nothing left to learn from
                st["dropped_no_loss"] += 1
                continue
            files["tokens"].write(ids.tobytes())
            files["mask"].write(mask.tobytes())
            files["loss_tokens"].write(np.int64(loss).tobytes())
            files["origin"].write(np.array([src, ri], dtype=np.int64).tobytes())
            offsets.append(offsets[-1] + n)
            lengths.append(n)
            st["documents"] += 1
            totals["tokens"] += n
            totals["loss_tokens"] += loss

    pool = None
    if workers > 1:
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker,
                                   initargs=(tok.path, options.end_token, options.default_system, names))
    _WORKER.update(tok=tok, sources=names)  # inline path, and the fallback for batches a worker refuses
    pending: deque[Future | _Inline] = deque()

    def submit(batch: list) -> Future | _Inline:
        task = pool.submit(_tokenize_rows, batch) if pool else _Inline(_tokenize_rows(batch))
        task.batch = batch  # kept to redo it inline if the worker cannot take it
        return task
    window = 4 * workers
    try:
        for src, path in enumerate(inputs):
            def bad_row(ri: int, msg: str, src: int = src) -> None:  # a row the reader cannot build
                if not options.skip_bad_rows:
                    raise DataError(msg + " (pass --skip-bad-rows to skip such rows)")
                per_src[src]["rows"] += 1
                skip(src, msg)

            reader = RowReader(path, on_bad_row=bad_row)
            sources[src]["format"] = reader.format
            batch: list = []
            for ri, row in reader:
                batch.append((src, ri, row))
                rows_seen += 1
                if len(batch) == ROWS_PER_TASK:
                    pending.append(submit(batch))
                    batch = []
                    while len(pending) > window:
                        consume(pending.popleft())
                    bar.update(rows_seen, totals["tokens"], done_bytes + reader.bytes_read)
            if batch:
                pending.append(submit(batch))
            done_bytes += sources[src]["bytes"]
        while pending:
            consume(pending.popleft())
        bar.update(rows_seen, totals["tokens"], done_bytes, force=True)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()

    n_docs = len(lengths)
    if n_docs == 0:
        raise DataError(f"no documents from {names}: every row was skipped or dropped "
                        f"({[s['skipped'] for s in per_src]} skipped); nothing to build")
    _fsync_write(tmp / FILES["offsets"][0], np.frombuffer(offsets, dtype=np.int64).tobytes())
    lens = np.frombuffer(lengths, dtype=np.int64)
    for s, st in zip(sources, per_src):
        s.update(st)
    counts = dict(documents=n_docs, tokens=totals["tokens"], loss_tokens=totals["loss_tokens"],
                  rows=sum(s["rows"] for s in per_src), skipped_rows=sum(s["skipped"] for s in per_src),
                  truncated=sum(s["truncated"] for s in per_src),
                  dropped_too_long=sum(s["dropped_too_long"] for s in per_src),
                  dropped_no_loss=sum(s["dropped_no_loss"] for s in per_src),
                  tokens_before_truncation=totals["tokens_before_truncation"])
    return {
        "format": FORMAT,
        "complete": True,
        "tokenizer": {"sha256": tok.hash, "path": tok.path, "vocab_size": tok.vocab_size, "end_token": tok.end_token,
                      "end_token_id": tok.end_token_id, "pad_id": tok.pad_id, "eos_token_ids": list(tok.eos_token_ids)},
        "options": asdict(options),
        "sources": sources,
        "counts": counts,
        "lengths": length_summary(lens),
        "length_histogram": length_histogram(lens),
        "skipped_examples": skipped_msgs,
        "files": {name: {"file": f, "dtype": np.dtype(dt).name} for name, (f, dt) in FILES.items()},
    }


def length_summary(lens: np.ndarray) -> dict:
    q = np.percentile(lens, [50, 90, 99]) if len(lens) else [0, 0, 0]
    return {"min": int(lens.min()), "max": int(lens.max()), "mean": float(lens.mean()),
            "p50": float(q[0]), "p90": float(q[1]), "p99": float(q[2])}


def length_histogram(lens: np.ndarray) -> dict:
    """Counts in power-of-two bins [0, 128), [128, 256), ... up to the longest document."""
    edges = [0, 128]
    while edges[-1] <= lens.max():
        edges.append(2 * edges[-1])
    counts, _ = np.histogram(lens, bins=edges)
    return {"edges": edges, "counts": counts.tolist()}
