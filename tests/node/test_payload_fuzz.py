"""Property: a mutated archive is extracted safely or refused, and never anything else.

Hypothesis writes small valid archives with :mod:`tarfile` (GNU and pax formats, gzip or
plain) and mutates them: flipped bytes, header fields set to hostile values with or
without a repaired checksum (so the mutation gets past the checksum to the rules behind
it), inserted pax and GNU long-name headers, truncation, spliced, duplicated and dropped
blocks, appended data, damaged gzip. For every archive, ``extract_release`` must either

- succeed, leaving only regular files (mode 0644 or 0755) and directories (0755) inside
  the release, and exactly the files and bytes that :mod:`tarfile` reads from the same
  archive; or
- fail with ``unsafe_payload`` or ``bad_payload`` and leave nothing behind;

never raise anything else, and never write outside the release directory.

CI runs ``CAIRN_FUZZ_EXAMPLES`` examples (default 300) derandomized, so every run checks
the same archives in a few seconds. Setting the variable switches to random examples for
a soak (from the worktree root)::

    CAIRN_FUZZ_EXAMPLES=20000 .venv/bin/pytest -q -p no:cacheprovider \\
        tests/node/test_payload_fuzz.py
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import tarfile
import zlib
from collections.abc import Callable
from itertools import count
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tarcraft import data, gnu_long, gz, octal, pax, pax_records, with_checksum

from node.deploy.extract import ExtractLimits, extract_release
from node.deploy.tarheaders import byte_sum
from node.errors import DeployFailed

EXAMPLES = int(os.environ.get("CAIRN_FUZZ_EXAMPLES", "300"))
SOAK = "CAIRN_FUZZ_EXAMPLES" in os.environ
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # nothing written into the worktree
    derandomize=not SOAK,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
LIMITS = ExtractLimits(max_members=64, max_total_bytes=256 << 10, ratio_floor_bytes=1 << 20)

# -- archives --------------------------------------------------------------------------

_COMPONENTS = [b"a", b"b", b"app", b"sub", b"f.txt", b"caf\xc3\xa9", b"x" * 120, b"d" * 60]
_MODES = [0o644, 0o755, 0o600, 0o777, 0o4755, 0o2644, 0o1777]
_names = st.lists(st.sampled_from(_COMPONENTS), min_size=1, max_size=3).map(b"/".join)
_members = st.lists(
    st.tuples(st.booleans(), _names, st.binary(max_size=1500), st.sampled_from(_MODES)),
    max_size=6,
    unique_by=lambda m: m[1],  # duplicates come from the mutations, not from every draw
)


def _write(members: list[tuple[bool, bytes, bytes, int]], fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for is_dir, name, content, mode in members:
            info = tarfile.TarInfo(name.decode("utf-8", "surrogateescape"))
            info.mode = mode
            info.mtime = 1_700_000_000
            if is_dir:
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            else:
                info.size = len(content)
                tf.addfile(info, io.BytesIO(content))
    return buf.getvalue()


# -- mutations ---------------------------------------------------------------------------

_FIELDS = {
    "name": (0, 100),
    "mode": (100, 8),
    "uid": (108, 8),
    "size": (124, 12),
    "mtime": (136, 12),
    "type": (156, 1),
    "linkname": (157, 100),
    "magic": (257, 8),
    "devmajor": (329, 8),
    "prefix": (345, 155),
}
_VALUES = {
    "name": [b"../evil", b"/tmp/evil", b"a\0/../evil", b"", b"a/b/", b"./", b"a//b", b"n\nl"],
    "mode": [octal(0o4777, 8), b"zzzzzzz\0", b"\x80" + bytes(6) + b"\x01", b" 755 \0\0\0"],
    "uid": [b"-000001\0", b"\xff" * 8, b""],
    "size": [
        octal(0, 12),
        octal(1, 12),
        octal(600, 12),
        octal(8 << 30, 12)[-12:],
        b"\x80" + (5).to_bytes(11, "big"),
        b"\xff" * 12,
        b"+0000000001\0",
        b"\x0000000001000",
        b" " * 12,
    ],
    "mtime": [b"\xff" * 12, b"+1\0", b""],
    "type": [bytes([c]) for c in b"0123456 7LKxgSVMDNZ\0"],
    "linkname": [b"", b"/etc", b"a", b"../../x"],
    "magic": [b"ustar\x0000", b"ustar  \0", b"", b"garbage!"],
    "devmajor": [b"xyz", b"", b"0\0"],
    "prefix": [b"", b"..", b"pre", b"/abs", b"a\nb"],
}
_PAX = [
    (b"path", b"../evil"),
    (b"path", b"/tmp/evil"),
    (b"path", b"innocent"),
    (b"path", b""),
    (b"path", b"a\0b"),
    (b"linkpath", b"/etc"),
    (b"size", b"0"),
    (b"size", b"5"),
    (b"size", b"99999999999"),
    (b"size", b"+1"),
    (b"mtime", b"1.5"),
    (b"mtime", b"nan"),
    (b"comment", b"c"),
    (b"GNU.sparse.major", b"1"),
    (b"hdrcharset", b"BINARY"),
]
_TAILS = [bytes(512), bytes(1024), b"JUNK", b"\x1f\x8b", gz(b""), gz(bytes(1024))]

Mutation = Callable[[bytes], bytes]


def _blocks(raw: bytes) -> int:
    return max(1, len(raw) // 512)


def _headers(raw: bytes) -> list[int]:
    """Block indexes that look like headers (ustar magic), else every block."""
    found = [i for i in range(_blocks(raw)) if raw[i * 512 + 257 : i * 512 + 262] == b"ustar"]
    return found or list(range(_blocks(raw)))


def _set_field(pick: int, field: str, value: bytes, repair: bool) -> Mutation:
    def apply(raw: bytes) -> bytes:
        heads = _headers(raw)
        start = heads[pick % len(heads)] * 512
        if start + 512 > len(raw):
            return raw
        block = bytearray(raw[start : start + 512])
        offset, width = _FIELDS[field]
        block[offset : offset + width] = value.ljust(width, b"\0")[:width]
        fixed = with_checksum(block) if repair else bytes(block)
        return raw[:start] + fixed + raw[start + 512 :]

    return apply


def _flip(at: int, xor: int, repair: bool) -> Mutation:
    def apply(raw: bytes) -> bytes:
        if not raw:
            return raw
        pos = at % len(raw)
        out = raw[:pos] + bytes([raw[pos] ^ xor]) + raw[pos + 1 :]
        start = pos - pos % 512
        if repair and start + 512 <= len(out):
            out = out[:start] + with_checksum(out[start : start + 512]) + out[start + 512 :]
        return out

    return apply


def _insert(at: int, chunk: bytes) -> Mutation:
    def apply(raw: bytes) -> bytes:
        pos = (at % _blocks(raw)) * 512
        return raw[:pos] + chunk + raw[pos:]

    return apply


def _splice(src: int, dst: int, n: int) -> Mutation:
    def apply(raw: bytes) -> bytes:
        blocks = _blocks(raw)
        s = (src % blocks) * 512
        d = (dst % blocks) * 512
        return raw[:d] + raw[s : s + n * 512] + raw[d:]

    return apply


def _drop(at: int, n: int) -> Mutation:
    def apply(raw: bytes) -> bytes:
        pos = (at % _blocks(raw)) * 512
        return raw[:pos] + raw[pos + n * 512 :]

    return apply


def _truncate(at: int) -> Mutation:
    return lambda raw: raw[: at % (len(raw) + 1)]


def _append(tail: bytes) -> Mutation:
    return lambda raw: raw + tail


_index = st.integers(min_value=0, max_value=1 << 20)
_field_change = st.builds(
    lambda f, pick, i, repair: _set_field(pick, f, _VALUES[f][i % len(_VALUES[f])], repair),
    st.sampled_from(sorted(_FIELDS)),
    _index,
    _index,
    st.booleans(),
)
_mutation = st.one_of(
    _field_change,
    _field_change,  # weighted: a field change with a repaired checksum reaches the rules
    _field_change,
    st.builds(_flip, _index, st.integers(1, 255), st.booleans()),
    st.builds(
        _insert,
        _index,
        st.lists(st.sampled_from(_PAX), min_size=1, max_size=3).map(pax)
        | st.builds(pax, st.lists(st.sampled_from(_PAX), min_size=1, max_size=2), st.just(b"g"))
        | st.builds(
            gnu_long,
            st.sampled_from([b"long", b"../evil", b"d/", b"a\0b"]),
            st.sampled_from([b"L", b"K"]),
        )
        | st.binary(min_size=1, max_size=64).map(data),
    ),
    st.builds(_splice, _index, _index, st.integers(1, 3)),
    st.builds(_splice, _index, _index, st.just(1)),  # a duplicated block
    st.builds(_drop, _index, st.integers(1, 2)),
    st.builds(_truncate, _index),
    st.builds(_append, st.sampled_from(_TAILS)),
)


def _damage_gzip(blob: bytes, how: int, at: int) -> bytes:
    if how == 0:  # a flipped compressed byte
        pos = at % len(blob)
        return blob[:pos] + bytes([blob[pos] ^ 0x5A]) + blob[pos + 1 :]
    if how == 1:
        return blob[: at % len(blob)]
    if how == 2:
        return blob + b"JUNK"
    return blob[: len(blob) // 2] + gz(blob[len(blob) // 2 :])  # a second member


@st.composite
def _archives(draw: st.DrawFn) -> bytes:
    fmt = draw(st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]))
    raw = _write(draw(_members), fmt)
    for mutate in draw(st.lists(_mutation, max_size=4)):
        raw = mutate(raw)
    packing = draw(st.sampled_from(["gzip", "gzip", "plain", "damaged gzip", "split gzip"]))
    if packing == "plain":
        return raw
    if packing == "split gzip":
        cut = draw(_index) % (len(raw) + 1)
        return gz(raw[:cut]) + gz(raw[cut:])
    blob = gz(raw)
    if packing == "damaged gzip":
        blob = _damage_gzip(blob, draw(st.integers(0, 3)), draw(_index))
    return blob


# -- the invariant -----------------------------------------------------------------------


def _normal(name: bytes) -> bytes:
    return b"/".join(p for p in name.split(b"/") if p not in (b"", b"."))


def _release_tree(root: Path) -> tuple[dict[bytes, bytes], set[bytes]]:
    """Files and directories under ``root``, checking types and modes on the way."""
    files: dict[bytes, bytes] = {}
    dirs: set[bytes] = set()
    base = os.fsencode(root)
    assert stat.S_IMODE(os.lstat(base).st_mode) == 0o755
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, base)
            st_ = os.lstat(full)
            if stat.S_ISDIR(st_.st_mode):
                assert stat.S_IMODE(st_.st_mode) == 0o755, rel
                dirs.add(rel)
            else:
                assert stat.S_ISREG(st_.st_mode), (rel, oct(st_.st_mode))
                assert stat.S_IMODE(st_.st_mode) in (0o644, 0o755), (rel, oct(st_.st_mode))
                with open(full, "rb") as f:
                    files[rel] = f.read()
    return files, dirs


def _tarfile_view(blob: bytes) -> tuple[dict[bytes, bytes], set[bytes]]:
    """What tarfile reads from ``blob``: its files (normalised) and directories."""
    files: dict[bytes, bytes] = {}
    dirs: set[bytes] = set()
    with tarfile.open(fileobj=io.BytesIO(blob)) as tf:
        for member in tf:
            path = _normal(os.fsencode(member.name))
            if member.isreg():
                extracted = tf.extractfile(member)
                assert extracted is not None
                files[path] = extracted.read()
            else:
                assert member.isdir(), (member.name, member.type)
                if path:
                    dirs.add(path)
    for path in list(files) + list(dirs):
        while b"/" in path:
            path = path.rpartition(b"/")[0]
            dirs.add(path)
    return files, dirs


def _unflatten(
    tree: tuple[dict[bytes, bytes], set[bytes]], root: bytes
) -> tuple[dict[bytes, bytes], set[bytes]]:
    files, dirs = tree
    return (
        {root + b"/" + p: c for p, c in files.items()},
        {root} | {root + b"/" + d for d in dirs},
    )


def _snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    out: dict[str, tuple[int, bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st_ = os.lstat(p)
            content = p.read_bytes() if stat.S_ISREG(st_.st_mode) else b""
            out[str(p.relative_to(root))] = (st_.st_mode, content)
    return out


@pytest.fixture(scope="module")
def arena(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("fuzz")
    (base / "canary").mkdir()
    (base / "canary" / "secret.txt").write_bytes(b"do not touch\n")
    return base


_runs = count()


@pytest.mark.timeout(120 + EXAMPLES)  # one test runs every example: a soak needs more
@FUZZ
@given(blob=_archives())
def test_mutated_archive_is_extracted_safely_or_refused(arena: Path, blob: bytes) -> None:
    work = arena / f"run{next(_runs)}"
    releases = work / "releases"
    releases.mkdir(parents=True)
    payload = work / "payload"
    payload.write_bytes(blob)
    dest = releases / "rel"
    before = _snapshot(arena / "canary")
    tmp_evil = os.path.lexists("/tmp/evil")
    try:
        try:
            result = extract_release(payload, dest, LIMITS)
        except DeployFailed as e:
            assert e.code in ("unsafe_payload", "bad_payload"), e
            assert os.listdir(releases) == []
        else:
            assert os.listdir(releases) == ["rel"]
            ours = _release_tree(dest)
            theirs = _tarfile_view(blob)
            if result.flattened:
                (root,) = {p.split(b"/")[0] for p in list(theirs[0]) + list(theirs[1])}
                ours = _unflatten(ours, root)
            assert ours == theirs
            assert (result.files, result.bytes) == (len(ours[0]), sum(map(len, ours[0].values())))
        assert sorted(os.listdir(work)) == ["payload", "releases"]
        assert _snapshot(arena / "canary") == before
        assert os.path.lexists("/tmp/evil") == tmp_evil
    finally:
        shutil.rmtree(work)


@settings(max_examples=EXAMPLES, database=None, derandomize=not SOAK)
@given(st.binary(max_size=512))
def test_byte_sum_is_the_sum_of_the_bytes(data_: bytes) -> None:
    assert byte_sum(data_) == sum(data_)


def test_byte_sum_at_the_adler_modulus() -> None:
    """Sums near and past adler32's modulus, where the fast path would wrap."""
    for fill in (127, 128, 200, 255):
        for n in (256, 257, 300, 512):
            block = bytes([fill]) * n
            assert byte_sum(block) == sum(block), (fill, n)
    assert zlib.adler32(b"") == 1  # the offset byte_sum relies on
    assert pax_records([(b"k", b"v")]) == b"6 k=v\n"
