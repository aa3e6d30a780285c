"""The on-disk tokenized dataset: flat memory-mapped arrays plus meta.json.

    tokens.bin       uint32 (T,)    token ids of all documents back to back (Qwen's vocab needs > 16 bits)
    mask.bin         uint8  (T,)    1 where the token is trained on (assistant content + turn end token);
                                    a byte per token rather than bits so any document slices without shifting
    offsets.bin      int64  (N+1,)  document d is tokens[offsets[d]:offsets[d+1]]
    loss_tokens.bin  int64  (N,)    labels a document contributes: #{t in [1, len) : mask[t]}
    origin.bin       int64  (N, 2)  (source file index, row index) each document came from
    meta.json        written last; a folder without a valid one is not a dataset

The builder writes everything into a temporary sibling folder and renames it into place, so a folder
that has meta.json with "complete": true always holds every array in full.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from skyt1.data.readers import DataError

FORMAT = "skyt1-tokens-v1"
FILES = {  # name -> (file, dtype, elements per document or per token)
    "tokens": ("tokens.bin", np.uint32),
    "mask": ("mask.bin", np.uint8),
    "offsets": ("offsets.bin", np.int64),
    "loss_tokens": ("loss_tokens.bin", np.int64),
    "origin": ("origin.bin", np.int64),
}


def expected_counts(num_docs: int, num_tokens: int) -> dict[str, int]:
    return {"tokens": num_tokens, "mask": num_tokens, "offsets": num_docs + 1, "loss_tokens": num_docs,
            "origin": 2 * num_docs}


def read_meta(path: str | Path) -> dict:
    """meta.json of a complete dataset folder, checked against the array files' sizes."""
    path = Path(path)
    mp = path / "meta.json"
    if not mp.is_file():
        raise DataError(f"{path}: not a skyt1 dataset (no meta.json); build one with `python -m skyt1.data build`")
    try:
        meta = json.loads(mp.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{mp}: unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{mp}: format {meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT!r}")
    if meta.get("complete") is not True:
        raise DataError(f"{mp}: the build did not complete")
    counts = meta["counts"]
    for name, want in expected_counts(counts["documents"], counts["tokens"]).items():
        file, dtype = FILES[name]
        fp = path / file
        size = fp.stat().st_size if fp.is_file() else -1
        if size != want * np.dtype(dtype).itemsize:
            raise DataError(f"{fp}: {size} bytes, expected {want * np.dtype(dtype).itemsize} from meta.json")
    return meta


class TokenDataset:
    """Read-only view of a built dataset; documents are memory-mapped, the index is loaded."""

    def __init__(self, path: str | Path, expect_tokenizer_hash: str | None = None):
        self.path = Path(path)
        self.meta = read_meta(self.path)
        tok_hash = self.meta["tokenizer"]["sha256"]
        if expect_tokenizer_hash is not None and expect_tokenizer_hash != tok_hash:
            raise DataError(f"{self.path}: built with tokenizer sha256 {tok_hash[:16]}..., but the tokenizer in use "
                            f"has {expect_tokenizer_hash[:16]}...; rebuild the dataset with this tokenizer")
        n, t = self.meta["counts"]["documents"], self.meta["counts"]["tokens"]
        self.num_docs, self.num_tokens = n, t
        self.offsets = np.fromfile(self.path / "offsets.bin", dtype=np.int64)  # (N+1,)
        self.loss_tokens = np.fromfile(self.path / "loss_tokens.bin", dtype=np.int64)  # (N,)
        self.origin = np.fromfile(self.path / "origin.bin", dtype=np.int64).reshape(n, 2)  # (N, 2)
        if self.offsets[0] != 0 or self.offsets[-1] != t or (np.diff(self.offsets) <= 0).any():
            raise DataError(f"{self.path / 'offsets.bin'}: offsets are not increasing from 0 to {t}")
        self.lengths = np.diff(self.offsets)  # (N,)
        self.tokens = np.memmap(self.path / "tokens.bin", dtype=np.uint32, mode="r", shape=(t,))
        self.mask = np.memmap(self.path / "mask.bin", dtype=np.uint8, mode="r", shape=(t,))

    def __len__(self) -> int:
        return self.num_docs

    @property
    def tokenizer_hash(self) -> str:
        return self.meta["tokenizer"]["sha256"]

    @property
    def pad_id(self) -> int:
        return self.meta["tokenizer"]["pad_id"]

    def doc(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens (L,) uint32, mask (L,) uint8) of document i, views into the memory map."""
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.tokens[a:b], self.mask[a:b]

    def gather(self, doc_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Documents concatenated: tokens (T,), mask (T,), lengths (B,)."""
        starts, ends = self.offsets[doc_ids], self.offsets[np.asarray(doc_ids) + 1]
        tokens = np.concatenate([self.tokens[a:b] for a, b in zip(starts, ends)])
        mask = np.concatenate([self.mask[a:b] for a, b in zip(starts, ends)])
        return tokens, mask, ends - starts
