"""What the checkpoint manifest's CRC-32 costs: skyt1.train_checkpoint.file_crc32 on a 100 MB file, beside
a plain read of the same file (page cache warm, as right after a save), best of 5.

    python bench/checksum.py            # writes bench/results/checksum_cpu_<date>.json

For the 32B recipe a rank's share of a checkpoint is ~48 GB (12 bytes per parameter / 8 ranks), so the
figure below x 48 GB is the time each rank spends checksumming its own files after every save, and
(shared out over the ranks) verifying a checkpoint before resuming from it.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from skyt1.train_checkpoint import _CHUNK, file_crc32  # noqa: E402

MB = 100 * 2**20


def best_of(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def read_only(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(_CHUNK):
            pass


def main() -> int:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "blob.bin"
        path.write_bytes(os.urandom(MB))
        read_only(path)  # warm the page cache
        t_read = best_of(lambda: read_only(path))
        t_crc = best_of(lambda: file_crc32(path))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    rec = {
        "benchmark": "bench/checksum.py",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "device": f"CPU only ({os.cpu_count()} cores, {platform.machine()}), no GPU",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timing": "time.perf_counter, best of 5, page cache warm",
        "load_average_at_start": list(os.getloadavg()),
        "file_bytes": MB,
        "read_seconds": t_read,
        "crc32_seconds": t_crc,
        "crc32_gib_per_s": MB / 2**30 / t_crc,
        "crc32_over_read": t_crc / t_read,
        "seconds_per_48_gb_rank_share": 48e9 / (MB / t_crc),
    }
    out = ROOT / "bench" / "results" / f"checksum_cpu_{rec['date'][:10]}.json"
    out.write_text(json.dumps(rec, indent=1) + "\n")
    print(json.dumps(rec, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
