"""Plumbing shared by the recipe's long-running jobs (generate, reformat) and by eval.

- JSONL input read with errors that name the file and line.
- `ResumableJsonl`: an append-only output file keyed by item, so a job killed at any moment restarts
  where it stopped: each finished item is one `write` of one line followed by a flush and an fsync; on
  reopen a torn last line (the process died inside the write) is cut off, and the keys already present
  are skipped. An item is either in the file whole or not at all.
- `ChatClient`: chat completions against any OpenAI-compatible endpoint with the `openai` client, bounded
  concurrency, a per-request deadline, and our own retry loop (exponential backoff with jitter, honouring
  Retry-After) on rate limits, 5xx, timeouts and dropped connections. Token usage and cost are totalled.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Iterator

# USD per 1M tokens (input, output), OpenAI list prices for the models one would use to reformat traces.
# A model missing here costs "unknown" unless --price-input/--price-output are given.
PRICES_PER_MTOK: dict[str, tuple[float, float]] = {
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-5-mini": (0.25, 2.00),
    "gpt-5-nano": (0.05, 0.40),
}


# ----------------------------------------------------------------------------------------------- JSONL


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line_number, row) for each non-blank line; a bad line raises naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def cut_torn_tail(path: str | Path) -> int:
    """Truncate whatever follows the last "\n" of an append-only JSONL file; returns the bytes removed.

    Every complete row ends in "\n", so anything after the last one is a write cut short by a kill.
    """
    with Path(path).open("rb+") as f:
        size = f.seek(0, os.SEEK_END)
        pos = size
        keep = 0
        while pos > 0:
            start = max(0, pos - (1 << 16))  # scan back in 64 KiB chunks: a row can be long
            f.seek(start)
            nl = f.read(pos - start).rfind(b"\n")
            if nl >= 0:
                keep = start + nl + 1
                break
            pos = start
        if keep < size:
            f.truncate(keep)
        return size - keep


def row_id(row: dict, path: str | Path, lineno: int) -> str:
    """The row's `id` as a string (ints and strings both occur in the wild), or a clear error."""
    if "id" not in row:
        raise ValueError(f"{path}:{lineno}: missing field 'id'")
    value = row["id"]
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise ValueError(f"{path}:{lineno}: field 'id' must be a non-empty string or an integer, got {value!r}")
    return str(value)


