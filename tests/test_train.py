"""The training loop end to end on CPU (gloo): FSDP2 over 2 processes equals 1 process and plain PyTorch,
exact resume, the HF export against transformers, the tiny demo learning, and bad input refused before
any work.

The 1-process runs call skyt1.train.main in this process (a one-rank gloo group, destroyed at the end);
the 2-process runs launch two `python -m skyt1.train` ranks with torchrun's environment variables and a
file rendezvous (SKYT1_INIT_METHOD), gloo on the loopback interface.
"""
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from skyt1.config import load_train_config
from skyt1.model import build_model

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4

TINY = """
[model]
dtype = "float32"
init_seed = 7
tokenizer = "{tok}"
[model.shape]
vocab_size = 512
hidden_size = 32
intermediate_size = 64
num_hidden_layers = 2
num_attention_heads = 4
num_key_value_heads = 2
head_dim = 8
rope_theta = 10000.0
[data]
path = "{data}"
seed = 3
samples_per_step = 8
token_budget = 512
[optim]
lr = 3e-3
betas = [0.9, 0.95]
master = "fp32"
warmup_ratio = 0.25
clip = 1.0
[train]
epochs = 1
checkpoint_every = 2
keep_last = 5
activation_checkpointing = "full"
attention = "sdpa"
export_dtype = "float32"
seed = 0
"""


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _main(argv):
    """skyt1.train.main in this process, on one thread (robust when the cores are shared)."""
    from skyt1.train import main

    old_env, old_threads = os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()
    os.environ["OMP_NUM_THREADS"] = "1"  # init_distributed leaves the thread count alone when this is set
    torch.set_num_threads(1)
    try:
        return main(argv)
    finally:
        torch.set_num_threads(old_threads)
        if old_env is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = old_env


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A built synthetic dataset + tokenizer and a config for a 2-layer model."""
    from skyt1.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("train")
    syn = make_synthetic_dataset(root / "syn", n=96, seed=1, max_seq_len=512)
    cfg = root / "tiny.toml"
    cfg.write_text(TINY.format(tok=syn.tokenizer, data=syn.dataset))
    return root, cfg


@pytest.fixture(scope="module")
def run_one(tiny):
    """The uninterrupted 1-process run: STEPS steps, checkpoints every 2, HF export at the end."""
    root, cfg = tiny
    out = root / "one"
    rc = _main(["--config", str(cfg), "--train.output_dir", str(out), "--train.max_steps", str(STEPS)])
    assert rc == 0
    return out


def _reference_losses(cfg_path: Path, steps: int, overrides: list[str] = ()) -> list[float]:
    """The same training in plain PyTorch: unfused logits + F.cross_entropy, torch.optim.AdamW,
    torch's clip_grad_norm_, HF's cosine-with-warmup formula written out here."""
    from skyt1.data.loader import build_loader

    cfg = load_train_config(cfg_path, list(overrides))
    mcfg = cfg.model.shape
    model = build_model(mcfg, seed=cfg.model.init_seed)
    loader = build_loader(cfg.data.path, seed=cfg.data.seed, samples_per_step=cfg.data.samples_per_step,
                          token_budget=cfg.data.token_budget, pin_memory=False)
    total = loader.steps_per_epoch * cfg.train.epochs
    warmup = math.ceil(total * cfg.optim.warmup_ratio)

    def lr_lambda(step):
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                            weight_decay=cfg.optim.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    losses = []
    it = loader.iter_steps(1)
    for _ in range(steps):
        batch = next(it)
        total_loss = 0.0
        for mb in batch.micro_batches:
            hidden = model(mb.input_ids, mb.position_ids, mb.cu_seqlens, mb.max_seqlen)
            loss = F.cross_entropy(model.logits(hidden), mb.labels, ignore_index=-100,
                                   reduction="sum") / batch.loss_tokens
            loss.backward()
            total_loss += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(total_loss)
    it.close()
    return losses


def _run_two_ranks(cfg: Path, out: Path, extra: list[str]) -> str:
    return _run_ranks(cfg, out, extra, 2)


def _run_ranks(cfg: Path, out: Path, extra: list[str], world: int) -> str:
    """torchrun's environment for `world` ranks; the rendezvous is a file (no port to race for) and gloo
    talks over the loopback interface only. Returns the ranks' output."""
    store = out.parent / f".{out.name}.store"
    loopback = [name for _, name in socket.if_nameindex() if name.startswith("lo")]
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "SKYT1_INIT_METHOD": f"file://{store}", "OMP_NUM_THREADS": "1",
               "SKYT1_DEVICE": "cpu",  # gloo on CPU also on a one-GPU machine, where NCCL refuses 2 ranks
               **({"GLOO_SOCKET_IFNAME": loopback[0]} if loopback else {})}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "skyt1.train", "--config", str(cfg), "--train.output_dir", str(out), *extra],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return _all_succeed(procs, 240)


