"""Data pipeline: readers, build, packer, loader. CPU, small, fresh random inputs."""
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from skyt1.data import (IGNORE_INDEX, BuildOptions, DataError, Packer, TokenDataset, build_dataset, build_loader,
                        pack_arrays, pack_documents, pack_step)
from skyt1.data.__main__ import main as cli
from skyt1.data.readers import RowReader
from skyt1.data.synthetic import (build_tiny_tokenizer, make_arithmetic_rows, make_synthetic_dataset,
                                  write_arithmetic_json)
from skyt1.tokenizer import ChatTokenizer, messages_from_row


@pytest.fixture
def rng():
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    return np.random.default_rng(seed)


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"), rows=make_arithmetic_rows(300, seed=1))


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory):
    return write_arithmetic_json(tmp_path_factory.mktemp("rows") / "rows.json", 240, seed=int.from_bytes(os.urandom(2), "little"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tiny_tok, rows_file):
    return build_dataset([rows_file], tiny_tok, tmp_path_factory.mktemp("ds") / "ds", BuildOptions(max_seq_len=512),
                         progress=False).path


def _rows(n=4):
    return [{"system": "S", "conversations": [{"from": "user", "value": f"q{i}"},
                                              {"from": "assistant", "value": f"answer {i}"}]} for i in range(n)]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _no_temp_left(parent: Path):
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name] == []


