"""`skyt1-sample`: generate (batch, resumable), chat (interactive), serve (OpenAI-compatible).

    skyt1-sample generate --model DIR --input prompts.jsonl --output out.jsonl [--num-samples 8 --temperature 0.7 ...]
    skyt1-sample chat --model DIR
    skyt1-sample serve --model DIR [--host 127.0.0.1 --port 8000]
    torchrun --nproc_per_node N -m skyt1.sample generate ...     one replica per GPU, output merged in order
    skyt1-sample serve|generate|eval ... --tensor-parallel-size T   the model split over T GPUs (skyt1/sample/tp.py)
    skyt1-sample generate ... --data-parallel-size D --tensor-parallel-size T   D x T ranks through torchrun
    skyt1-sample ... --plan                                          16K / 32K sequences that fit, TP 1/2/4/8

Subcommands live in a registry: another module adds its own with register_subcommand() and is listed
in PLUGINS, so `skyt1-sample eval` appears once skyt1.eval.cli exists. The argument helpers
(add_engine_arguments, add_sampling_arguments, llm_from_args, sampling_params_from_args) are for them.

generate input: a .jsonl file or a JSON array; each row {"id", "messages"} (OpenAI messages, or Sky-T1
"system"/"conversations"; the chat template is applied, --system sets or replaces the system prompt)
or {"id", "prompt"} (raw text, or a list of token ids). Without "id" the row's index is its id.
Output: one JSON line per sample {"id", "sample_index", "text", "finish_reason", "prompt_tokens",
"completion_tokens"} (+ "logprobs"), appended and flushed as each finishes; rerunning skips samples
already in the output, and a finished run rewrites the file sorted in input order.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from skyt1.sample.engine import LLM
from skyt1.sample.params import SamplingParams
from skyt1.sample.sequence import Request


@dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


SUBCOMMANDS: dict[str, Subcommand] = {}
# Modules that register extra subcommands when imported (skipped while they do not exist).
PLUGINS = ("skyt1.eval.cli",)


def register_subcommand(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None],
                        run: Callable[[argparse.Namespace], int | None]) -> None:
    SUBCOMMANDS[name] = Subcommand(name, help, add_arguments, run)


def _load_plugins() -> None:
    for mod in PLUGINS:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name is not None and (mod == e.name or mod.startswith(e.name + ".")):
                continue  # the plugin module itself is absent; a missing import inside it is a real error
            raise


# -- shared argument groups ------------------------------------------------------------------------
def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and engine")
    g.add_argument("--model", required=True, help="HF checkpoint folder (config.json + safetensors)")
    g.add_argument("--tokenizer", help="tokenizer folder or tokenizer.json (default: the model folder)")
    g.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default: bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda:LOCAL_RANK if available)")
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=int, default=8192, help="tokens per step (prefill chunk)")
    g.add_argument("--max-model-len", type=int, default=None, help="prompt + output tokens (default: the model's)")
    g.add_argument("--block-size", type=int, default=None, help="tokens per KV block (default 256 CUDA / 16 CPU)")
    g.add_argument("--num-kv-blocks", type=int, default=None, help="KV pool size (default: from free memory)")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--decode-backend", choices=("triton", "triton-page", "flash", "sdpa", "torch"),
                   default=None)
    g.add_argument("--prefill-backend", choices=("gather", "torch-paged", "flash-paged"), default=None)
    g.add_argument("--tensor-parallel-size", "--tp", type=int, default=1,
                   help="split the model over N devices / processes (heads and KV heads, MLP, vocabulary)")
    g.add_argument("--data-parallel-size", "--dp", type=int, default=1,
                   help="generate: D replicas of --tensor-parallel-size ranks each (started through torchrun)")
    g.add_argument("--plan", action="store_true", help="print how many 16K / 32K sequences fit at TP 1/2/4/8 on "
                   "80 GB and 141 GB GPUs (--model's shape, Qwen2.5-32B without one) and exit")


def add_sampling_arguments(p: argparse.ArgumentParser, max_tokens_default: int | None = None) -> None:
    g = p.add_argument_group("sampling")
    # --num-samples first: under torchrun, "--n" is taken for an abbreviation of torchrun's own options.
    g.add_argument("--num-samples", "--n", dest="n", type=int, default=1, help="samples per prompt")
    g.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0: off")
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None, help="per-request seed (sample i uses a seed derived from it)")
    g.add_argument("--max-tokens", type=int, default=max_tokens_default,
                   help="new tokens per sample (default: until the context is full)")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--stop-token-ids", type=int, nargs="*", default=[], help="extra stop token ids")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at the model's end-of-sequence ids")
    g.add_argument("--logprobs", type=int, default=None, help="record the sampled token's logprob and the top k")
    g.add_argument("--include-stop-str-in-output", action="store_true")


def sampling_params_from_args(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, seed=args.seed, max_tokens=args.max_tokens,
        stop=tuple(args.stop), stop_token_ids=tuple(args.stop_token_ids), ignore_eos=args.ignore_eos,
        logprobs=args.logprobs, include_stop_str_in_output=args.include_stop_str_in_output)


def default_device() -> str:
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def llm_from_args(args: argparse.Namespace) -> LLM:
    device = torch.device(args.device or default_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    llm = LLM(args.model, args.tokenizer, dtype=args.dtype, device=device,
              tensor_parallel_size=getattr(args, "tensor_parallel_size", 1),
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              max_model_len=args.max_model_len, block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
              gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager,
              enable_prefix_caching=not args.no_prefix_caching, decode_backend=args.decode_backend,
              prefill_backend=args.prefill_backend)
    if llm.engine.tp is None or llm.engine.tp.rank == 0:
        print(llm.engine.describe_kv(), file=sys.stderr)
    return llm


# -- generate --------------------------------------------------------------------------------------
def read_prompt_rows(path: str | Path) -> list[dict]:
    """Rows of a .jsonl file or a JSON array, each a dict (errors name the file and the line/row)."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"error: --input {path}: no such file")
    text = path.read_text(encoding="utf-8")
    rows: list[Any]
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise SystemExit(f"error: {path}: not a valid JSON array ({e})") from None
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise SystemExit(f"error: {path}:{lineno}: not valid JSON ({e})") from None
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise SystemExit(f"error: {path}: row {i} is {type(r).__name__}, expected an object")
    return rows


