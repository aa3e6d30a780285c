"""The device mesh end to end on CPU (gloo, file rendezvous, loopback): HSDP 2 x 2 and context parallel x
FSDP 2 x 2 against one process, checkpoints resumed across mesh shapes, bad meshes refused before any
work, CP-ready loader shares and the opt-in token-defined step.

Reuses tests/test_train.py's tiny model, data and launchers (the 1-process reference run is its
run_one fixture).
"""
import shutil

import numpy as np
import pytest
import torch
from test_train import ROOT, STEPS, _losses, _main, _run_ranks, run_one, tiny  # noqa: F401  (fixtures)

from skyt1.config import ConfigError, ParallelSection, load_train_config
from skyt1.parallel import resolve_mesh


def _weights(ckpt) -> dict[str, torch.Tensor]:
    """A distributed checkpoint's model weights, read into a plain model (any mesh wrote it)."""
    import torch.distributed.checkpoint as dcp

    from skyt1.model import build_model
    from skyt1.parallel import install_loss_head
    from skyt1.train_checkpoint import saved_config

    model = build_model(saved_config(ckpt).model.shape)
    install_loss_head(model)
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=str(ckpt), no_dist=True)
    return state["model"]


def _assert_same_weights(a, b, atol=1e-5):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    worst = max(((k, (wa[k] - wb[k]).abs().max().item()) for k in wa), key=lambda kv: kv[1])
    assert worst[1] <= atol, worst


@pytest.fixture(scope="module")
def run_hsdp(tiny):  # noqa: F811
    """4 processes, 2 replica groups x 2 shards: STEPS steps, checkpoints every 2."""
    root, cfg = tiny
    out = root / "hsdp"
    _run_ranks(cfg, out, ["--parallel.dp_replicate", "2", "--train.max_steps", str(STEPS), "--train.export", "false"],
               4)
    return out


def test_hsdp_2x2_matches_one_process(run_hsdp, run_one):  # noqa: F811
    one, hsdp = _losses(run_one), _losses(run_hsdp)
    assert len(hsdp) == STEPS
    assert max(abs(a - b) for a, b in zip(one, hsdp)) < 1e-5, (one, hsdp)
    _assert_same_weights(run_one / f"step_{STEPS:08d}", run_hsdp / f"step_{STEPS:08d}")
    toml = (run_hsdp / f"step_{STEPS:08d}" / "train_config.toml").read_text()
    assert "dp_replicate = 2" in toml


def _killed_while_saving(src, out, step: int):
    """What a run killed while saving step + 1 leaves: src's checkpoint of `step`, a half-written save of
    step + 1, and the metrics lines of the steps up to step + 1."""
    out.mkdir()
    shutil.copytree(src / f"step_{step:08d}", out / f"step_{step:08d}")
    (out / f".step_{step + 1:08d}.tmp").mkdir()
    (out / f".step_{step + 1:08d}.tmp" / ".metadata").write_text("partial")
    lines = (src / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join(lines[:step + 1]) + "\n")


def test_cp_x_fsdp_resumes_an_hsdp_checkpoint_and_matches_one_process(tiny, run_hsdp, run_one):  # noqa: F811
    """The 2 x 2 HSDP checkpoint resumed as 2 FSDP shards x 2 context-parallel ranks: each micro-batch's
    tokens split over 2 ranks, K/V exchanged; the steps after the resume equal the 1-process run's. Then
    that run killed while saving step 4 and resumed on the same mesh continues bit-exactly."""
    root, cfg = tiny
    mesh = ["--parallel.cp", "2", "--parallel.dp_shard", "2", "--train.max_steps", str(STEPS), "--train.export",
            "false", "--train.checkpoint_every", "1"]
    out = root / "cp_fsdp"
    _killed_while_saving(run_hsdp, out, 2)
    _run_ranks(cfg, out, mesh, 4)
    one, cp = _losses(run_one), _losses(out)
    assert len(cp) == STEPS
    assert max(abs(a - b) for a, b in zip(one[2:], cp[2:])) < 1e-5, (one, cp)
    _assert_same_weights(run_one / f"step_{STEPS:08d}", out / f"step_{STEPS:08d}")

    again = root / "cp_fsdp_again"
    _killed_while_saving(out, again, 3)
    _run_ranks(cfg, again, mesh, 4)
    assert _losses(again) == cp  # bit-exact on the same mesh
    _assert_same_weights(out / f"step_{STEPS:08d}", again / f"step_{STEPS:08d}", atol=0.0)