# -- packer ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_packer_invariants(rng, world_size):
    n = int(rng.integers(50, 400))
    budget = int(rng.integers(200, 2000))
    lengths = rng.integers(1, budget + 1, n)
    loss = rng.integers(0, lengths)
    sps = int(rng.integers(1, 60))
    p = Packer(lengths, loss, seed=int(rng.integers(1 << 30)), samples_per_step=sps, token_budget=budget,
               world_size=world_size)
    assert p.steps_per_epoch == -(-n // sps)
    for epoch in (0, 1):
        seen = []
        for s in range(p.steps_per_epoch):
            plan = p.plan(epoch, s)
            assert len(plan.doc_ids) == (sps if s < p.steps_per_epoch - 1 else n - sps * (p.steps_per_epoch - 1))
            assert len(plan.micro_batches) == world_size
            assert len({len(r) for r in plan.micro_batches}) == 1  # same micro-batch count on every rank
            docs = np.concatenate([mb for r in plan.micro_batches for mb in r])
            assert sorted(docs.tolist()) == sorted(plan.doc_ids.tolist())  # each of the step's samples once
            for r in plan.micro_batches:
                for mb in r:
                    assert lengths[mb].sum() <= budget
            assert plan.loss_tokens == loss[plan.doc_ids].sum() and plan.tokens == lengths[plan.doc_ids].sum()
            seen.append(plan.doc_ids)
        assert sorted(np.concatenate(seen).tolist()) == list(range(n))  # every sample exactly once per epoch
    assert not np.array_equal(p.epoch_order(0), p.epoch_order(1))
    q = Packer(lengths, loss, seed=p.seed, samples_per_step=sps, token_budget=budget, world_size=world_size)
    a, b = p.plan(1, p.steps_per_epoch - 1), q.plan(1, p.steps_per_epoch - 1)
    assert all(np.array_equal(x, y) for ra, rb in zip(a.micro_batches, b.micro_batches) for x, y in zip(ra, rb))


def test_packer_drop_last_and_balance(rng):
    lengths = rng.integers(100, 4000, 1000)
    p = Packer(lengths, lengths, seed=0, samples_per_step=96, token_budget=4096, world_size=4, drop_last=True)
    assert p.steps_per_epoch == 1000 // 96
    for s in range(p.steps_per_epoch):
        plan = p.plan(0, s)
        assert len(plan.doc_ids) == 96
        # Slots dealt heaviest bin to lightest rank keep the rank spread within one micro-batch.
        rank_tokens = [sum(lengths[mb].sum() for mb in r) for r in plan.micro_batches]
        assert max(rank_tokens) - min(rank_tokens) <= 4096


def test_packer_rejects_long_documents():
    with pytest.raises(ValueError, match="document 1 has 300 tokens, more than token_budget 200"):
        Packer(np.array([10, 300]), np.array([1, 1]), seed=0, samples_per_step=1, token_budget=200)
    with pytest.raises(ValueError, match="exceeds the token budget"):
        pack_step([300], 200, 1)
    with pytest.raises(ValueError, match="make no step"):
        Packer(np.array([10]), np.array([1]), seed=0, samples_per_step=2, token_budget=200, drop_last=True)


def test_pack_step_more_ranks_than_documents():
    plan = pack_step([5, 7], 10, 4)
    assert [len(r) for r in plan] == [1, 1, 1, 1] and sorted(len(r[0]) for r in plan) == [0, 0, 1, 1]


# -- packed batches ----------------------------------------------------------------------------------------
def test_pack_arrays_labels_positions(rng):
    docs = []
    for _ in range(int(rng.integers(1, 6))):
        n = int(rng.integers(1, 30))
        docs.append((rng.integers(0, 1000, n).tolist(), (rng.random(n) < 0.6).tolist()))
    b = pack_documents(docs)
    lens = [len(t) for t, _ in docs]
    assert b.cu_seqlens.dtype == torch.int32 and b.cu_seqlens.tolist() == [0] + np.cumsum(lens).tolist()
    assert b.max_seqlen == max(lens) and b.num_docs == len(docs)
    at = 0
    for toks, mask in docs:
        n = len(toks)
        want = [toks[t + 1] if mask[t + 1] else IGNORE_INDEX for t in range(n - 1)] + [IGNORE_INDEX]
        assert b.input_ids[at:at + n].tolist() == toks
        assert b.labels[at:at + n].tolist() == want  # the last position never looks into the next document
        assert b.position_ids[at:at + n].tolist() == list(range(n))
        at += n
    moved = b.to("cpu")
    assert torch.equal(moved.labels, b.labels) and moved.max_seqlen == b.max_seqlen
    with pytest.raises(ValueError, match="sum\\(lengths\\)"):
        pack_arrays(np.zeros(3, np.int64), np.zeros(3, np.uint8), np.array([2, 2]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pin_memory():
    b = pack_documents([([1, 2, 3], [False, True, True])]).pin_memory()
    assert b.input_ids.is_pinned() and b.cu_seqlens.is_pinned()


# -- loader ------------------------------------------------------------------------------------------------
def _collect(loader, epochs):
    out = []
    for e in range(loader.epoch, epochs):
        for st in loader.epoch_iter(e):
            out.append(st)
    return out


def test_loader_steps_ranks_and_labels(dataset, rng):
    ds = TokenDataset(dataset)
    world, sps, budget = 2, int(rng.integers(8, 40)), 1024
    seed = int(rng.integers(1 << 30))
    loaders = [build_loader(dataset, seed=seed, samples_per_step=sps, token_budget=budget, rank=r, world_size=world)
               for r in range(world)]
    assert loaders[0].steps_per_epoch == -(-len(ds) // sps)
    docs_seen = []
    for steps in zip(*(ld.epoch_iter(0) for ld in loaders)):
        plan = loaders[0].plan(0, steps[0].step)
        assert len({len(st.micro_batches) for st in steps}) == 1
        labels = 0
        for r, st in enumerate(steps):
            assert st.loss_tokens == plan.loss_tokens and st.num_samples == len(plan.doc_ids)
            for mb, doc_ids in zip(st.micro_batches, plan.micro_batches[r]):
                assert mb.num_tokens <= budget
                labels += int((mb.labels != IGNORE_INDEX).sum())
                cu = mb.cu_seqlens.tolist()
                for k, d in enumerate(doc_ids):
                    toks, mask = ds.doc(d)
                    a, b = cu[k], cu[k + 1]
                    assert mb.input_ids[a:b].tolist() == toks.tolist()
                    assert mb.position_ids[a:b].tolist() == list(range(b - a))
                    assert mb.labels[b - 1] == IGNORE_INDEX
                    want = np.where(mask[1:] == 1, toks[1:].astype(np.int64), IGNORE_INDEX)
                    assert mb.labels[a:b - 1].tolist() == want.tolist()
                docs_seen.extend(doc_ids.tolist())
        assert labels == steps[0].loss_tokens  # the announced denominator is exactly the labels that count
    assert sorted(docs_seen) == list(range(len(ds)))


def test_loader_resume_equals_uninterrupted(dataset, rng):
    kw = dict(seed=int(rng.integers(1 << 30)), samples_per_step=int(rng.integers(16, 64)), token_budget=1024,
              rank=1, world_size=2)
    full = _collect(build_loader(dataset, **kw), 2)
    cut = int(rng.integers(1, len(full) - 1))
    first = build_loader(dataset, **kw)
    it = first.iter_steps(2)
    head = [next(it) for _ in range(cut)]
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint would store it
    it.close()
    resumed = build_loader(dataset, **kw)
    resumed.load_state_dict(state)
    tail = list(resumed.iter_steps(2))
    assert len(head) + len(tail) == len(full)
    for a, b in zip(head + tail, full):
        assert (a.epoch, a.step, a.loss_tokens) == (b.epoch, b.step, b.loss_tokens)
        assert len(a.micro_batches) == len(b.micro_batches)
        for x, y in zip(a.micro_batches, b.micro_batches):
            assert all(torch.equal(getattr(x, f), getattr(y, f))
                       for f in ("input_ids", "labels", "position_ids", "cu_seqlens"))
    with pytest.raises(ValueError, match="seed"):
        resumed.load_state_dict({**state, "seed": kw["seed"] + 1})


def test_loader_errors(dataset, tiny_tok):
    with pytest.raises(ValueError, match="max_seq_len 512 > token_budget 256"):
        build_loader(dataset, seed=0, samples_per_step=4, token_budget=256)
    with pytest.raises(DataError, match="built with tokenizer sha256"):
        build_loader(dataset, seed=0, samples_per_step=4, token_budget=512, expect_tokenizer_hash="0" * 64)
    ok = build_loader(dataset, seed=0, samples_per_step=4, token_budget=512,
                      expect_tokenizer_hash=ChatTokenizer.from_pretrained(tiny_tok).hash)
    assert ok.steps_per_epoch == -(-len(ok.dataset) // 4)


# -- readers -----------------------------------------------------------------------------------------------
def test_json_array_reader_streams_across_chunks(tmp_path, rng):
    rows = _rows(5) + [{"x": "é😀" * int(rng.integers(1, 50)), "n": 12345678901234, "f": -1.5e-3, "t": True,
                        "z": None, "s": "\\\"quote\\u00e9\""}, [1, 2], 42]
    text = "\ufeff [\n" + " ,\n ".join(json.dumps(r, ensure_ascii=bool(rng.integers(2))) for r in rows) + "\n]\n"
    p = tmp_path / "a.json"
    p.write_text(text, encoding="utf-8")
    for chunk in (1, 3, 7, 64, 1 << 20):
        assert [r for _, r in RowReader(p, chunk_bytes=chunk)] == rows
    (tmp_path / "e.json").write_text(" [ ] ")
    assert list(RowReader(tmp_path / "e.json")) == []


@pytest.mark.parametrize("text, match", [
    ('[{"a": 1}, {"a": 2,}]', r"row 1 \(line 1 column \d+\): invalid JSON"),
    ('[{"a": 1},\n{"a": 2},\n]', r"row 2 \(line 3 column 1\): trailing comma"),
    ('[{"a": 1} {"a": 2}]', r"row 1 .*expected ',' or ']'"),
    ('[{"a": 1}, {"a": "unterminated', r"row 1 .*invalid JSON: Unterminated string"),
    ('[{"a": 1}] x', r"unexpected text after the JSON array"),
])
def test_json_array_reader_errors(tmp_path, text, match):
    p = tmp_path / "bad.json"
    p.write_text(text)
    for chunk in (4, 1 << 20):
        with pytest.raises(DataError, match=re.escape(str(p)) + ".*" + match):
            list(RowReader(p, chunk_bytes=chunk))


def test_non_utf8_files(tmp_path):
    p = tmp_path / "latin1.json"
    p.write_bytes('[{"a": "caf\xe9"}]'.encode("latin-1"))
    with pytest.raises(DataError, match=re.escape(str(p)) + ": not valid UTF-8 near byte 11"):
        list(RowReader(p))
    q = tmp_path / "latin1.jsonl"
    q.write_bytes(b'{"a": 1}\n{"a": "caf\xe9"}\n{"a": 3}\n')
    with pytest.raises(DataError, match=re.escape(str(q)) + r": row 1 \(line 2\): not valid UTF-8"):
        list(RowReader(q))
    bad = []
    assert [r for _, r in RowReader(q, on_bad_row=lambda i, m: bad.append(i))] == [{"a": 1}, {"a": 3}]
    assert bad == [1]


# -- build -------------------------------------------------------------------------------------------------
def test_build_matches_tokenizer_and_formats(tmp_path, qwen_tokenizer_dir):
    sky = _rows(3)
    oai = [{"messages": [{"role": "user", "content": f"what {i}"}, {"role": "assistant", "content": f"this {i}"}]}
           for i in range(3)]
    (tmp_path / "sky.json").write_text(json.dumps(sky, indent=2))
    _write_jsonl(tmp_path / "oai.jsonl", oai)
    _write_jsonl(tmp_path / "sg.jsonl", sky[:2])
    res = build_dataset([tmp_path / "sky.json", tmp_path / "oai.jsonl", tmp_path / "sg.jsonl"], qwen_tokenizer_dir,
                        tmp_path / "out", BuildOptions(end_token="endoftext"), progress=False)
    ds = TokenDataset(res.path)
    tok = ChatTokenizer.from_pretrained(qwen_tokenizer_dir, end_token="endoftext")
    all_rows = [sky, oai, sky[:2]]
    assert len(ds) == 8 and [s["format"] for s in res.meta["sources"]] == ["array", "jsonl", "jsonl"]
    for d in range(len(ds)):
        src, ri = ds.origin[d]
        ids, mask = tok.encode_chat(messages_from_row(all_rows[src][ri]))
        toks, m = ds.doc(d)
        assert toks.tolist() == ids and m.astype(bool).tolist() == mask
        assert ds.loss_tokens[d] == sum(mask[1:])
    assert res.meta["tokenizer"]["sha256"] == tok.hash and res.meta["counts"]["loss_tokens"] == ds.loss_tokens.sum()


def test_build_workers_keep_order(tmp_path, tiny_tok, rows_file, dataset):
    res = build_dataset([rows_file], tiny_tok, tmp_path / "w2", BuildOptions(max_seq_len=512), workers=2,
                        progress=False)
    for f in ("tokens.bin", "mask.bin", "offsets.bin", "loss_tokens.bin", "origin.bin"):
        assert (res.path / f).read_bytes() == (dataset / f).read_bytes(), f


def test_build_truncate_and_drop(tmp_path, tiny_tok, rows_file):
    lens = TokenDataset(build_dataset([rows_file], tiny_tok, tmp_path / "full", BuildOptions(max_seq_len=512),
                                      progress=False).path).lengths
    cut = int(np.median(lens))
    tr = build_dataset([rows_file], tiny_tok, tmp_path / "tr", BuildOptions(max_seq_len=cut), progress=False)
    dr = build_dataset([rows_file], tiny_tok, tmp_path / "dr", BuildOptions(max_seq_len=cut, on_overflow="drop"),
                       progress=False)
    n_long = int((lens > cut).sum())
    assert tr.meta["counts"]["truncated"] == n_long and tr.meta["counts"]["documents"] == len(lens)
    assert TokenDataset(tr.path).lengths.max() == cut
    assert dr.meta["counts"]["dropped_too_long"] == n_long and dr.meta["counts"]["documents"] == len(lens) - n_long
    assert tr.meta["counts"]["tokens_before_truncation"] == lens.sum()


@pytest.mark.parametrize("kind, content, match", [
    ("jsonl-malformed", '{"conversations": []}\n{"conversations": [\n', r"row 1 \(line 2\): invalid JSON"),
    ("no-assistant", [{"conversations": [{"from": "user", "value": "q"}]}],
     r"row 0: key 'conversations': no assistant turn"),
    ("unknown-role", [{"conversations": [{"from": "user", "value": "q"}, {"from": "robot", "value": "a"}]}],
     r"row 0: key 'conversations\[1\].from': unknown role 'robot'"),
])
def test_build_bad_rows_error_or_skip(tmp_path, tiny_tok, kind, content, match):
    f = tmp_path / "in.jsonl"
    if isinstance(content, str):
        f.write_text(json.dumps(_rows(1)[0]) + "\n" + content.split("\n", 1)[1])
    else:
        _write_jsonl(f, _rows(2) + content + _rows(1))
        match = match.replace("row 0", "row 2")
    out = tmp_path / "out"
    with pytest.raises(DataError, match=re.escape(str(f)) + ": " + match):
        build_dataset([f], tiny_tok, out, progress=False)
    assert not out.exists() and _no_temp_left(tmp_path)  # nothing half-written was left behind
    res = build_dataset([f], tiny_tok, out, BuildOptions(skip_bad_rows=True), progress=False)
    assert res.meta["counts"]["skipped_rows"] == 1 and res.meta["sources"][0]["skipped"] == 1
    assert res.meta["counts"]["documents"] == res.meta["counts"]["rows"] - 1
    assert re.search(match, res.meta["skipped_examples"][0])


def test_build_non_utf8_array(tmp_path, tiny_tok):
    f = tmp_path / "bad.json"
    f.write_bytes(b'[{"system": "caf\xe9", "conversations": []}]')
    with pytest.raises(DataError, match=re.escape(str(f)) + ": not valid UTF-8"):
        build_dataset([f], tiny_tok, tmp_path / "out", BuildOptions(skip_bad_rows=True), progress=False)
    assert not (tmp_path / "out").exists() and _no_temp_left(tmp_path)


def test_rebuild_noop_mismatch_and_atomic_replace(tmp_path, tiny_tok, qwen_tokenizer_dir):
    f = _write_jsonl(tmp_path / "in.jsonl", _rows(6))
    out = tmp_path / "out"
    first = build_dataset([f], tiny_tok, out, progress=False)
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = build_dataset([Path(str(f))], tiny_tok, out, progress=False)
    assert not again.rebuilt and again.meta == first.meta
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp
    with pytest.raises(DataError, match="built with another tokenizer"):
        build_dataset([f], qwen_tokenizer_dir, out, progress=False)
    # A rebuild that fails leaves the previous dataset untouched.
    _write_jsonl(f, _rows(6) + [{"conversations": [{"from": "user", "value": "q"}]}])
    with pytest.raises(DataError, match="no assistant turn"):
        build_dataset([f], tiny_tok, out, progress=False)
    assert TokenDataset(out).meta == first.meta and _no_temp_left(tmp_path)
    # Changed input: rebuilt in place; another tokenizer with --overwrite: replaced.
    _write_jsonl(f, _rows(7))
    assert build_dataset([f], tiny_tok, out, progress=False).meta["counts"]["documents"] == 7
    res = build_dataset([f], qwen_tokenizer_dir, out, overwrite=True, progress=False)
    assert res.rebuilt and TokenDataset(out).tokenizer_hash == res.meta["tokenizer"]["sha256"]
    assert _no_temp_left(tmp_path)


def test_incomplete_dataset_is_not_a_dataset(tmp_path, tiny_tok):
    f = _write_jsonl(tmp_path / "in.jsonl", _rows(3))
    out = build_dataset([f], tiny_tok, tmp_path / "out", progress=False).path
    with open(out / "tokens.bin", "r+b") as fh:
        fh.truncate(8)
    with pytest.raises(DataError, match="tokens.bin: 8 bytes, expected"):
        TokenDataset(out)
    with pytest.raises(DataError, match="damaged dataset"):
        build_dataset([f], tiny_tok, out, progress=False)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x").write_text("x")
    with pytest.raises(DataError, match="not a skyt1 dataset; refusing"):
        build_dataset([f], tiny_tok, tmp_path / "junk", progress=False)


# -- CLI and synthetic data --------------------------------------------------------------------------------
def test_cli_build_stats(tmp_path, tiny_tok, capsys):
    f = _write_jsonl(tmp_path / "in.jsonl", _rows(5))
    assert cli(["build", "--input", str(f), "--tokenizer", str(tiny_tok), "--output", str(tmp_path / "o"),
                "--max-seq-len", "256", "--quiet"]) == 0
    assert cli(["stats", str(tmp_path / "o"), "--json", "--budget", "256", "--samples-per-step", "2"]) == 0
    stats = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert stats["documents"] == 5 and stats["packing_epoch0"]["samples"] == 5
    assert cli(["build", "--input", str(tmp_path / "nope.json"), "--tokenizer", str(tiny_tok), "--output",
                str(tmp_path / "o2")]) == 2
    assert "nope.json does not exist" in capsys.readouterr().err


def test_synthetic_rows_are_correct_and_tokenizer_reproducible(tmp_path, tiny_tok):
    for row in make_arithmetic_rows(50, seed=int.from_bytes(os.urandom(2), "little")):
        q, a = row["conversations"][0]["value"], row["conversations"][1]["value"]
        x, op, y = re.search(r"\$(\d+) (\+|-|\\times) (\d+)\$\?", q).groups()
        want = {"+": int(x) + int(y), "-": int(x) - int(y), "\\times": int(x) * int(y)}[op]
        assert re.findall(r"\\boxed\{(-?\d+)\}", a) == [str(want)]
        assert a.startswith("<|begin_of_thought|>") and a.endswith("<|end_of_solution|>")
    again = build_tiny_tokenizer(tmp_path / "t2", rows=make_arithmetic_rows(300, seed=1))
    assert (again / "tokenizer.json").read_bytes() == (tiny_tok / "tokenizer.json").read_bytes()
    tok = ChatTokenizer.from_pretrained(again)
    assert tok.vocab_size == 512 and tok.eos_token_ids == (2, 0)


def test_make_synthetic_dataset_and_demo_loader(tmp_path, tiny_tok):
    syn = make_synthetic_dataset(tmp_path / "demo", n=64, seed=3, tokenizer=tiny_tok, max_seq_len=512)
    again = make_synthetic_dataset(tmp_path / "demo", n=64, seed=3, tokenizer=tiny_tok, max_seq_len=512)
    assert again == syn and json.loads((syn.dataset / "meta.json").read_text())["counts"]["documents"] == 64
    loader = build_loader(syn.dataset, seed=0, samples_per_step=16, token_budget=1024)
    steps = list(loader.epoch_iter(0))
    assert len(steps) == 4 and all(st.num_samples == 16 for st in steps)