def encode_row(row: dict, tokenizer, system: str | None, source: str, index: int) -> tuple[list[int], str | None]:
    """Token ids of one input row: chat rows through the template, "prompt" rows as raw text or ids."""
    from skyt1.tokenizer import messages_from_row

    where = f"{source}: row {index}"
    if "messages" in row or "conversations" in row:
        if tokenizer is None:
            raise SystemExit(f"error: {where}: chat rows need a tokenizer (--tokenizer)")
        try:
            messages = messages_from_row(row, source=source, row_index=index, require_assistant=False)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        if system is not None and messages and messages[0]["role"] == "system":
            messages = messages[1:]  # --system replaces the row's own
        if not messages or messages[-1]["role"] != "user":
            raise SystemExit(f"error: {where}: the conversation must end with a user turn to generate a reply")
        return tokenizer.encode_prompt(messages, system=system), None
    if "prompt" in row:
        p = row["prompt"]
        if isinstance(p, str) and p:
            if tokenizer is None:
                raise SystemExit(f"error: {where}: text prompts need a tokenizer (--tokenizer)")
            return tokenizer.encode(p), p
        if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            return list(p), None
        raise SystemExit(f"error: {where}: key 'prompt' must be a non-empty string or a list of token ids")
    raise SystemExit(f"error: {where}: needs 'messages' (or 'conversations') or 'prompt'; keys are {sorted(row)[:10]}")


def _row_key(row_id: Any) -> str:
    return json.dumps(row_id, sort_keys=True)