def test_hsdp_resumes_bit_exactly_on_its_mesh_and_as_4_flat_ranks(tiny, run_hsdp, run_one):  # noqa: F811
    """Killed while saving step 3: resumed on the same 2 x 2 HSDP mesh it continues bit-exactly; resumed
    as flat FSDP over the same 4 ranks (4 x 1) it continues as the 1-process run does."""
    root, cfg = tiny
    common = ["--train.max_steps", str(STEPS), "--train.export", "false"]
    same = root / "hsdp_again"
    _killed_while_saving(run_hsdp, same, 2)
    _run_ranks(cfg, same, ["--parallel.dp_replicate", "2", *common], 4)
    assert _losses(same) == _losses(run_hsdp)  # bit-exact on the same mesh
    _assert_same_weights(run_hsdp / f"step_{STEPS:08d}", same / f"step_{STEPS:08d}", atol=0.0)

    flat = root / "hsdp_as_flat"
    _killed_while_saving(run_hsdp, flat, 2)
    _run_ranks(cfg, flat, common, 4)
    one, four = _losses(run_one), _losses(flat)
    assert max(abs(x - y) for x, y in zip(one[2:], four[2:])) < 1e-5, (one, four)
    _assert_same_weights(run_one / f"step_{STEPS:08d}", flat / f"step_{STEPS:08d}")


def test_one_process_resumes_an_hsdp_checkpoint(tiny, run_hsdp, run_one, tmp_path):  # noqa: F811
    root, cfg = tiny
    out = tmp_path / "flat"
    _killed_while_saving(run_hsdp, out, 2)
    assert _main(["--config", str(cfg), "--train.output_dir", str(out), "--train.max_steps", str(STEPS),
                  "--train.export", "false"]) == 0
    one, flat = _losses(run_one), _losses(out)
    assert max(abs(a - b) for a, b in zip(one[2:], flat[2:])) < 1e-5, (one, flat)
    _assert_same_weights(run_one / f"step_{STEPS:08d}", out / f"step_{STEPS:08d}")


# ------------------------------------------------------------------------------------------------
# bad meshes
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("parallel, world, budget, message", [
    (dict(dp_shard=3), 4, 512, "dp_replicate x dp_shard x cp = 1 x 3 x 1 = 3, but the run has 4 ranks"),
    (dict(dp_replicate=3), 4, 512, "parallel.dp_replicate = 3: the 4 ranks do not divide into 3 replica groups"),
    (dict(cp=3), 4, 512, "parallel.cp = 3: a replica group of 4 ranks does not divide"),
    (dict(cp=2), 4, 510, "data.token_budget = 510 does not split into the 2 x 2 equal chunks"),
])
def test_bad_mesh_is_a_clear_error(parallel, world, budget, message):
    with pytest.raises(ConfigError) as e:
        resolve_mesh(ParallelSection(**parallel), world, token_budget=budget)
    assert message in str(e.value)


def test_mesh_shapes_and_rank_layout():
    m = resolve_mesh(ParallelSection(dp_replicate=2, cp=2), 16, token_budget=32768, local_world_size=8)
    assert (m.dp_replicate, m.dp_shard, m.cp, m.dp_size, m.shard_size) == (2, 4, 2, 8, 8)
    # CP groups are consecutive ranks; each shard group of dp_shard x cp ranks is one node
    assert [m.dp_rank(r) for r in range(4)] == [0, 0, 1, 1] and [m.cp_rank(r) for r in range(4)] == [0, 1, 0, 1]
    assert resolve_mesh(ParallelSection(), 8).describe() == "FSDP 8"
    assert m.describe() == "HSDP 2 replicas x 4 x CP 2, weights sharded over 8"
    with pytest.raises(ConfigError, match="straddle nodes"):
        resolve_mesh(ParallelSection(dp_replicate=2, dp_shard=3), 6, local_world_size=4)


