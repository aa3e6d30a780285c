"""An operator's faults, each reproduced: damaged checkpoints (resume falls back, bit-exact), a torn
metrics line, a full disk, a read-only output folder, a foreign run's folder (the advice printed works
when followed), another torch thread count, and the data builder's bad rows, killed builds and
concurrent builds.

The training runs reuse test_train's tiny model, data and uninterrupted run (`run_one`: 4 steps,
checkpoints at 2 and 4). Real file-system faults use a small tmpfs where this process may mount one
(root with CAP_SYS_ADMIN); the same faults are also provoked by a patched call, so they run anywhere.
"""
import errno
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from test_train import ROOT, STEPS, _all_succeed, _losses, _main, run_one, tiny  # noqa: F401 - fixtures used below

from skyt1.train_checkpoint import MANIFEST, verify_checkpoint


def _damage(path: Path, how: str) -> None:
    if how == "truncate":
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)
    elif how == "delete":
        path.unlink()
    else:  # flip one byte, same size: only the checksum can tell
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


def _copy_run(run_one: Path, out: Path, steps=(2, 4)) -> None:
    out.mkdir()
    for s in steps:
        shutil.copytree(run_one / f"step_{s:08d}", out / f"step_{s:08d}")
    shutil.copy(run_one / "metrics.jsonl", out / "metrics.jsonl")


@pytest.mark.parametrize("how, name", [("truncate", "__0_0.distcp"), ("delete", "rank00000.pt"),
                                       ("flip", ".metadata"), ("flip", "__0_0.distcp"),
                                       ("flip", "train_config.toml")])
def test_damaged_newest_checkpoint_falls_back_and_continues_exactly(tiny, run_one, tmp_path, capsys, how, name):
    root, cfg = tiny
    out = tmp_path / "out"
    _copy_run(run_one, out)
    _damage(out / "step_00000004" / name, how)
    rc = _main(["--config", str(cfg), "--train.output_dir", str(out), "--train.max_steps", str(STEPS),
                "--train.export", "false"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert f"step_00000004/{name}" in text and "damaged" in text, text
    assert f"resumed from {out / 'step_00000002'} at step 2" in text, text
    full, resumed = _losses(run_one), _losses(out)
    assert resumed == full, (full, resumed)  # steps 3-4 redone bit-exactly, their old lines replaced
    assert verify_checkpoint(out / "step_00000004").ok  # the damaged one was replaced by a good one


def test_damaged_explicit_resume_is_refused_naming_the_file(tiny, run_one, tmp_path, capsys):
    root, cfg = tiny
    out = tmp_path / "out"
    _copy_run(run_one, out)
    ckpt = out / "step_00000004"
    _damage(ckpt / "__0_0.distcp", "truncate")  # found by the size check, before any process group
    args = ["--config", str(cfg), "--train.output_dir", str(tmp_path / "new"), "--train.resume", str(ckpt)]
    assert _main(args) == 2
    assert f"{ckpt}/__0_0.distcp" in capsys.readouterr().err
    shutil.rmtree(ckpt)
    shutil.copytree(run_one / "step_00000004", ckpt)
    _damage(ckpt / ".metadata", "flip")  # found by the checksums, read by the ranks together
    assert _main(args) == 3
    err = capsys.readouterr().err
    assert f"{ckpt}/.metadata: checksum" in err and "corrupted" in err, err
    assert not (tmp_path / "new" / "metrics.jsonl").exists()


def test_verify_checkpoint_command(run_one, tmp_path, capsys):
    assert _main(["--verify-checkpoint", str(run_one)]) == 0
    text = capsys.readouterr().out
    assert text.count("ok ") == 2 and "torch_threads 1" in text, text
    bad = tmp_path / "step_00000004"
    shutil.copytree(run_one / "step_00000004", bad)
    _damage(bad / "rank00000.pt", "flip")
    assert _main(["--verify-checkpoint", str(bad)]) == 1
    assert f"DAMAGED  {bad}/rank00000.pt: checksum" in capsys.readouterr().out


def test_checkpoint_without_manifest_is_accepted_with_a_warning(tiny, run_one, tmp_path, capsys):
    """Checkpoints written before manifests existed: resumed (exactly), with a warning that only the
    presence of their files could be checked."""
    root, cfg = tiny
    out = tmp_path / "out"
    _copy_run(run_one, out, steps=(2,))
    (out / "step_00000002" / MANIFEST).unlink()
    rc = _main(["--config", str(cfg), "--train.output_dir", str(out), "--train.max_steps", str(STEPS),
                "--train.export", "false"])
    text = capsys.readouterr().out
    assert rc == 0 and f"warning: {out / 'step_00000002'}: no {MANIFEST}" in text, text
    assert _losses(out) == _losses(run_one)


def test_torn_metrics_line_is_cut(tiny, run_one, tmp_path, capsys):
    root, cfg = tiny
    out = tmp_path / "out"
    _copy_run(run_one, out, steps=(2,))
    lines = (run_one / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:25])  # killed mid-write
    rc = _main(["--config", str(cfg), "--train.output_dir", str(out), "--train.max_steps", str(STEPS),
                "--train.export", "false"])
    text = capsys.readouterr().out
    assert rc == 0 and "cut a torn last line (25 bytes" in text, text
    assert _losses(out) == _losses(run_one)


def test_another_thread_count_is_warned_about(tiny, run_one, tmp_path, capsys, monkeypatch):
    import torch

    root, cfg = tiny
    out = tmp_path / "out"
    _copy_run(run_one, out, steps=(2,))
    manifest = json.loads((out / "step_00000002" / MANIFEST).read_text())
    assert manifest["environment"]["torch_threads"] == 1 and manifest["environment"]["world_size"] == 1
    assert manifest["environment"]["device"] == "cpu"
    real = torch.get_num_threads
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)  # what run_environment reads at resume
    try:
        rc = _main(["--config", str(cfg), "--train.output_dir", str(out), "--train.max_steps", "3",
                    "--train.export", "false"])
    finally:
        monkeypatch.setattr(torch, "get_num_threads", real)
    text = capsys.readouterr().out
    assert rc == 0 and "torch threads: 1 when saved, 3 now" in text, text


