"""Deploy payloads for simulated histories: tiny, deterministic tar.gz files.

No ``component.toml``, so no hook or process ever runs. Every byte comes from the
history's randomness (gzip and tar headers carry no clock), so a seed makes the same
payloads, and so the same blob hashes, in every run.
"""

from __future__ import annotations

import gzip
import io
import random
import tarfile

__all__ = ["KINDS", "make_payload", "tar_gz"]

#: Payload kinds and how often a deploy uses each.
KINDS = {"small": 0.75, "large": 0.12, "bad": 0.08, "empty": 0.05}


def tar_gz(files: dict[str, bytes]) -> bytes:
    """A tar.gz of ``files`` with fixed metadata (same input, same bytes)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size = len(files[name])
            info.mtime = 0
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(files[name]))
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as gz:
        gz.write(raw.getvalue())
    return out.getvalue()


def make_payload(rng: random.Random, kind: str) -> bytes:
    """A payload of ``kind``: ``small`` (a few hundred bytes), ``large`` (several
    chunks of incompressible data: a transfer that can break off and resume), ``bad``
    (not a tarball: every node fails to stage it) or ``empty`` (a valid empty tar)."""
    if kind == "bad":
        return b"this is not a tarball " + rng.randbytes(rng.randint(1, 64))
    if kind == "empty":
        return tar_gz({})
    size = rng.randint(300_000, 900_000) if kind == "large" else rng.randint(8, 600)
    return tar_gz(
        {
            "app/VERSION": str(rng.getrandbits(32)).encode(),
            "app/data.bin": rng.randbytes(size),
        }
    )
