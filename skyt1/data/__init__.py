"""Sky-T1 data pipeline: readers -> tokenized memmap dataset -> packer -> per-rank packed micro-batches.

Names resolve lazily so that tokenizer worker processes (spawned by the builder) do not import torch.
"""
from importlib import import_module

_EXPORTS = {
    "DataError": "readers", "RowReader": "readers", "iter_rows": "readers",
    "BuildOptions": "build", "BuildResult": "build", "build_dataset": "build",
    "TokenDataset": "dataset", "read_meta": "dataset",
    "Packer": "packer", "StepPlan": "packer", "pack_step": "packer", "packing_report": "packer",
    "PackedBatch": "batch", "pack_arrays": "batch", "pack_documents": "batch", "filler_batch": "batch",
    "IGNORE_INDEX": "batch",
    "PackedLoader": "loader", "StepBatch": "loader", "build_loader": "loader", "loss_token_count": "loader",
    "make_arithmetic_rows": "synthetic", "write_arithmetic_json": "synthetic", "build_tiny_tokenizer": "synthetic",
    "make_synthetic_dataset": "synthetic",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
