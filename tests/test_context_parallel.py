"""Context parallelism: the zigzag split and its K/V exchange against one rank's attention, loss and gradients.

The split is checked in this process (each CP rank's attention over the concatenated shares equals
full varlen attention, labels and positions kept, work balanced). The exchange is checked with 2 gloo
processes (file rendezvous, loopback): a batch of one long document that does not split evenly and
several short ones, through the whole model (MHA and GQA), against the same model on the whole batch
in each process: the summed loss and every parameter gradient (summed over the CP ranks, as FSDP does).
This file is also the worker: `python tests/test_context_parallel.py RANK WORLD STORE OUT`.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from skyt1.attention import varlen_attention  # noqa: E402
from skyt1.context_parallel import shard_batch, zigzag_chunks  # noqa: E402
from skyt1.data.batch import IGNORE_INDEX, pack_arrays  # noqa: E402


def _random_batch(rng: np.random.Generator, lengths, vocab: int = 64):
    lengths = np.asarray(lengths)
    total = int(lengths.sum())
    return pack_arrays(rng.integers(0, vocab, total), rng.random(total) < 0.8, lengths)


def _owned(lengths, cp: int) -> list[np.ndarray]:
    """[rank] -> indices into the micro-batch of the tokens that rank holds, in its order."""
    cu = np.concatenate([[0], np.cumsum(lengths)])
    own = [[] for _ in range(cp)]
    for d, n in enumerate(lengths):
        for c, chunks in enumerate(zigzag_chunks(int(n), cp)):
            for a, e in chunks:
                own[c].extend(range(cu[d] + a, cu[d] + e))
    return [np.asarray(o, dtype=np.int64) for o in own]


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_shards_attend_exactly_as_the_whole_batch(cp):
    rng = np.random.default_rng()
    lengths = [int(rng.integers(20 * cp, 40 * cp)) | 1, *rng.integers(1, 9, size=int(rng.integers(2, 6))).tolist()]
    rng.shuffle(lengths)
    mb = _random_batch(rng, lengths)
    hq, hkv, d = 4, 2, 8
    q, k, v = torch.randn(mb.num_tokens, hq, d), torch.randn(mb.num_tokens, hkv, d), torch.randn(mb.num_tokens, hkv, d)
    ref = varlen_attention(q, k, v, mb.cu_seqlens, mb.max_seqlen, backend="sdpa")  # (T, Hq, D)
    own = _owned(lengths, cp)
    shards = [shard_batch(mb, cp, c, pad_id=0) for c in range(cp)]
    t_local = shards[0].num_tokens
    assert all(s.num_tokens == t_local for s in shards) and t_local == max(len(o) for o in own)

    def local(x, c):  # this rank's rows, zero-padded to the group's length
        return torch.cat([x[own[c]], x.new_zeros((t_local - len(own[c]), *x.shape[1:]))])

    k_all = torch.cat([local(k, c) for c in range(cp)])  # what the all-gather returns
    v_all = torch.cat([local(v, c) for c in range(cp)])
    for c, s in enumerate(shards):
        n = len(own[c])
        out = varlen_attention(local(q, c), k_all[s.cp.kv_index], v_all[s.cp.kv_index], s.cu_seqlens, s.max_seqlen,
                               s.cp.cu_seqlens_k, s.cp.max_seqlen_k, backend="sdpa")
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out[:n], ref[own[c]], atol=1e-6, rtol=1e-5)
        assert torch.equal(s.position_ids[:n], mb.position_ids[own[c]])    # RoPE positions kept
        assert torch.equal(s.labels[:n], mb.labels[own[c]])                # next-token labels kept
        assert (s.labels[n:] == IGNORE_INDEX).all()                        # padding carries no loss
    # every token lands on exactly one rank
    assert sorted(np.concatenate(own).tolist()) == list(range(mb.num_tokens))


def test_zigzag_balances_causal_work():
    """Rank c holds chunks c and 2cp-1-c: the causal work (keys seen) per rank is within a chunk's worth."""
    for length, cp in ((32768, 4), (1001, 2), (777, 8)):
        work = [sum(sum(range(a + 1, e + 1)) for a, e in chunks) for chunks in zigzag_chunks(length, cp)]
        contiguous = [sum(range(i * length // cp + 1, (i + 1) * length // cp + 1)) for i in range(cp)]
        assert max(work) / min(work) < 1 + 4 * cp / length
        assert max(contiguous) / min(contiguous) > 2  # what the zigzag avoids


# ------------------------------------------------------------------------------------------------
# 2 processes
# ------------------------------------------------------------------------------------------------
LENGTHS = [67, 5, 1, 12, 3]  # the long one does not split into 4 equal chunks


def _worker(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist

    from skyt1.config import ModelConfig
    from skyt1.context_parallel import make_cp_attention
    from skyt1.model import build_model
    from skyt1.parallel import install_loss_head

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    group = dist.new_group(list(range(world)))
    seed = int(os.environ["CP_TEST_SEED"])
    rng = np.random.default_rng(seed)
    mb = _random_batch(rng, LENGTHS, vocab=96)
    loss_tokens = int((mb.labels != IGNORE_INDEX).sum())
    result = {}
    for name, kv_heads in (("mha", 4), ("gqa", 2)):
        cfg = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=8, rope_theta=10000.0)
        model = build_model(cfg, seed=seed % 1000 + kv_heads)
        install_loss_head(model)
        # the single-rank run on the whole batch
        hidden = model(mb.input_ids, mb.position_ids, mb.cu_seqlens, mb.max_seqlen,
                       lambda _i, q, k, v: varlen_attention(q, k, v, mb.cu_seqlens, mb.max_seqlen, backend="sdpa"))
        ref_loss = model.lm_head(hidden, mb.labels) / loss_tokens
        ref_loss.backward()
        ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        # this rank's share, attention over the group's K/V
        share = shard_batch(mb, world, rank)
        attn = make_cp_attention("sdpa", group)(share)
        hidden = model(share.input_ids, share.position_ids, share.cu_seqlens, share.max_seqlen, attn)
        loss = model.lm_head(hidden, share.labels) / loss_tokens
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        errs = {}
        for n, p in model.named_parameters():
            g = p.grad.clone()
            dist.all_reduce(g)  # the CP ranks' contributions to one gradient (FSDP's reduction, here a sum)
            errs[n] = ((g - ref_grads[n]).abs().max() / ref_grads[n].abs().max().clamp_min(1e-12)).item()
        result[name] = {"loss": total.item(), "ref_loss": ref_loss.item(), "grad_rel_err": errs}
    dist.destroy_process_group()
    Path(out).write_text(json.dumps(result))


def test_two_cp_ranks_match_one_rank_loss_and_every_gradient(tmp_path):
    loopback = [name for _, name in socket.if_nameindex() if name.startswith("lo")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CP_TEST_SEED": str(int(np.random.default_rng().integers(1 << 30))),
           **({"GLOO_SOCKET_IFNAME": loopback[0]} if loopback else {})}
    procs = [subprocess.Popen([sys.executable, __file__, str(r), "2", str(tmp_path / "store"), str(tmp_path / f"r{r}")],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    try:
        logs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-3000:]
    for r in range(2):
        res = json.loads((tmp_path / f"r{r}").read_text())
        for name in ("mha", "gqa"):
            case = res[name]
            assert abs(case["loss"] - case["ref_loss"]) < 1e-5 * max(1.0, abs(case["ref_loss"])), (name, case)
            assert len(case["grad_rel_err"]) == 2 * 12 + 3  # every parameter: 12 per block + embed, norm, head
            worst = max(case["grad_rel_err"].items(), key=lambda kv: kv[1])
            assert worst[1] < 1e-5, (name, worst)


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
