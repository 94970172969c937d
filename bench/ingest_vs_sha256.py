"""How fast does the blob store take a payload in, against the machine's own limits?

Question: is streamed ingest (hash + write + fsync + rename) held back by anything but
the two things it must do — hash the bytes and put them on disk?

Baselines, measured in the same run on the same bytes:
  * ``hashlib.sha256`` over the same buffers (the hashing floor),
  * writing the same bytes to a file in the same directory and fsyncing it (the disk
    floor).
Ingest overlaps hashing and writing in two threads, so on a healthy machine its time
should be close to the slower of the two floors: ratio ingest / max(floors) near 1.

    .venv/bin/python bench/ingest_vs_sha256.py [--mib 512] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from storage.blobs import BlobStore

CHUNK = 1 << 20


def _chunks(total_mib: int) -> list[bytes]:
    # A pool of distinct random 1 MiB chunks, reused: generating random bytes is not
    # what is measured, and every run sees the same stream.
    pool = [os.urandom(CHUNK) for _ in range(16)]
    return [pool[i % len(pool)] for i in range(total_mib)]


async def _stream(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for c in chunks:
        yield c


def _sha256(chunks: list[bytes]) -> float:
    started = time.perf_counter()
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    h.hexdigest()
    return time.perf_counter() - started


def _disk(chunks: list[bytes], directory: Path) -> float:
    path = directory / "disk-floor.bin"
    started = time.perf_counter()
    with path.open("wb") as f:
        for c in chunks:
            f.write(c)
        f.flush()
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - started
    path.unlink()
    return elapsed


async def _ingest(chunks: list[bytes], directory: Path, run: int) -> float:
    store = BlobStore(directory / f"blobs-{run}")
    started = time.perf_counter()
    info = await store.ingest(_stream(chunks), max_bytes=1 << 40)
    elapsed = time.perf_counter() - started
    await store.delete(info.hash)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=512, help="payload size in MiB")
    parser.add_argument("--repeat", type=int, default=5, help="runs per measurement")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: tmp)")
    args = parser.parse_args()
    chunks = _chunks(args.mib)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        directory = Path(tmp)
        sha, disk, ingest = [], [], []
        for run in range(args.repeat):
            sha.append(_sha256(chunks))
            disk.append(_disk(chunks, directory))
            ingest.append(asyncio.run(_ingest(chunks, directory, run)))
    med = {
        name: statistics.median(v)
        for name, v in (("sha256", sha), ("disk", disk), ("ingest", ingest))
    }
    floor = max(med["sha256"], med["disk"])
    print(f"payload {args.mib} MiB, {args.repeat} runs, medians:")
    for name, seconds in med.items():
        print(f"  {name:7s} {seconds:7.3f} s  {args.mib / seconds:8.1f} MiB/s")
    print(f"ratio ingest / max(sha256, disk) = {med['ingest'] / floor:.2f}  (1.0 = the floor)")
    both = med["sha256"] + med["disk"]
    print(f"ratio ingest / (sha256 + disk)   = {med['ingest'] / both:.2f}")


if __name__ == "__main__":
    main()
