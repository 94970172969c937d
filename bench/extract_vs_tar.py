"""How fast is safe extraction against ``tar -xzf`` of the same bytes?

Question: what does extracting through cairn's checks (streamed parsing, per-member
rules, masked modes, O_NOFOLLOW creation, one rename to publish) cost compared with the
system's tar on the same archive?

Baseline, measured in the same run: GNU ``tar -xzf`` of the same file into an empty
directory. Both write to the same file system; both are followed by nothing (no fsync).
The ratio extract / tar is what to watch: near 1 means the checks are nearly free.

Archives: a "big files" tree (a few 8 MiB files of random bytes, gzip level 1) and a
"many files" tree (thousands of small text files), made fresh in a temp dir.

    .venv/bin/python bench/extract_vs_tar.py [--repeat 5] [--big-mib 128] [--files 4000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

from node.deploy.extract import ExtractLimits, extract_release


def _make_tree(root: Path, *, big_mib: int, files: int) -> tuple[Path, Path]:
    big, many = root / "big", root / "many"
    (big / "app").mkdir(parents=True)
    for i in range(max(1, big_mib // 8)):
        (big / "app" / f"blob{i}.bin").write_bytes(os.urandom(8 << 20))
    for i in range(files):
        d = many / "app" / f"d{i % 50}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}.txt").write_text(f"file {i}\n" * 20)
    return big, many


def _archive(tree: Path, out: Path) -> Path:
    with tarfile.open(out, "w:gz", compresslevel=1) as tar:
        tar.add(tree / "app", arcname="app")
    return out


def _time_tar(archive: Path, scratch: Path) -> float:
    dest = scratch / "tar-out"
    dest.mkdir()
    started = time.perf_counter()
    subprocess.run(["tar", "-xzf", str(archive), "-C", str(dest)], check=True)
    elapsed = time.perf_counter() - started
    shutil.rmtree(dest)
    return elapsed


def _time_extract(archive: Path, scratch: Path) -> float:
    dest = scratch / "cairn-out"
    limits = ExtractLimits(max_total_bytes=1 << 40)
    started = time.perf_counter()
    extract_release(archive, dest, limits)
    elapsed = time.perf_counter() - started
    shutil.rmtree(dest)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--big-mib", type=int, default=128)
    parser.add_argument("--files", type=int, default=4000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        big, many = _make_tree(root / "src", big_mib=args.big_mib, files=args.files)
        for label, tree in (("big files", big), ("many files", many)):
            archive = _archive(tree, root / f"{tree.name}.tar.gz")
            tar_s, ours = [], []
            for _ in range(args.repeat):
                tar_s.append(_time_tar(archive, root))
                ours.append(_time_extract(archive, root))
            t, o = statistics.median(tar_s), statistics.median(ours)
            size = archive.stat().st_size / (1 << 20)
            print(f"{label}: archive {size:.1f} MiB, {args.repeat} runs, medians:")
            print(f"  tar -xzf        {t:7.3f} s")
            print(f"  extract_release {o:7.3f} s")
            print(f"  ratio extract / tar = {o / t:.2f}")


if __name__ == "__main__":
    main()
