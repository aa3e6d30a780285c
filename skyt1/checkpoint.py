"""Hugging Face checkpoints: read and write safetensors (single file or sharded with an index).

Loading streams tensor by tensor from memory-mapped files into a model materialised once, so peak
memory is the model plus one tensor, never two copies. Saving writes shards of a bounded size under
temporary names and renames the finished folder into place, so a crash never leaves a folder that
looks complete. Our parameter names are HF's without the leading "model." (lm_head stays as is).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from skyt1.config import ConfigError, ModelConfig
from skyt1.model import Transformer, build_model

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "generation_config.json")
# Buffers some exporters write that carry no learned state.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be read as the model it claims to be."""


def hf_to_ours(name: str) -> str:
    return name.removeprefix("model.")


def ours_to_hf(name: str) -> str:
    return name if name.startswith("lm_head.") else "model." + name


def load_config(path: str | Path) -> ModelConfig:
    return ModelConfig.from_json(Path(path))


def checkpoint_files(path: str | Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint folder")
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index (needs a 'weight_map' object): "
                                  f"{e!r}") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: 'weight_map' must be an object")
        files = {}
        for name, fname in weight_map.items():
            f = path / fname
            if not f.is_file():
                raise CheckpointError(f"{index}: tensor {name!r} is mapped to {fname!r}, which does not exist")
            files[name] = f
        return files
    single = path / SINGLE_FILE
    if single.is_file():
        with _open_safetensors(single) as fh:
            return {name: single for name in fh.keys()}
    raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}")


class _open_safetensors:
    """safe_open with errors that name the file."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        try:
            self._cm = safe_open(str(self.path), framework="pt", device="cpu")
            return self._cm.__enter__()
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{self.path}: not a readable safetensors file ({e})") from None

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


def iter_checkpoint_tensors(path: str | Path) -> Iterator[tuple[str, Path, torch.Tensor]]:
    """(HF name, file, tensor) one at a time, each read from a memory map when asked for."""
    by_file: dict[Path, list[str]] = {}
    for name, f in checkpoint_files(path).items():
        by_file.setdefault(f, []).append(name)
    for f, names in by_file.items():
        with _open_safetensors(f) as fh:
            present = set(fh.keys())
            for name in names:
                if name not in present:
                    raise CheckpointError(f"{f}: tensor {name!r} listed in the index is not in this file")
                try:
                    tensor = fh.get_tensor(name)
                except Exception as e:
                    raise CheckpointError(f"{f}: tensor {name!r} cannot be read ({e})") from None
                yield name, f, tensor


@torch.no_grad()
def load_weights(model: Transformer, path: str | Path, strict: bool = True) -> None:
    """Copy a checkpoint's tensors into an already materialised model, one tensor at a time."""
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = model.cfg.tie_word_embeddings
    expected = {n for n in params if not (tied and n == "lm_head.weight")}
    seen: set[str] = set()
    for hf_name, f, tensor in iter_checkpoint_tensors(path):
        if hf_name.endswith(IGNORED_SUFFIXES):
            continue
        name = hf_to_ours(hf_name)
        if tied and name == "lm_head.weight":
            continue  # some exporters write the tied matrix twice; the embedding is the one we keep
        if name not in params:
            if strict:
                raise CheckpointError(f"{f}: unexpected tensor {hf_name!r} (not part of a "
                                      f"{model.cfg.num_hidden_layers}-layer Qwen2 model)")
            continue
        p = params[name]
        if tuple(tensor.shape) != tuple(p.shape):
            raise CheckpointError(f"{f}: tensor {hf_name!r} has shape {tuple(tensor.shape)}, the model "
                                  f"expects {tuple(p.shape)}")
        p.copy_(tensor)
        seen.add(name)
    missing = sorted(expected - seen)
    if missing:
        shown = ", ".join(ours_to_hf(n) for n in missing[:5])
        raise CheckpointError(f"{path}: missing {len(missing)} tensor(s): {shown}"
                              + (" ..." if len(missing) > 5 else ""))


def load_pretrained(path: str | Path, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> Transformer:
    """Build the model from a HF folder (config.json + safetensors) directly on `device`."""
    cfg = load_config(path)
    model = build_model(cfg, device="meta", dtype=dtype)
    model.to_empty(device=device)
    model.tie_weights()
    load_weights(model, path)
    return model


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def save_tensors(named_tensors: Iterable[tuple[str, torch.Tensor]], cfg: ModelConfig, out_dir: str | Path, *,
                 tokenizer_dir: str | Path | None = None, max_shard_bytes: int = 5 * 2**30,
                 dtype: torch.dtype | None = None) -> Path:
    """Write HF-named tensors as a checkpoint folder, streaming: at most one shard is held at a time.

    Tensors arrive one by one (from a model, or gathered one at a time from FSDP shards), are cast to
    `dtype`, grouped into shards of at most max_shard_bytes, and written under temporary names; the
    folder is renamed into place only when everything, index and config included, is on disk.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        weight_map: dict[str, int] = {}
        current: dict[str, torch.Tensor] = {}
        current_bytes = total_bytes = 0
        written: list[Path] = []

        def flush():
            nonlocal current, current_bytes
            if current:
                f = tmp / f"shard-{len(written):05d}.part"
                save_file(current, str(f), metadata={"format": "pt"})
                written.append(f)
                current, current_bytes = {}, 0

        for name, tensor in named_tensors:
            t = tensor.detach()
            if dtype is not None:
                t = t.to(dtype)
            t = t.to("cpu").contiguous()
            size = _tensor_bytes(t)
            if current and current_bytes + size > max_shard_bytes:
                flush()
            current[name] = t
            weight_map[name] = len(written)
            current_bytes += size
            total_bytes += size
        flush()

        n = len(written)
        if n == 1:
            written[0].rename(tmp / SINGLE_FILE)
        else:
            names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
            for f, final in zip(written, names):
                f.rename(tmp / final)
            index = {"metadata": {"total_size": total_bytes},
                     "weight_map": {k: names[i] for k, i in sorted(weight_map.items())}}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        hf_cfg = cfg.to_hf_dict()
        if dtype is not None:
            hf_cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        if tokenizer_dir is not None:
            for fname in TOKENIZER_FILES:
                src = Path(tokenizer_dir) / fname
                if src.is_file():
                    shutil.copyfile(src, tmp / fname)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def hf_named_tensors(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's tensors under HF names; a tied LM head is written once, as the embedding (as HF does)."""
    for name, p in model.named_parameters():  # named_parameters() already drops the tied duplicate
        yield ours_to_hf(name), p


def save_pretrained(model: Transformer, out_dir: str | Path, tokenizer_dir: str | Path | None = None,
                    max_shard_bytes: int = 5 * 2**30, dtype: torch.dtype | None = None) -> Path:
    return save_tensors(hf_named_tensors(model), model.cfg, out_dir, tokenizer_dir=tokenizer_dir,
                        max_shard_bytes=max_shard_bytes, dtype=dtype)


__all__ = ["CheckpointError", "ConfigError", "load_config", "load_pretrained", "load_weights", "save_pretrained",
           "save_tensors", "iter_checkpoint_tensors", "checkpoint_files", "hf_to_ours", "ours_to_hf"]