class ResumableJsonl:
    """Append-only JSONL output whose rows are keyed; reopened, it knows which keys are done.

    key_fn maps a row to its key (e.g. (id, sample_index)). A torn last line left by a kill is removed
    on open (and counted in `repaired_bytes`); rows whose key repeats are counted, the first one wins.
    Only the keys are held in memory (100K traces of 20 KB would be 2 GB) unless keep_rows is set, when
    `rows` maps each key to its row (eval reports from them).
    """

    def __init__(self, path: str | Path, key_fn: Callable[[dict], Hashable], fsync: bool = True,
                 keep_rows: bool = False):
        self.path = Path(path)
        self.key_fn = key_fn
        self.fsync = fsync
        self.keep_rows = keep_rows
        self.repaired_bytes = 0
        self.keys: set[Hashable] = set()
        self.rows: dict[Hashable, dict] = {}
        self.duplicates = 0
        if self.path.exists():
            self.repaired_bytes = cut_torn_tail(self.path)
            for lineno, row in iter_jsonl(self.path):
                try:
                    key = key_fn(row)
                except (KeyError, ValueError, TypeError) as e:
                    raise ValueError(f"{self.path}:{lineno}: cannot resume from this row: {e}") from None
                if key in self.keys:
                    self.duplicates += 1
                else:
                    self.keys.add(key)
                    if keep_rows:
                        self.rows[key] = row
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = self.path.open("a", encoding="utf-8")

    def __contains__(self, key: Hashable) -> bool:
        return key in self.keys

    def __len__(self) -> int:
        return len(self.keys)

    def append(self, row: dict) -> None:
        key = self.key_fn(row)
        if key in self.keys:
            raise ValueError(f"{self.path}: key {key!r} is already written; a finished item is never redone")
        # One write call per row so a kill leaves either the whole line or a torn tail that reopen removes.
        self._f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._f.flush()
        if self.fsync:
            os.fsync(self._f.fileno())
        self.keys.add(key)
        if self.keep_rows:
            self.rows[key] = row

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> "ResumableJsonl":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------------------------- retries


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: attempt a (0-based) waits base * 2**a, capped, times (1 - jitter*U).

    A server's Retry-After (seconds) is a floor for the wait, still capped at max_delay.
    """
    max_attempts: int = 8
    base_delay: float = 1.0
    max_delay: float = 60.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.base_delay < 0 or self.max_delay < 0:
            raise ValueError(f"delays must be >= 0, got base {self.base_delay}, max {self.max_delay}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be in [0, 1], got {self.jitter}")

    def delay(self, attempt: int, rng: random.Random, retry_after: float | None = None) -> float:
        d = min(self.max_delay, self.base_delay * (2 ** attempt))
        d *= 1.0 - self.jitter * rng.random()
        if retry_after is not None and retry_after > d:
            d = min(self.max_delay, retry_after)
        return d


RETRY_STATUS = frozenset({408, 409, 429})  # plus every 5xx


def _retry_after_seconds(err: BaseException) -> float | None:
    response = getattr(err, "response", None)
    headers = getattr(response, "headers", None)
    if not headers:
        return None
    for name in ("retry-after-ms", "retry-after"):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value)
        except ValueError:
            continue  # an HTTP-date: fall back to our own backoff
        return seconds / 1000.0 if name.endswith("ms") else seconds
    return None


def classify_error(err: BaseException) -> str | None:
    """A short reason when err is worth retrying, None when it is not (bad request, auth, ...)."""
    import openai

    if isinstance(err, asyncio.TimeoutError) or isinstance(err, openai.APITimeoutError):
        return "timeout"
    if isinstance(err, openai.APIStatusError):
        status = err.status_code
        if status in RETRY_STATUS or status >= 500:
            return f"HTTP {status}"
        return None
    if isinstance(err, openai.APIConnectionError):
        return "connection error"
    return None


# ---------------------------------------------------------------------------------------------- client


@dataclass
class ChatResult:
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    attempts: int
    model: str

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}


@dataclass
class UsageTotals:
    requests: int = 0
    retries: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retry_reasons: dict[str, int] = field(default_factory=dict)

    def cost(self, price_in: float | None, price_out: float | None) -> float | None:
        if price_in is None or price_out is None:
            return None
        return (self.prompt_tokens * price_in + self.completion_tokens * price_out) / 1e6

    def summary(self, model: str, price_in: float | None = None, price_out: float | None = None,
                with_cost: bool = True) -> str:
        cost = self.cost(price_in, price_out)
        cost_text = (f"${cost:.4f} at ${price_in}/${price_out} per 1M input/output tokens" if cost is not None
                     else f"unknown (no price for {model!r}; give --price-input and --price-output)")
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.retry_reasons.items())) or "none"
        text = (f"requests {self.requests} ok, {self.failures} failed, {self.retries} retries ({reasons}); "
                f"tokens: {self.prompt_tokens} prompt + {self.completion_tokens} completion = "
                f"{self.prompt_tokens + self.completion_tokens}")
        return text + (f"; cost {cost_text}" if with_cost else "")


def resolve_prices(model: str, price_input: float | None, price_output: float | None
                   ) -> tuple[float | None, float | None]:
    """Flags win; otherwise the table (exact name, then the longest table name the model starts with)."""
    table = PRICES_PER_MTOK.get(model)
    if table is None:
        for name in sorted(PRICES_PER_MTOK, key=len, reverse=True):
            if model.startswith(name + "-"):  # dated snapshots like gpt-4o-mini-2024-07-18
                table = PRICES_PER_MTOK[name]
                break
    p_in = price_input if price_input is not None else (table[0] if table else None)
    p_out = price_output if price_output is not None else (table[1] if table else None)
    return p_in, p_out


class ChatClient:
    """Chat completions with at most `concurrency` requests in flight and our own retries.

    The openai client's built-in retries are off (max_retries=0) so that every wait is ours, counted and
    bounded by RetryPolicy. Each attempt has a hard deadline of `timeout` seconds (asyncio.wait_for on top
    of the client's own timeout, which only bounds each read).
    """

    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None,
                 concurrency: int = 16, timeout: float = 600.0, retry: RetryPolicy = RetryPolicy(),
                 seed: int | None = None, log: Callable[[str], None] | None = None):
        import openai

        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        if api_key is None:
            api_key = os.environ.get("OPENAI_API_KEY")
        if api_key is None:
            if base_url is None:
                raise ValueError("no API key: set OPENAI_API_KEY or pass --api-key (or --base-url for a local server)")
            api_key = "EMPTY"  # local OpenAI-compatible servers ignore it, the client insists on one
        self.model = model
        self.timeout = timeout
        self.retry = retry
        self.totals = UsageTotals()
        self._client = openai.AsyncOpenAI(api_key=api_key, base_url=base_url, max_retries=0, timeout=timeout)
        self._sem = asyncio.Semaphore(concurrency)
        self._rng = random.Random(seed)
        self._log = log or (lambda msg: None)

    async def complete(self, messages: list[dict], *, temperature: float | None = None,
                       max_tokens: int | None = None, seed: int | None = None, **extra: Any) -> ChatResult:
        """One chat completion; raises the last error once retries are exhausted or on a final error."""
        kwargs: dict[str, Any] = {"model": self.model, "messages": messages, **extra}
        if temperature is not None:
            kwargs["temperature"] = temperature
        if max_tokens is not None:
            kwargs["max_tokens"] = max_tokens
        if seed is not None:
            kwargs["seed"] = seed
        async with self._sem:
            for attempt in range(self.retry.max_attempts):
                try:
                    resp = await asyncio.wait_for(self._client.chat.completions.create(**kwargs),
                                                  timeout=self.timeout)
                except Exception as err:  # noqa: BLE001 - classified below, re-raised when final
                    reason = classify_error(err)
                    if reason is None or attempt + 1 == self.retry.max_attempts:
                        self.totals.failures += 1
                        raise
                    wait = self.retry.delay(attempt, self._rng, _retry_after_seconds(err))
                    self.totals.retries += 1
                    self.totals.retry_reasons[reason] = self.totals.retry_reasons.get(reason, 0) + 1
                    self._log(f"retry {attempt + 1}/{self.retry.max_attempts - 1} after {reason}: "
                              f"waiting {wait:.2f}s")
                    await asyncio.sleep(wait)
                    continue
                return self._result(resp, attempt + 1)
        raise AssertionError("unreachable: the retry loop returns or raises")

    def _result(self, resp: Any, attempts: int) -> ChatResult:
        if not getattr(resp, "choices", None):
            self.totals.failures += 1
            raise ValueError(f"endpoint returned no choices: {str(resp)[:200]}")
        choice = resp.choices[0]
        usage = getattr(resp, "usage", None)
        prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
        completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
        self.totals.requests += 1
        self.totals.prompt_tokens += prompt_tokens
        self.totals.completion_tokens += completion_tokens
        return ChatResult(text=choice.message.content or "", finish_reason=choice.finish_reason,
                          prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                          attempts=attempts, model=getattr(resp, "model", None) or self.model)

    async def close(self) -> None:
        await self._client.close()


def add_client_arguments(p: Any, default_model: str | None, default_concurrency: int = 16,
                         default_timeout: float = 600.0) -> None:
    """Flags shared by every command that talks to an OpenAI-compatible endpoint."""
    p.add_argument("--base-url", default=None,
                   help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 for `skyt1-sample serve` "
                        "(default: the OpenAI API, or OPENAI_BASE_URL)")
    p.add_argument("--api-key", default=None, help="API key (default: $OPENAI_API_KEY; 'EMPTY' for a local server)")
    p.add_argument("--concurrency", type=int, default=default_concurrency, help="requests in flight at most")
    p.add_argument("--timeout", type=float, default=default_timeout, help="seconds per request attempt")
    p.add_argument("--max-attempts", type=int, default=8, help="attempts per request (1 = no retries)")
    p.add_argument("--backoff-base", type=float, default=1.0, help="first retry wait in seconds (doubles each retry)")
    p.add_argument("--backoff-max", type=float, default=60.0, help="longest retry wait in seconds")


def client_from_args(args: Any, model: str, log: Callable[[str], None] | None = None) -> ChatClient:
    base_url = args.base_url or os.environ.get("OPENAI_BASE_URL")
    return ChatClient(model=model, base_url=base_url, api_key=args.api_key, concurrency=args.concurrency,
                      timeout=args.timeout, log=log,
                      retry=RetryPolicy(max_attempts=args.max_attempts, base_delay=args.backoff_base,
                                        max_delay=args.backoff_max))


class Progress:
    """A line to stderr at most every `every` seconds: done/total, rate, elapsed."""

    def __init__(self, total: int, label: str, every: float = 10.0, stream: Any = None):
        import sys

        self.total, self.label, self.every = total, label, every
        self.stream = stream or sys.stderr
        self.done = 0
        self.t0 = self.last = time.monotonic()

    def step(self, k: int = 1) -> None:
        self.done += k
        now = time.monotonic()
        if now - self.last >= self.every or self.done == self.total:
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            print(f"[{self.label}] {self.done}/{self.total} ({rate:.2f}/s, {now - self.t0:.0f}s)",
                  file=self.stream, flush=True)


async def bounded_gather(factories: list[Callable[[], Any]], limit: int) -> None:
    """Run coroutine factories with at most `limit` tasks alive (memory stays flat for 100K items)."""
    it: Iterator[Callable[[], Any]] = iter(factories)
    running: set[asyncio.Task] = set()
    try:
        while True:
            while len(running) < limit:
                f = next(it, None)
                if f is None:
                    break
                running.add(asyncio.ensure_future(f()))
            if not running:
                return
            done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                t.result()  # re-raise a fatal error (auth, missing model)
    finally:
        for t in running:
            t.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)
