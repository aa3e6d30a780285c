"""The hostile-client probes of issue 15 against `skyt1-sample serve`'s server, with figures: a normal
request's latency alone, beside 150 slowloris connections, and during n=1000 floods; the process's memory
before and after three fake 8 GB bodies; when the slow connections are closed; and how many tokens a
non-streaming request still generates after its client leaves. A tiny random model on CPU, loopback only,
the same set-up as tests/test_server_limits.py (whose helpers it uses), with the server's default limits.

    python bench/server_probes.py            # ~20 s; writes bench/results/server_probes_cpu_<date>.json
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

from skyt1.sample.server import ServerConfig  # noqa: E402
from test_server import client, serving  # noqa: E402
from test_server_limits import _long_request, _rss_bytes, _wait, normal_request_seconds, talk  # noqa: E402


def _vm_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))


def main() -> None:
    import openai

    config = ServerConfig()  # the defaults a user gets
    out: dict = {"config": {k: getattr(config, k) for k in config.__dataclass_fields__}}
    with serving(tempfile.mkdtemp(), config) as (llm, port, engine):
        normal_request_seconds(port)  # warm-up
        base = [normal_request_seconds(port) for _ in range(5)]
        out["normal_request_s"] = statistics.median(base)

        socks = []
        for _ in range(150):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
            socks.append(s)
        t0 = time.monotonic()
        out["normal_request_beside_150_slowloris_s"] = statistics.median(normal_request_seconds(port) for _ in range(3))
        open_ = set(socks)
        while open_ and time.monotonic() - t0 < 30:
            for s in list(open_):
                try:
                    s.sendall(b"X")  # one header byte at a time
                except OSError:
                    open_.discard(s)
            for s in select.select(list(open_), [], [], 0.25)[0]:
                try:
                    if s.recv(4096) == b"":
                        open_.discard(s)
                except OSError:
                    open_.discard(s)
        out["slowloris_all_closed_after_s"] = round(time.monotonic() - t0, 2) if not open_ else None
        out["slowloris_still_open"] = len(open_)
        for s in socks:
            s.close()

        stop = threading.Event()

        def flood():
            c = client(port)
            while not stop.is_set():
                try:
                    c.completions.create(model="m", prompt="hi", max_tokens=100, n=1000)
                except openai.BadRequestError:
                    pass

        threads = [threading.Thread(target=flood) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(0.2)
        out["normal_request_during_n1000_floods_s"] = statistics.median(normal_request_seconds(port) for _ in range(3))
        stop.set()
        for t in threads:
            t.join()

        rss, vm = _rss_bytes(), _vm_bytes()
        statuses = [talk(port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 8000000000\r\n\r\n"
                                + b"x" * 65536)[:12].decode() for _ in range(3)]
        out["fake_8gb_bodies"] = {"responses": statuses, "rss_growth_mib": round((_rss_bytes() - rss) / 2**20, 1),
                                  "vm_growth_mib": round((_vm_bytes() - vm) / 2**20, 1)}

        start = engine.num_generated_tokens
        s = _long_request(port, stream=False)  # 4 x 180 tokens
        _wait(lambda: engine.num_generated_tokens - start >= 8)
        at_close = engine.num_generated_tokens - start
        s.close()
        _wait(lambda: not engine.has_unfinished())
        out["disconnect_non_streaming"] = {"requested_tokens": 4 * 180, "generated_at_close": at_close,
                                           "generated_in_all": engine.num_generated_tokens - start}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    record = {"bench": "server_probes", "date": datetime.date.today().isoformat(), "commit": commit.strip(),
              "machine": platform.node(), "cpu": platform.processor() or platform.machine(),
              "cores": os.cpu_count(), "torch": torch.__version__, "results": out}
    print(json.dumps(record, indent=2))
    path = ROOT / "bench" / "results" / f"server_probes_cpu_{record['date']}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
