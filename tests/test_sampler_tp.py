"""Tensor parallelism in the sampler on CPU (gloo): TP=2 against TP=1, token for token.

The TP=2 engines run as two processes (this one is rank 0, the other is started by LLM); the served one
is a separate process on 127.0.0.1 (2 replicas x 2 ranks through torchrun: tests/test_sampler.py). Each
spawn costs a few seconds of imports on two cores, so one TP=2 engine serves several checks.
"""
import os
import random
import re
import signal
import subprocess
import sys
import threading

import pytest
import torch
import torch.distributed as dist

from skyt1.checkpoint import save_pretrained
from skyt1.config import ModelConfig, preset_config
from skyt1.model import build_model
from skyt1.sample import LLM, SamplingParams
from skyt1.sample.tp import local_config, plan_table

# GQA (2 query heads per KV head), a vocabulary that does not split evenly (251 = 2 x 125 + 1: padded rows),
# untied embeddings.
CFG = dict(vocab_size=251, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
ENGINE = dict(max_model_len=96, block_size=4, num_kv_blocks=40, max_num_seqs=6, max_num_batched_tokens=48)


def _checkpoint(root, seed, tokenizer_dir=None, **over):
    model = build_model(ModelConfig(**{**CFG, **over}))
    model.init_weights(seed, std=0.2)  # std 0.2: peaked logits, so outputs depend on every weight
    return save_pretrained(model.eval(), root, tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("tp") / "model", torch.randint(0, 2**31 - 1, ()).item())


@pytest.fixture(scope="module")
def engines(ckpt):
    """(TP=1 LLM, TP=2 LLM) over the same checkpoint; the TP=2 one closed (its worker stopped) at the end."""
    assert not dist.is_initialized()
    one = LLM(ckpt, **ENGINE)
    two = LLM(ckpt, tensor_parallel_size=2, **ENGINE)
    yield one, two
    two.close()
    assert not dist.is_initialized()
    for p in two._tp_spawned.procs:
        assert p.returncode == 0


def test_bad_checkpoint_fails_cleanly_on_every_rank(tmp_path, ckpt):
    """A shard that cannot be read: rank 0 raises the loader's error naming the tensor, its worker is gone,
    and no process group is left behind (nothing waits for a rank that will never come)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from skyt1.checkpoint import CheckpointError

    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    tensors = load_file(bad / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, bad / "model.safetensors")
    assert not dist.is_initialized()  # first in this file: before the module's TP=2 engine starts
    with pytest.raises(CheckpointError, match="down_proj"):
        LLM(bad, tensor_parallel_size=2, **ENGINE)
    assert not dist.is_initialized()


def _workload(seed):
    rng = random.Random(seed)
    shared = [rng.randrange(251) for _ in range(13)]  # a 3-block common prefix: prefix sharing
    prompts = [shared + [rng.randrange(251) for _ in range(rng.randint(1, 9))] for _ in range(4)]
    prompts += [[rng.randrange(251) for _ in range(rng.randint(2, 30))] for _ in range(4)]
    return prompts


def test_tp2_greedy_equals_tp1_with_preemption_and_prefix_sharing(engines):
    one, two = engines
    seed = torch.randint(0, 2**31 - 1, ()).item()
    prompts = _workload(seed)
    # 8 prompts x 2 samples growing to ~60 tokens need ~240 slots of a 160-slot pool: preemption.
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, n=2)
    before = [e.engine.scheduler.num_preemptions for e in (one, two)]
    a, b = one.generate(prompts, params), two.generate(prompts, params)
    for x, y in zip(a, b):
        assert [o.token_ids for o in x.outputs] == [o.token_ids for o in y.outputs], f"seed {seed}"
        assert len(x.outputs[0].token_ids) == 40
    after = [e.engine.scheduler.num_preemptions for e in (one, two)]
    assert after[0] > before[0] and after[1] - before[1] == after[0] - before[0]
    assert any(r.num_cached_tokens > 0 for r in b[1:4])  # the shared prefix came from the cache
    # each rank holds its own KV head: rank 0's pool has half the heads of the TP=1 pool; and half the weights
    # (the norms are whole on every rank, the vocabulary has a padding row)
    assert two.engine.runner.kv_cache.shape[-2] == one.engine.runner.kv_cache.shape[-2] // 2
    full = sum(p.numel() for p in one.engine.model.parameters())
    norms = sum(p.numel() for n, p in one.engine.model.named_parameters() if "norm" in n)
    assert sum(p.numel() for p in two.engine.model.parameters()) == (full - norms + 2 * 64) // 2 + norms


def test_tp2_seeded_sampling_equals_tp1(engines):
    one, two = engines
    prompts = _workload(torch.randint(0, 2**31 - 1, ()).item())[:5]
    params = [SamplingParams(temperature=0.9, top_p=0.95, top_k=40, max_tokens=12, seed=100 + i, n=2,
                             logprobs=2, ignore_eos=True) for i in range(len(prompts))]
    a, b = one.generate(prompts, params), two.generate(prompts, params)
    for x, y in zip(a, b):
        assert [o.token_ids for o in x.outputs] == [o.token_ids for o in y.outputs]
        for ox, oy in zip(x.outputs, y.outputs):
            lx = [t["logprob"] for t in ox.logprobs]
            ly = [t["logprob"] for t in oy.logprobs]
            assert max(abs(p - q) for p, q in zip(lx, ly)) < 1e-4


def test_kv_heads_must_divide(ckpt):
    """Refused with the reason before any process starts."""
    for tp in (3, 4):  # 2 KV heads: neither 3 nor 4 ranks can each hold whole heads
        with pytest.raises(ValueError, match="KV heads"):
            LLM(ckpt, tensor_parallel_size=tp, **ENGINE)
    with pytest.raises(ValueError, match="intermediate"):
        local_config(ModelConfig(**{**CFG, "intermediate_size": 97}), 2)
    assert local_config(ModelConfig(**CFG), 2).num_key_value_heads == 1
    with pytest.raises(ValueError, match="checkpoint folder"):
        LLM(build_model(ModelConfig(**CFG)), tensor_parallel_size=2)


def test_plan_arithmetic_and_cli(capsys):
    from skyt1.sample import cli

    cfg = preset_config("qwen2.5-32b")
    rows = {(r["gpu"][:3], r["tp"]): r for r in plan_table(cfg)}
    r = rows[("80 ", 8)]
    # KV per token per rank at TP 8: K and V x 64 layers x 1 KV head x 128 dims x 2 bytes
    assert r["kv_tokens"] == int(r["kv_gib"] * 2**30 // (2 * 64 * 1 * 128 * 2))
    assert r["seqs_16k"] == r["kv_tokens"] // 16384 and r["seqs_32k"] == r["kv_tokens"] // 32768
    assert abs(rows[("80 ", 1)]["weights_gib"] - cfg.num_params() * 2 / 2**30) < 0.01
    assert rows[("141", 8)]["seqs_32k"] > rows[("141", 4)]["seqs_32k"] > rows[("80 ", 4)]["seqs_32k"]
    assert cli.main(["serve", "--plan"]) == 0
    out = capsys.readouterr().out
    assert "Qwen2.5-32B" in out and out.count("| 80 GB") == 4 and out.count("| 141 GB") == 4


def test_serve_tp2_answers_like_tp1(tmp_path, tiny_chat_checkpoint):
    """`skyt1-sample serve --tensor-parallel-size 2` (2 CPU processes, tied embeddings) and the openai client."""
    openai = pytest.importorskip("openai")
    path = _checkpoint(tmp_path / "tied", torch.randint(0, 2**31 - 1, ()).item(), tokenizer_dir=tiny_chat_checkpoint,
                       vocab_size=512, tie_word_embeddings=True)
    opts = ["--max-model-len", "96", "--block-size", "4", "--num-kv-blocks", "64", "--max-num-seqs", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "skyt1.sample", "serve", "--model", str(path), "--port", "0",
                             "--tensor-parallel-size", "2", *opts], stderr=subprocess.PIPE, text=True, env=env)
    lines, found = [], threading.Event()

    def drain():  # read stderr to the end, so the server never blocks on a full pipe
        for line in proc.stderr:
            lines.append(line)
            if re.search(r"http://127\.0\.0\.1:\d+", line):
                found.set()

    threading.Thread(target=drain, daemon=True).start()
    try:
        assert found.wait(timeout=90), "".join(lines)[-3000:]
        port = int(next(m.group(1) for ln in lines if (m := re.search(r"http://127\.0\.0\.1:(\d+)", ln))))
        assert any("KV cache:" in ln and "tensor-parallel" in ln for ln in lines)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        msgs = [{"role": "user", "content": "What is 3 + 4?"}]
        r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=16, temperature=0)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    ref = LLM(path, max_model_len=96, block_size=4, num_kv_blocks=64)
    want = ref.chat([msgs], SamplingParams(temperature=0, max_tokens=16))[0].outputs[0]
    assert r.choices[0].message.content == want.text and r.choices[0].finish_reason == want.finish_reason
    assert r.usage.completion_tokens == len(want.token_ids)
    assert proc.returncode == 0

