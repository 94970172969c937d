"""A partial fetch of a blob that is dropped goes with it.

Regression test for a defect the real-process fault harness found (soak seed 104, first
schedule generator): a node killed while fetching a payload kept the partial file; the
deploy failed, retention dropped its payload on every node, each node freed the stored
blob, and the partial stayed on disk for good (the start-up sweep keeps well-named
partials, since fetches resume from them).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from storage.blobs import BlobStore


async def _unused() -> bool:
    return True


async def _used() -> bool:
    return False


async def test_dropping_an_unused_blob_removes_its_partial_fetch(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs")
    data = b"half of a payload that never arrived"
    h = hashlib.sha256(data * 2).hexdigest()
    await blobs.append_partial(h, 0, data)
    assert blobs.partial_offset(h) == len(data)
    await blobs.delete_unused(h, _used)
    assert blobs.partial_offset(h) == len(data)  # still wanted: a fetch resumes from it
    await blobs.delete_unused(h, _unused)
    assert blobs.partial_offset(h) == 0
    assert not (tmp_path / "blobs" / "partial" / h).exists()