def _all_succeed(procs: list[subprocess.Popen], timeout: float) -> str:
    """Wait for every process (none outlives the call: a hang is killed), require exit 0; their output."""
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-4000:]
    return "\n".join(logs)


def test_two_processes_match_one_process_and_plain_pytorch(tiny, run_one):
    root, cfg = tiny
    out = root / "two"
    _run_two_ranks(cfg, out, ["--train.max_steps", str(STEPS), "--train.export", "false",
                              "--train.checkpoint_every", "0"])
    one, two = _losses(run_one), _losses(out)
    assert len(one) == len(two) == STEPS
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-5, (one, two)
    ref = _reference_losses(cfg, STEPS)
    assert max(abs(a - b) for a, b in zip(one, ref)) < 1e-5, (one, ref)
    assert one[-1] < one[0]  # it trains


def _hf_folder(cfg_path: Path, out: Path, overrides: list[str]) -> Path:
    """The reference model's initial weights as a HF checkpoint split over several safetensors files."""
    from skyt1.checkpoint import save_pretrained

    cfg = load_train_config(cfg_path, overrides)
    model = build_model(cfg.model.shape, seed=cfg.model.init_seed)
    save_pretrained(model, out, max_shard_bytes=40_000)
    assert len(list(out.glob("*.safetensors"))) > 1
    return out


def test_two_processes_tied_embeddings_from_hf_weights_match_plain_pytorch(tiny):
    """Qwen2.5-0.5B's layout (embedding and LM head share one matrix, kept in FSDP's root unit), an odd
    vocabulary (uneven shards: 258 + 257 rows), weights read by each rank from its rows of the files."""
    root, cfg = tiny
    shape = ["--model.shape.tie_word_embeddings", "true", "--model.shape.vocab_size", "515"]
    hf = _hf_folder(cfg, root / "hf_tied", shape)
    out = root / "two_tied"
    _run_two_ranks(cfg, out, [*shape, "--model.path", str(hf), "--train.max_steps", "3", "--train.export", "false",
                              "--train.checkpoint_every", "0"])
    two, ref = _losses(out), _reference_losses(cfg, 3, shape)
    assert max(abs(a - b) for a, b in zip(two, ref)) < 1e-5, (two, ref)


def test_layers_override_loads_the_first_blocks(tiny, tmp_path):
    """--model.layers 1 on a 2-layer checkpoint: block 0's weights (and embedding, norm, head) are used."""
    from skyt1.checkpoint import load_weights

    root, cfg = tiny
    hf = _hf_folder(cfg, tmp_path / "hf", [])
    out = tmp_path / "out"
    rc = _main(["--config", str(cfg), "--model.path", str(hf), "--model.layers", "1", "--train.max_steps", "1",
                "--train.output_dir", str(out), "--train.export", "false"])
    assert rc == 0
    mcfg = load_train_config(cfg).model.shape.replace(num_hidden_layers=1)
    model = build_model(mcfg)
    load_weights(model, hf, strict=False)
    from skyt1.data.loader import build_loader

    c = load_train_config(cfg)
    loader = build_loader(c.data.path, seed=c.data.seed, samples_per_step=c.data.samples_per_step,
                          token_budget=c.data.token_budget, pin_memory=False)
    it = loader.iter_steps(1)
    batch = next(it)
    it.close()
    with torch.no_grad():
        ref = sum(F.cross_entropy(model.logits(model(mb.input_ids, mb.position_ids, mb.cu_seqlens, mb.max_seqlen)),
                                  mb.labels, reduction="sum").item() for mb in batch.micro_batches) / batch.loss_tokens
    assert abs(_losses(out)[0] - ref) < 1e-5