def row_seed(seed: int, key: str) -> int:
    """Each row's own seed from --seed and its id: rows do not share noise, and a row's samples do not
    depend on the sharding, the order or what ran before (resume gives the same samples)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFFFFFFFFFFFFFF


def read_done(path: Path) -> dict[str, set[int]]:
    """Samples already in an output file: {id key: {sample_index}}. A torn last line (a crash mid-write)
    is cut off the file."""
    done: dict[str, set[int]] = {}
    if not path.is_file():
        return done
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        print(f"warning: {path}: dropping a torn last line ({len(data) - cut} bytes)", file=sys.stderr)
        with open(path, "r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    for lineno, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            done.setdefault(_row_key(row["id"]), set()).add(int(row["sample_index"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise SystemExit(f"error: {path}:{lineno}: not an output row of skyt1-sample generate ({e!r}); "
                             "use another --output") from None
    return done


def merge_outputs(output: Path, parts: list[Path], order: list[str]) -> int:
    """Rewrite `output` from itself and `parts` (shards), sorted by input order then sample index,
    one row per (id, sample); atomically. Returns the number of rows."""
    rank = {k: i for i, k in enumerate(order)}
    rows: dict[tuple[str, int], str] = {}
    for path in [output, *parts]:
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                rows.setdefault((_row_key(row["id"]), int(row["sample_index"])), line)
    keys = sorted(rows, key=lambda k: (rank.get(k[0], len(rank)), k[0] if k[0] not in rank else "", k[1]))
    tmp = output.with_name(output.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for k in keys:
            f.write(rows[k] + "\n")
    os.replace(tmp, output)
    for p in parts:
        p.unlink(missing_ok=True)
    return len(keys)


class Progress:
    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.done = 0
        self.tokens = 0
        self.start = self.last = time.monotonic()

    def update(self, samples: int, tokens: int) -> None:
        self.done += samples
        self.tokens += tokens
        now = time.monotonic()
        if self.enabled and (now - self.last > 1.0 or self.done == self.total):
            self.last = now
            el = max(now - self.start, 1e-9)
            print(f"\r{self.done}/{self.total} samples | {self.tokens / el:,.0f} tok/s | {el:,.0f}s", end="",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled:
            print(file=sys.stderr)


def run_generate(args: argparse.Namespace) -> int:
    from skyt1.sample.tp import replica_of

    tp_size = args.tensor_parallel_size
    rank, world = replica_of(tp_size)  # data-parallel replicas (each of tp_size ranks)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    shard_of = lambda r: output.with_name(f"{output.name}.rank{r}-of-{world}")  # noqa: E731
    params = sampling_params_from_args(args)
    rows = read_prompt_rows(args.input)
    keys = [_row_key(r.get("id", i)) for i, r in enumerate(rows)]
    seen: dict[str, int] = {}
    for i, k in enumerate(keys):
        if k in seen:
            raise SystemExit(f"error: {args.input}: rows {seen[k]} and {i} have the same id {k}")
        seen[k] = i
    # Samples already written, by any earlier run (merged output) or any rank's shard.
    done = read_done(output) if rank == 0 or world == 1 else _read_done_quiet(output)
    for r in range(world):
        for k, v in (read_done(shard_of(r)) if r == rank else _read_done_quiet(shard_of(r))).items():
            done.setdefault(k, set()).update(v)
    todo = []
    for i in range(rank, len(rows), world):
        missing = [s for s in range(params.n) if s not in done.get(keys[i], set())]
        if missing:
            todo.append((i, missing))
    out_path = output if world == 1 else shard_of(rank)
    print(f"[rank {rank}/{world}] {len(todo)} of {len(range(rank, len(rows), world))} prompts to generate "
          f"-> {out_path}", file=sys.stderr)
    replicas = None
    if todo or tp_size > 1:  # a tensor-parallel group is built even with nothing to do: its ranks wait for it
        llm = llm_from_args(args)
        if todo:
            _generate_rows(llm, rows, todo, params, args, out_path, show=rank == 0)
        if llm.engine.tp is not None:
            replicas = llm.engine.tp.replicas_group
            llm.close()
    if world > 1:
        import torch.distributed as dist

        if replicas is None:
            dist.init_process_group("gloo", timeout=timedelta(days=7))  # ranks finish far apart
        dist.barrier(group=replicas)
        if rank == 0:
            n = merge_outputs(output, [shard_of(r) for r in range(world)], keys)
            print(f"merged {n} rows into {output}", file=sys.stderr)
        dist.barrier(group=replicas)
        if replicas is None:
            dist.destroy_process_group()
    else:
        merge_outputs(output, [], keys)
    return 0


def _read_done_quiet(path: Path) -> dict[str, set[int]]:
    """Another rank's file: read what is complete, never truncate it (its owner does)."""
    done: dict[str, set[int]] = {}
    if not path.is_file():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
            done.setdefault(_row_key(row["id"]), set()).add(int(row["sample_index"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    return done


def _generate_rows(llm: LLM, rows: list[dict], todo: list[tuple[int, list[int]]], params: SamplingParams,
                   args: argparse.Namespace, out_path: Path, show: bool) -> None:
    engine = llm.engine
    progress = Progress(sum(len(m) for _, m in todo), show)

    def requests() -> Iterator[tuple[int, Request]]:
        for i, missing in todo:  # encoded as the engine takes them: bounded memory
            ids, text = encode_row(rows[i], llm.tokenizer, args.system, args.input, i)
            row_params = params if params.seed is None else params.replace(
                seed=row_seed(params.seed, _row_key(rows[i].get("id", i))))
            try:
                req = engine.add_request(f"row-{i}", ids, row_params, text, sample_indices=missing)
            except ValueError as e:
                raise SystemExit(f"error: {args.input}: row {i}: {e}") from None
            yield i, req

    with open(out_path, "a", encoding="utf-8") as out:
        for i, seq in engine.stream_samples(requests()):
            rec = {"id": rows[i].get("id", i), "sample_index": seq.index, "text": engine.sample_text(seq),
                   "finish_reason": seq.finish_reason, "prompt_tokens": seq.num_prompt_tokens,
                   "completion_tokens": seq.num_output_tokens}
            if seq.logprobs is not None:
                rec["logprobs"] = seq.logprobs
            out.write(json.dumps(rec, ensure_ascii=False) + "\n")
            out.flush()
            progress.update(1, seq.num_output_tokens)
    progress.close()


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help=".jsonl or JSON array of {id, messages} / {id, prompt} rows")
    p.add_argument("--output", required=True, help=".jsonl, one row per sample (appended; resumable)")
    p.add_argument("--system", default=None, help="system prompt for chat rows (sets or replaces theirs)")
    add_engine_arguments(p)
    add_sampling_arguments(p)


# -- chat ------------------------------------------------------------------------------------------
def run_chat(args: argparse.Namespace) -> int:
    llm = llm_from_args(args)
    if llm.tokenizer is None:
        raise SystemExit("error: chat needs a tokenizer (--tokenizer)")
    params = sampling_params_from_args(args)
    if params.n != 1:
        raise SystemExit("error: chat streams one sample; use --num-samples 1")
    engine = llm.engine
    messages: list[dict] = []
    print("skyt1 chat: /reset clears the conversation, /exit (or Ctrl-D) quits.", file=sys.stderr)
    turn = 0
    while True:
        try:
            line = input("\n> ")
        except EOFError:
            print()
            return 0
        if line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            messages = []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        ids = llm.tokenizer.encode_prompt(messages, system=args.system)
        try:
            req = engine.add_request(f"chat-{turn}", ids, params, stream=True)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            messages.pop()
            continue
        turn += 1
        try:
            while not req.finished:
                for u in engine.step():
                    print(u.text, end="", flush=True)
        except KeyboardInterrupt:
            engine.abort(req.request_id)
            print(" [interrupted]", file=sys.stderr)
        text = engine.sample_text(req.seqs[0])
        if text.strip():
            messages.append({"role": "assistant", "content": text})
        else:
            messages.pop()  # an empty reply cannot be a turn of the template


def add_chat_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system", default=None, help="system prompt")
    add_engine_arguments(p)
    add_sampling_arguments(p, max_tokens_default=4096)


# -- serve -----------------------------------------------------------------------------------------
def run_serve(args: argparse.Namespace) -> int:
    from skyt1.sample.server import build_server, server_config_from_args, stop_server

    config = server_config_from_args(args)  # bad limits fail before the model loads
    llm = llm_from_args(args)
    name = args.served_model_name or Path(args.model).name
    server = build_server(llm.engine, args.host, args.port, name, config)
    host, port = server.server_address[:2]
    print(f"serving {name!r} on http://{host}:{port}/v1 (max_model_len {llm.engine.max_model_len})", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        stop_server(server)
    return 0


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="name listed by /v1/models (default: folder name)")
    from skyt1.sample.server import add_server_arguments

    add_server_arguments(p)
    add_engine_arguments(p)


register_subcommand("generate", "batch generation from a prompt file, resumable", add_generate_arguments, run_generate)
register_subcommand("chat", "interactive streaming chat", add_chat_arguments, run_chat)
register_subcommand("serve", "OpenAI-compatible HTTP server", add_serve_arguments, run_serve)


def build_parser() -> argparse.ArgumentParser:
    _load_plugins()
    parser = argparse.ArgumentParser(prog="skyt1-sample", description="Sample from a skyt1 / Qwen2.5 checkpoint.")
    sub = parser.add_subparsers(dest="command", required=True)
    for cmd in SUBCOMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def run_plan(argv: list[str]) -> int:
    """--plan: the KV-cache arithmetic of skyt1.sample.tp.plan_table for --model's shape (or Qwen2.5-32B)."""
    from skyt1.config import preset_config
    from skyt1.sample.tp import format_plan

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--model", default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.90)
    known, _ = p.parse_known_args(argv)
    if known.model:
        from skyt1.checkpoint import load_config

        cfg, name = load_config(known.model), known.model
    else:
        cfg, name = preset_config("qwen2.5-32b"), "Qwen2.5-32B"
    print(format_plan(cfg, name, utilization=known.gpu_memory_utilization))
    return 0


def _data_parallel(args: argparse.Namespace, argv: list[str]) -> int | None:
    """--data-parallel-size D: start D x T processes through torchrun (once), or check a launched world."""
    from skyt1.sample.tp import launched_world

    dp, tp = getattr(args, "data_parallel_size", 1), getattr(args, "tensor_parallel_size", 1)
    if dp < 1 or tp < 1:
        raise ValueError(f"--data-parallel-size {dp} and --tensor-parallel-size {tp} must be >= 1")
    world = launched_world()
    if world is not None:
        if dp > 1 and world[1] != dp * tp:
            raise ValueError(f"WORLD_SIZE={world[1]} but --data-parallel-size {dp} x --tensor-parallel-size {tp} "
                             f"= {dp * tp}")
        return None
    if dp == 1:
        return None
    if args.command != "generate":
        raise ValueError(f"--data-parallel-size applies to generate; {args.command} runs one replica of "
                         f"--tensor-parallel-size ranks")
    import torch.distributed.run as torchrun

    torchrun.main(["--standalone", "--nproc_per_node", str(dp * tp), "-m", "skyt1.sample", *argv])
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--plan" in argv:
        return run_plan(argv)
    args = build_parser().parse_args(argv)
    try:
        launched = _data_parallel(args, argv)
        if launched is not None:
            return launched
        from skyt1.sample.tp import is_worker_rank, worker_main_from_args

        if is_worker_rank(getattr(args, "tensor_parallel_size", 1)):
            return worker_main_from_args(args)
        return int(args._run(args) or 0)
    except ValueError as e:  # bad options or inputs reach the user as one line, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
