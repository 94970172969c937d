"""How much CPU does refusing an archive that crosses a limit cost?

Question: a payload that breaks a limit (too many members, a decompression bomb, a
declared size over the total) must be refused early and cheaply, before the node has
paid for what the archive asks. How much does the refusal cost, against simply listing
the same archive?

Baseline, measured in the same run: GNU ``tar -tzf`` of the same file (a listing: it
reads every header and decompresses everything, writes nothing). The ratio refusal /
listing is the figure to watch: near or below 1 means refusing costs no more than
reading the archive's headers once.

Archives, made fresh in a temp dir with :mod:`tarfile`:

- ``dirs``: ``max_members + 1`` empty directories (100,001 by default);
- ``files``: ``max_members + 1`` empty files;
- ``bomb``: one member of zeros (1 GiB by default), about 1000:1 compressed;
- ``oversize``: one member declaring more than the total size limit (pax ``size``),
  with one block of data behind it.

CPU is user + system time of this process (``time.process_time``) for extraction and of
the child for ``tar`` (``RUSAGE_CHILDREN``); wall time is printed beside it.

    .venv/bin/python bench/tar_limits.py [--members 100000] [--bomb-mib 1024] [--repeat 3]
        [--cases dirs,files,bomb,oversize]
"""

from __future__ import annotations

import argparse
import gzip
import io
import resource
import shutil
import statistics
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from node.deploy.extract import ExtractLimits, extract_release
from node.errors import DeployFailed


class _Zeros(io.RawIOBase):
    """``n`` zero bytes on demand, so the bomb is never held in memory."""

    _BLOCK = bytes(1 << 20)

    def __init__(self, n: int) -> None:
        self.left = n

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        take = min(self.left, len(self._BLOCK) if size < 0 else size, len(self._BLOCK))
        self.left -= take
        return self._BLOCK[:take]


def _many(path: Path, count: int, kind: bytes) -> Path:
    with tarfile.open(path, "w:gz", format=tarfile.GNU_FORMAT) as tf:
        for i in range(count):
            info = tarfile.TarInfo(f"app/e{i:07d}")
            info.type = kind
            info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
            tf.addfile(info, io.BytesIO(b"") if kind == tarfile.REGTYPE else None)
    return path


def _bomb(path: Path, size: int) -> Path:
    info = tarfile.TarInfo("bomb.bin")
    info.size = size
    with tarfile.open(path, "w:gz", compresslevel=9, copybufsize=1 << 20) as tf:
        tf.addfile(info, _Zeros(size))
    return path


def _oversize(path: Path, limit: int) -> Path:
    """A member whose pax size exceeds ``limit``; its data is cut after one block."""
    buf = io.BytesIO()
    info = tarfile.TarInfo("big.bin")
    info.size = limit + 1
    buf.write(info.tobuf(tarfile.PAX_FORMAT))
    buf.write(b"x" * 512)
    path.write_bytes(gzip.compress(buf.getvalue()))
    return path


def _cpu_tar(archive: Path) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    # A lying archive makes tar exit non-zero; the listing work is what is measured.
    subprocess.run(
        ["tar", "-tzf", str(archive)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, wall


def _cpu_extract(archive: Path, scratch: Path, limits: ExtractLimits) -> tuple[float, float, str]:
    releases = scratch / "releases"
    shutil.rmtree(releases, ignore_errors=True)
    releases.mkdir()
    started_cpu, started = time.process_time(), time.perf_counter()
    outcome = "accepted (!)"
    try:
        extract_release(archive, releases / "rel", limits)
    except DeployFailed as e:
        outcome = f"{e.code}: {e.message[:70]}"
    cpu, wall = time.process_time() - started_cpu, time.perf_counter() - started
    shutil.rmtree(releases, ignore_errors=True)
    return cpu, wall, outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=100_000, help="max_members")
    parser.add_argument("--bomb-mib", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cases", default="dirs,files,bomb,oversize")
    args = parser.parse_args()
    limits = ExtractLimits(max_members=args.members)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        makers: list[tuple[str, str, Callable[[], Path]]] = [
            (
                "dirs",
                f"{args.members + 1:,} empty dirs",
                lambda: _many(root / "dirs.tar.gz", args.members + 1, tarfile.DIRTYPE),
            ),
            (
                "files",
                f"{args.members + 1:,} empty files",
                lambda: _many(root / "files.tar.gz", args.members + 1, tarfile.REGTYPE),
            ),
            (
                "bomb",
                f"{args.bomb_mib} MiB bomb",
                lambda: _bomb(root / "bomb.tar.gz", args.bomb_mib << 20),
            ),
            (
                "oversize",
                "declared size over the limit",
                lambda: _oversize(root / "big.tar.gz", limits.max_total_bytes),
            ),
        ]
        for key, label, make in makers:
            if key not in args.cases.split(","):
                continue
            archive = make()
            tar_cpu, tar_wall, ours_cpu, ours_wall = [], [], [], []
            outcome = ""
            for _ in range(args.repeat):
                c, w = _cpu_tar(archive)
                tar_cpu.append(c)
                tar_wall.append(w)
                c, w, outcome = _cpu_extract(archive, root, limits)
                ours_cpu.append(c)
                ours_wall.append(w)
            t, o = statistics.median(tar_cpu), statistics.median(ours_cpu)
            size = archive.stat().st_size / 1024
            print(f"{label}: archive {size:,.0f} KiB, {args.repeat} runs, medians:")
            print(f"  tar -tzf        cpu {t:7.3f} s  wall {statistics.median(tar_wall):7.3f} s")
            print(f"  extract_release cpu {o:7.3f} s  wall {statistics.median(ours_wall):7.3f} s")
            print(f"  -> {outcome}")
            print(f"  ratio refusal / listing (cpu) = {o / max(t, 1e-6):.2f}")
            archive.unlink()


if __name__ == "__main__":
    main()