def test_resume_after_a_kill_continues_exactly(tiny, run_one):
    root, cfg = tiny
    out = root / "resumed"
    out.mkdir()
    # What a run killed after step 3 leaves: the step-2 checkpoint, a half-written step-4 save, and a
    # folder with a checkpoint's name but no marker. Resume must take step 2.
    shutil.copytree(run_one / "step_00000002", out / "step_00000002")
    (out / ".step_00000004.tmp").mkdir()
    (out / ".step_00000004.tmp" / ".metadata").write_text("partial")
    shutil.copytree(run_one / "step_00000002", out / "step_00000003")
    (out / "step_00000003" / "COMPLETE").unlink()
    lines = (run_one / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n")  # steps 1-3 were logged before the kill
    rc = _main(["--config", str(cfg), "--train.output_dir", str(out), "--train.max_steps", str(STEPS),
                "--train.export", "false"])
    assert rc == 0
    full, resumed = _losses(run_one), _losses(out)
    assert len(resumed) == STEPS  # step 3's stale line was replaced, not duplicated
    assert resumed[2:] == full[2:], (full, resumed)  # bit-exact continuation


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_export_loads_in_transformers_with_equal_logits(tiny, run_one):
    transformers = pytest.importorskip("transformers")
    import torch.distributed.checkpoint as dcp

    from skyt1.parallel import install_loss_head

    cfg = load_train_config(tiny[1])
    # skyt1's model from the last distributed checkpoint (not from the export)
    ours = build_model(cfg.model.shape)
    install_loss_head(ours)
    state = {"model": ours.state_dict()}
    dcp.load(state, checkpoint_id=str(run_one / f"step_{STEPS:08d}"), no_dist=True)
    ours.load_state_dict(state["model"])
    export = run_one / "export"
    assert (export / "tokenizer.json").is_file() and (export / "config.json").is_file()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(export), dtype=torch.float32)
    hf.eval()
    ids = torch.randint(0, cfg.model.shape.vocab_size, (37,))
    with torch.no_grad():
        mine = ours.logits(ours(ids, torch.arange(37), torch.tensor([0, 37], dtype=torch.int32)))  # (T, V)
        theirs = hf(ids[None]).logits[0]  # (T, V)
    assert (mine - theirs).abs().max().item() < 1e-4, (mine - theirs).abs().max().item()
    assert mine.abs().max() > 0


def test_tiny_config_learns(tmp_path):
    """configs/tiny.toml as shipped (model, optimizer, synthetic data built on the fly), shortened."""
    out = tmp_path / "out"
    rc = _main(["--config", str(ROOT / "configs" / "tiny.toml"), "--data.path", str(tmp_path / "syn" / "dataset"),
                "--data.synthetic", "240", "--data.samples_per_step", "8", "--train.epochs", "1",
                "--train.max_steps", "18", "--train.output_dir", str(out), "--train.export", "false",
                "--train.checkpoint_every", "0"])
    assert rc == 0
    losses = _losses(out)
    assert losses[0] > 5.5  # ~ln(512) at random init
    assert losses[-1] < 0.6 * losses[0], losses


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tiny, capsys):
    root, cfg = tiny
    out = root / "diverge"
    rc = _main(["--config", str(cfg), "--train.output_dir", str(out), "--optim.lr", "1e30",
                "--optim.warmup_ratio", "0", "--optim.clip", "0", "--train.checkpoint_every", "1",
                "--train.max_steps", "3"])
    err = capsys.readouterr().err
    assert rc == 3
    assert "step 2: non-finite" in err and "step_00000001" in err, err
    assert (out / "step_00000001" / "COMPLETE").is_file()
    assert not (out / "step_00000002").exists() and not (out / "export").exists()


@pytest.mark.parametrize("extra, message", [
    (["--train.nonexistent", "1"], "unknown key 'train.nonexistent'"),
    (["--train.max_steps", "many"], "train.max_steps: expected an integer"),
    (["--data.path", "/nonexistent/data"], "data.path = '/nonexistent/data': no such folder"),
    (["--model.path", "/nonexistent/model"], "model.path = '/nonexistent/model': no such folder"),
    (["--model.tokenizer", "/nonexistent/tok"], "no tokenizer.json"),
    pytest.param(["--train.cpu_offload", "true"], "train.cpu_offload = true",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="offload works with a GPU")),
])
def test_bad_input_is_refused_before_work(tiny, tmp_path, capsys, extra, message):
    out = tmp_path / "never"
    rc = _main(["--config", str(tiny[1]), "--train.output_dir", str(out), *extra])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_output_folder_of_another_run_is_refused(tiny, run_one, capsys):
    before = sorted(p.name for p in run_one.iterdir())
    rc = _main(["--config", str(tiny[1]), "--train.output_dir", str(run_one), "--optim.lr", "5e-3"])
    err = capsys.readouterr().err
    assert rc == 2 and "holds checkpoints of another run" in err and "optim.lr" in err, err
    rc = _main(["--config", str(tiny[1]), "--train.output_dir", str(run_one), "--train.resume", "none"])
    assert rc == 2 and "already holds checkpoints" in capsys.readouterr().err
    assert sorted(p.name for p in run_one.iterdir()) == before


def test_plan_32b_fits_8_h100(capsys):
    rc = _main(["--config", str(ROOT / "configs" / "sky_t1_32b.toml"), "--plan", "--gpus", "8"])
    text = capsys.readouterr().out
    assert rc == 0, text
    headroom = float(text.split("headroom ")[1].split(" GiB")[0])
    assert headroom >= 4.0, text
    # and refuses what cannot fit, naming the knob
    rc = _main(["--config", str(ROOT / "configs" / "sky_t1_32b.toml"), "--plan", "--gpus", "8",
                "--optim.master", "fp32"])
    text = capsys.readouterr().out
    assert rc == 1 and "DOES NOT FIT" in text and "--optim.master bf16_sr" in text
