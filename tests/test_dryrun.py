"""The dry run (fake tensors, fake process group, torch's FSDPMemTracker) against the memory planner,
at full 32B width with few layers and 8 ranks: the plan must be within 10% of torch's measured peak."""
import json
from pathlib import Path

import pytest
import torch

from skyt1.config import load_train_config
from skyt1.memplan import CATEGORIES, GiB
from skyt1.train import main, memory_plan, resolve_model_config

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "sky_t1_32b.toml"


@pytest.mark.parametrize("overrides", [
    ["--model.layers", "2"],
    # a shorter micro-batch and another optimizer layout: the peak moves, the plan must follow
    ["--model.layers", "3", "--data.token_budget", "12288", "--optim.master", "bf16_kahan"],
    # the meshes: 32K micro-batches shared by 2 CP ranks (the K/V exchange), and HSDP over 2 x 4
    ["--model.layers", "2", "--data.token_budget", "32768", "--parallel.cp", "2"],
    ["--model.layers", "2", "--parallel.dp_replicate", "2"],
])
def test_plan_within_10_percent_of_measured_peak(overrides):
    from skyt1.dryrun import dry_run

    torch.set_num_threads(2)
    cfg = load_train_config(RECIPE, overrides)
    mcfg = resolve_model_config(cfg, need_path=False)
    res = dry_run(cfg, mcfg, gpus=8, gpu_mem_gib=79.6)
    assert abs(res.error) <= 0.10, (res.peak / GiB, res.plan.tracked_peak / GiB, res.measured)
    # Sharded state is exact arithmetic: the tracker and the plan must agree on it to the MiB.
    planned = res.plan.peak_breakdown()
    for label in ("sharded parameters", "sharded gradients", "optimizer state"):
        assert abs(res.measured[label] - planned[label]) < 2**20, label
    assert sum(res.measured.values()) == pytest.approx(res.peak)
    assert set(res.measured) == {label for label, _ in CATEGORIES}


def test_dry_run_command_prints_the_table_and_writes_a_record(tmp_path, capsys):
    record = tmp_path / "dry.json"
    rc = main(["--config", str(RECIPE), "--dry-run", "--gpus", "8", "--model.layers", "1",
               "--data.token_budget", "4096", "--dry-run-record", str(record)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "peak tracked by torch" in out and "optimizer state" in out and "plan peak" in out
    rec = json.loads(record.read_text())
    assert rec["gpus"] == 8 and rec["layers"] == 1 and rec["token_budget"] == 4096
    assert rec["measured_peak_gib"] > rec["gib"]["optimizer state"]["measured"] > 0
    assert not torch.distributed.is_initialized()  # the fake process group is gone


def test_refusal_uses_the_plan_the_dry_run_checks():
    # 32K tokens per micro-batch: torch measures ~84.8 GiB tracked on 8 ranks (bench/results), over an
    # 80GB H100's 79.6 before any reserve; the training run refuses it with the same plan.
    cfg = load_train_config(RECIPE, ["--data.token_budget", "32768"])
    plan, knob = memory_plan(cfg, resolve_model_config(cfg, need_path=False), 8, 79.6)
    assert not plan.fits and plan.tracked_peak / GiB > 80 and "--parallel.cp 2" in knob
    cfg = load_train_config(RECIPE, [])
    plan, _ = memory_plan(cfg, resolve_model_config(cfg, need_path=False), 8, 79.6)
    assert plan.fits and 66 < plan.tracked_peak / GiB < 70


def test_fp32_training_on_cuda_refused_when_dense_attention_cannot_fit(monkeypatch):
    from types import SimpleNamespace

    from skyt1.config import ConfigError
    from skyt1.train import check_fp32_on_cuda

    # A CPU machine posing as one 80GB GPU: the check reads only availability and capacity.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _i: SimpleNamespace(total_memory=80 * 10**9))
    monkeypatch.delenv("SKYT1_DEVICE", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "8")
    cfg = load_train_config(RECIPE, ["--model.dtype", "float32", "--optim.master", "fp32"])
    with pytest.raises(ConfigError, match="model.dtype = 'float32' on CUDA.*dense 16384 x 16384"):
        check_fp32_on_cuda(cfg, resolve_model_config(cfg, need_path=False))
    check_fp32_on_cuda(load_train_config(RECIPE, []), resolve_model_config(cfg, need_path=False))  # bf16: fine
    tiny = load_train_config(ROOT / "configs" / "tiny.toml", ["--model.dtype", "float32"])
    check_fp32_on_cuda(tiny, resolve_model_config(tiny, need_path=False))  # small enough to fit densely