@pytest.mark.parametrize("extra, message", [
    (["--parallel.dp_shard", "3"], "dp_replicate x dp_shard x cp = 1 x 3 x 1 = 3, but the run has 4 ranks"),
    (["--parallel.dp_replicate", "3"], "the 4 ranks do not divide into 3 replica groups"),
    (["--parallel.cp", "2", "--data.token_budget", "514"], "does not split into the 2 x 2 equal chunks"),
])
def test_bad_mesh_is_refused_before_work(tiny, tmp_path, capsys, monkeypatch, extra, message):  # noqa: F811
    monkeypatch.setenv("WORLD_SIZE", "4")  # what torchrun would set; no process group is made
    out = tmp_path / "never"
    assert _main(["--config", str(tiny[1]), "--train.output_dir", str(out), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# CP-ready loader shares, token-defined steps
# ------------------------------------------------------------------------------------------------
def test_cp_loader_shares_cover_each_micro_batch(tiny):  # noqa: F811
    from skyt1.data.batch import IGNORE_INDEX
    from skyt1.data.loader import build_loader

    cfg = load_train_config(tiny[1])
    kw = dict(seed=cfg.data.seed, samples_per_step=cfg.data.samples_per_step, token_budget=cfg.data.token_budget,
              pin_memory=False, prefetch=1)
    whole = build_loader(cfg.data.path, **kw).make_step(0, 1)
    shares = [build_loader(cfg.data.path, cp=2, cp_rank=c, **kw).make_step(0, 1) for c in range(2)]
    assert [len(s.micro_batches) for s in shares] == [len(whole.micro_batches)] * 2
    assert sum(s.tokens for s in shares) == whole.tokens
    for j, mb in enumerate(whole.micro_batches):
        a, b = shares[0].micro_batches[j], shares[1].micro_batches[j]
        assert a.num_tokens == b.num_tokens <= cfg.data.token_budget // 2 + mb.num_docs
        got = torch.cat([a.labels, b.labels])
        assert sorted(got[got != IGNORE_INDEX].tolist()) == sorted(mb.labels[mb.labels != IGNORE_INDEX].tolist())
        assert a.cp is not None and int(a.cp.kv_index.max()) < 2 * a.num_tokens


def test_token_defined_steps_fill_micro_batches_at_any_world_size():
    from skyt1.data.packer import Packer, packing_report

    rng = np.random.default_rng()
    lengths = np.clip(rng.lognormal(np.log(1024), 0.8, 3000), 60, 4096).astype(np.int64)
    budget = 4096
    for world in (8, 64):
        fixed = Packer(lengths, lengths, seed=1, samples_per_step=96, token_budget=budget, world_size=world)
        k = max(1, round(96 * lengths.mean() / (world * budget)))  # micro-batches per rank, as bench/packing.py
        tok = Packer(lengths, lengths, seed=1, samples_per_step=96, token_budget=budget, world_size=world,
                     step_tokens=int(0.97 * k * world * budget))
        plans = tok.plan_epoch(0)
        # every document exactly once per epoch, in the epoch's order, no empty step
        assert np.array_equal(np.concatenate([p.doc_ids for p in plans]), tok.epoch_order(0))
        assert min(len(p.doc_ids) for p in plans) > 0
        eff_fixed = packing_report(fixed.plan_epoch(0), lengths, budget)["slot_efficiency"]
        eff_tok = packing_report(plans, lengths, budget)["slot_efficiency"]
        assert eff_tok > 0.85 and eff_tok > eff_fixed, (world, eff_fixed, eff_tok)
        if world == 64:  # 96 samples cannot fill 64 ranks' micro-batches; a step of 64 budgets' tokens can
            assert eff_fixed < 0.6 and eff_tok > eff_fixed + 0.25, (world, eff_fixed, eff_tok)


def test_samples_per_step_is_rounded_to_the_ranks_with_a_warning(tiny, capsys):  # noqa: F811
    from skyt1.train import samples_per_step

    cfg = load_train_config(tiny[1], ["--data.samples_per_step", "6"])
    assert samples_per_step(cfg, 4, True) == 6 and capsys.readouterr().out == ""
    assert samples_per_step(cfg, 16, True) == 16
    assert "data.samples_per_step = 6 is fewer than the 16 data-parallel ranks; using 16" in capsys.readouterr().out


def test_plan_32b_at_32k_fits_8_h100_with_cp_2(capsys):
    cfg = str(ROOT / "configs" / "sky_t1_32b_32k.toml")

    def plan(*extra):
        rc = _main(["--config", cfg, "--plan", *extra])
        return rc, capsys.readouterr().out

    def peak(text):
        return float(text.split("peak per GPU")[1].split("GiB")[0])

    rc, one_node = plan("--gpus", "8")
    assert rc == 0 and "FSDP 4 x CP 2, weights sharded over 8" in one_node, one_node
    assert float(one_node.split("headroom ")[1].split(" GiB")[0]) >= 4.0, one_node
    rc, text = plan("--gpus", "8", "--parallel.cp", "1")
    assert rc == 1 and "DOES NOT FIT" in text and "set --parallel.cp 2" in text, text
    assert peak(text) > peak(one_node) + 10  # CP halves the per-GPU activations
    # two nodes as HSDP: the state is sharded within a node, so a GPU holds what it holds on one node
    rc, two_nodes = plan("--gpus", "16", "--parallel.dp_replicate", "2")
    assert rc == 0 and "HSDP 2 replicas x 4 x CP 2, weights sharded over 8" in two_nodes, two_nodes
    assert peak(two_nodes) == peak(one_node)
    rc, flat16 = plan("--gpus", "16")  # flat FSDP over 16 shards the state twice as thin
    assert peak(flat16) < peak(one_node) - 20