# ---- a full disk ----------------------------------------------------------------------------------
def _mount_tmpfs(path: Path, size: str, read_only: bool = False) -> None:
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}); the patched variant of "
                    "this fault runs instead")


@pytest.fixture
def tmpfs(tmp_path):
    mounted = []

    def mount(name: str, size: str, read_only: bool = False) -> Path:
        path = tmp_path / name
        _mount_tmpfs(path, size, read_only)
        mounted.append(path)
        return path
    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _checkpoint_bytes(ckpt: Path) -> int:
    return sum(p.stat().st_size for p in ckpt.iterdir())


def test_full_disk_refused_before_writing(tiny, tmp_path, capsys, monkeypatch):
    """The free space is checked against the previous checkpoint's size before a save begins (patched:
    runs anywhere)."""
    import skyt1.train_checkpoint as tc

    root, cfg = tiny
    out = tmp_path / "out"
    real = tc._free_bytes
    monkeypatch.setattr(tc, "_free_bytes",
                        lambda p: 10_000 if (out / "step_00000001").exists() else real(p))
    rc = _main(["--config", str(cfg), "--train.output_dir", str(out), "--train.max_steps", "3",
                "--train.checkpoint_every", "1", "--train.export", "false"])
    err = capsys.readouterr().err
    assert rc == 3
    assert "the disk is full: it needs ~" in err and "0.0 MiB is free" in err and "nothing was written" in err, err
    assert f"the previous checkpoint {out / 'step_00000001'} is intact" in err, err
    assert verify_checkpoint(out / "step_00000001").ok
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "step_00000001", "train_config.toml"]


def test_full_disk_during_a_save_on_a_real_tmpfs(tiny, run_one, tmpfs, capsys, monkeypatch):
    """ENOSPC in the middle of writing (the estimate patched to 0 so the pre-check passes): a clear
    message, the partial save removed, the previous checkpoint intact and resumable."""
    import skyt1.train_checkpoint as tc

    root, cfg = tiny
    one = _checkpoint_bytes(run_one / "step_00000002")
    disk = tmpfs("disk", f"{int(one * 1.5) // 1024 + 64}k")
    out = disk / "out"
    monkeypatch.setattr(tc, "estimate_checkpoint_bytes", lambda previous, state_bytes: 0)
    rc = _main(["--config", str(cfg), "--train.output_dir", str(out), "--train.max_steps", "3",
                "--train.checkpoint_every", "1", "--train.export", "false"])
    err = capsys.readouterr().err
    assert rc == 3 and "saving checkpoint" in err and "the disk is full" in err, err
    assert "unexpected pos" not in err and "Traceback" not in err
    assert f"the previous checkpoint {out / 'step_00000001'} is intact" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "step_00000001", "train_config.toml"]
    assert verify_checkpoint(out / "step_00000001").ok


# ---- a read-only output folder --------------------------------------------------------------------
@pytest.mark.parametrize("how", ["mount", "patched"])
def test_read_only_output_is_refused_before_work(tiny, tmp_path, tmpfs, capsys, monkeypatch, how):
    root, cfg = tiny
    if how == "mount":
        ro = tmpfs("ro", "1m", read_only=True)
    else:  # root ignores permission bits, so a read-only file system is simulated at the os call
        ro = tmp_path / "ro"
        ro.mkdir()
        real_open = os.open

        def read_only_open(path, flags, *args, **kw):
            if str(path).startswith(str(ro)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return real_open(path, flags, *args, **kw)
        monkeypatch.setattr(os, "open", read_only_open)
    rc = _main(["--config", str(cfg), "--train.output_dir", str(ro / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and f"train.output_dir = '{ro / 'run'}': cannot create files in {ro} (a read-only file system)" \
        in err, err
    if how == "mount":
        from skyt1.data.__main__ import main as data_cli
        rows = tmp_path / "rows.jsonl"
        rows.write_text(json.dumps({"conversations": [{"from": "user", "value": "q"},
                                                      {"from": "assistant", "value": "a"}]}) + "\n")
        tok = json.loads(cfg.read_text().split('tokenizer = ')[1].split("\n")[0])
        assert data_cli(["build", "--input", str(rows), "--tokenizer", tok, "--output", str(ro / "ds"),
                         "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "cannot write there (a read-only file system)" in err, err


# ---- another run's folder: the advice printed works when followed ---------------------------------
def test_foreign_run_advice_works_when_followed(tiny, run_one, tmp_path, capsys):
    root, cfg = tiny
    other_shape = ["--model.shape.hidden_size", "64", "--model.shape.head_dim", "16"]
    rc = _main(["--config", str(cfg), "--train.output_dir", str(run_one), *other_shape])
    err = capsys.readouterr().err
    assert rc == 2 and "another model: hidden_size: 64 here vs 32 in the checkpoint" in err, err
    assert "--train.resume" not in err  # resuming it would fail on the first tensor: not suggested
    # advice 1: another output folder for this run
    assert "choose another --train.output_dir" in err
    rc = _main(["--config", str(cfg), "--train.output_dir", str(tmp_path / "mine"), *other_shape,
                "--train.max_steps", "1", "--train.export", "false"])
    assert rc == 0, capsys.readouterr().err
    # advice 2: continue that run with its own configuration
    saved = err.split("--config ")[-1].split()[0]
    rc = _main(["--config", saved, "--train.output_dir", str(run_one), "--train.max_steps", str(STEPS)])
    assert rc == 0 and "nothing to train" in capsys.readouterr().out
    # an explicit resume across shapes is refused, not a size-mismatch traceback
    rc = _main(["--config", str(cfg), "--train.output_dir", str(tmp_path / "x"), *other_shape,
                "--train.resume", str(run_one / "step_00000002")])
    err = capsys.readouterr().err
    assert rc == 2 and "holds another model (hidden_size: 64 here vs 32" in err, err
    # same shape, another learning rate: the resume advice is offered, and works
    rc = _main(["--config", str(cfg), "--train.output_dir", str(run_one), "--optim.lr", "5e-3"])
    err = capsys.readouterr().err
    assert rc == 2 and "--train.resume" in err, err
    ckpt = err.split("--train.resume ")[1].split()[0]
    rc = _main(["--config", str(cfg), "--train.output_dir", str(tmp_path / "lr"), "--optim.lr", "5e-3",
                "--train.resume", ckpt, "--train.max_steps", str(STEPS + 1), "--train.epochs", "2",
                "--train.export", "false"])
    assert rc == 0, capsys.readouterr().err


# ---- data builds ----------------------------------------------------------------------------------
_BUILD = """
import sys
from skyt1.data.synthetic import make_synthetic_dataset
syn = make_synthetic_dataset(sys.argv[1], n=int(sys.argv[2]), seed=5, max_seq_len=512)
print(syn.dataset)
"""


def test_concurrent_synthetic_builds_take_turns(tmp_path):
    """Two runs building the same synthetic data at once (what two demo runs sharing the default path
    do): both succeed, one builds and the other waits and reuses it; no temporaries are left."""
    from skyt1.data.dataset import TokenDataset

    for round_ in range(2):
        folder = tmp_path / f"syn{round_}"
        procs = [subprocess.Popen([sys.executable, "-c", _BUILD, str(folder), "150"], cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
        _all_succeed(procs, 120)
        assert TokenDataset(folder / "dataset").num_docs == 150
        assert [p.name for p in folder.iterdir() if ".tmp-" in p.name] == []
        assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name] == []


def test_stale_temporary_of_a_killed_build_is_removed(tmp_path):
    from skyt1.data.build import build_dataset
    from skyt1.data.synthetic import build_tiny_tokenizer, make_arithmetic_rows, write_arithmetic_json

    tok = build_tiny_tokenizer(tmp_path / "tok", rows=make_arithmetic_rows(100, seed=2))
    rows = write_arithmetic_json(tmp_path / "rows.json", 20, seed=2)
    stale = tmp_path / f".ds.tmp-99999999-{uuid.uuid4().hex[:8]}"  # what a kill -9 mid-build leaves
    stale.mkdir()
    (stale / "tokens.bin").write_bytes(b"\0" * 64)
    build_dataset([rows], tok, tmp_path / "ds", progress=False)
    assert not stale.exists()


def _bad_row_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    good = {"conversations": [{"from": "user", "value": "what is 1 + 1?"}, {"from": "assistant", "value": "2"}]}
    surrogate = '{"conversations": [{"from": "user", "value": "q\\ud800"}, {"from": "assistant", "value": "a"}]}'
    deep = '{"conversations": ' + "[" * 200_000 + "]" * 200_000 + "}"
    files = {}
    for name, bad, why in (("surrogate", surrogate, "lone UTF-16 surrogate"), ("deep", deep, "nested too deeply")):
        jsonl = tmp_path / f"{name}.jsonl"
        jsonl.write_text("\n".join([json.dumps(good), bad, json.dumps(good)]) + "\n")
        array = tmp_path / f"{name}.json"
        array.write_text("[\n" + ",\n".join([json.dumps(good), bad, json.dumps(good)]) + "\n]\n")
        files[f"{name}-jsonl"] = (jsonl, why)
        files[f"{name}-array"] = (array, why)
    return files


def test_bad_rows_are_row_errors_and_skippable(tmp_path, capsys):
    """A lone surrogate (valid JSON, not encodable text) and nesting 200,000 levels deep, in JSONL and in
    a JSON array: an error naming the file and row 1, or, with --skip-bad-rows, the other rows built."""
    from skyt1.data.__main__ import main as data_cli
    from skyt1.data.synthetic import build_tiny_tokenizer, make_arithmetic_rows

    tok = build_tiny_tokenizer(tmp_path / "tok", rows=make_arithmetic_rows(100, seed=3))
    for kind, (path, why) in _bad_row_files(tmp_path).items():
        out = tmp_path / f"out-{kind}"
        args = ["build", "--input", str(path), "--tokenizer", str(tok), "--output", str(out), "--quiet"]
        assert data_cli(args) == 2, kind
        err = capsys.readouterr().err
        assert f"error: {path}: row 1" in err and why in err and "--skip-bad-rows" in err, (kind, err)
        assert "Traceback" not in err and not out.exists()
        assert data_cli(args + ["--skip-bad-rows"]) == 0, kind
        captured = capsys.readouterr()
        assert "2 documents" in captured.out and "1 bad rows skipped" in captured.out, (kind, captured)
        assert f"skipped: {path}: row 1" in captured.err and why in captured.err, (kind, captured.err)


def test_two_ranks_fall_back_together_and_warn_of_the_new_world_size(tiny, run_one, tmp_path):
    """The checksums are shared out between the ranks and every rank gets the same verdict; a checkpoint
    of 1 rank resumed on 2 says the continuation is no longer bit-exact (it still agrees to rounding)."""
    from test_train import _run_two_ranks

    root, cfg = tiny
    out = tmp_path / "out"
    _copy_run(run_one, out)
    _damage(out / "step_00000004" / "__0_0.distcp", "flip")
    log = _run_two_ranks(cfg, out, ["--train.max_steps", str(STEPS), "--train.export", "false"])
    assert "step_00000004/__0_0.distcp: checksum" in log and "falling back to" in log, log
    assert "world size: 1 when saved, 2 now" in log, log
    full, resumed = _losses(run_one), _losses(out)
    assert max(abs(a - b) for a, b in zip(full, resumed)) < 1e-5, (full, resumed)
    assert verify_checkpoint(out / "step_00000004").ok


def test_bad_row_in_a_worker_process_is_a_row_error(tmp_path):
    """With --workers 2 the rows are tokenized in spawned processes: a row failing there is still that
    row's error (named), and skippable."""
    from skyt1.data.build import BuildOptions, build_dataset
    from skyt1.data.readers import DataError
    from skyt1.data.synthetic import build_tiny_tokenizer, make_arithmetic_rows

    tok = build_tiny_tokenizer(tmp_path / "tok", rows=make_arithmetic_rows(100, seed=4))
    path, why = _bad_row_files(tmp_path)["surrogate-array"]
    with pytest.raises(DataError, match=re.escape(f"{path}: row 1: ") + ".*" + why):
        build_dataset([path], tok, tmp_path / "out", workers=2, progress=False)
    res = build_dataset([path], tok, tmp_path / "out", BuildOptions(skip_bad_rows=True), workers=2, progress=False)
    assert res.meta["counts"]["documents"] == 2 and res.meta["counts"]["skipped_rows"] == 1
