"""Builds the hostile payload corpus for the extraction tests, in a temp directory.

Nothing binary is committed: every archive is written here with :mod:`tarfile` (which
writes whatever names and types it is given) or byte by byte with :mod:`tarcraft` for
the malformed ones and the parser-difference tricks. Each :class:`Case` says which
``DeployFailed`` code extraction must answer and, where the failure is about one member,
a fragment the message must contain. :func:`build_accepted` writes the tricks cairn reads
exactly as GNU tar and tarfile do, with what each must extract to.
"""

from __future__ import annotations

import bz2
import gzip
import io
import os
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tarcraft import (
    END,
    data,
    gnu_long,
    gz,
    header,
    pax,
    pax_records,
    signed_checksum,
    with_checksum,
)

from node.deploy.extract import ExtractLimits

__all__ = [
    "Accepted",
    "Case",
    "Member",
    "build_accepted",
    "build_corpus",
    "dir_member",
    "file_member",
    "write_bomb",
    "write_tar",
]

Member = tuple[tarfile.TarInfo, bytes | None]
DEFAULT_LIMITS = ExtractLimits()


@dataclass(frozen=True)
class Case:
    name: str
    path: Path
    code: str  # "unsafe_payload" or "bad_payload"
    needle: str | None = None  # must appear in the error message
    limits: ExtractLimits = DEFAULT_LIMITS


def file_member(name: str, data: bytes = b"x", mode: int = 0o644) -> Member:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = 1_700_000_000
    return info, data


def dir_member(name: str, mode: int = 0o755) -> Member:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = mode
    return info, None


def _special(name: str, kind: bytes, linkname: str = "", dev: tuple[int, int] = (0, 0)) -> Member:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.devmajor, info.devminor = dev
    return info, None


def write_tar(
    path: Path,
    members: Iterable[Member],
    *,
    compress: bool = True,
    fmt: int = tarfile.PAX_FORMAT,
) -> Path:
    """Write ``members`` as a tar (gzip-compressed unless ``compress`` is false)."""
    with tarfile.open(path, "w:gz" if compress else "w", format=fmt) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


class _Zeros(io.RawIOBase):
    """``n`` zero bytes, produced on demand so a bomb never sits in memory."""

    _BLOCK = bytes(1 << 20)

    def __init__(self, n: int) -> None:
        self.left = n

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        take = min(self.left, len(self._BLOCK) if size < 0 else size, len(self._BLOCK))
        self.left -= take
        return self._BLOCK[:take]


def write_bomb(path: Path, zero_bytes: int) -> Path:
    """A tar.gz holding one file of ``zero_bytes`` zeros (ratio about 1000:1), streamed."""
    info = tarfile.TarInfo("bomb.bin")
    info.size = zero_bytes
    with tarfile.open(path, "w:gz", compresslevel=9, copybufsize=1 << 20) as tf:
        tf.addfile(info, _Zeros(zero_bytes))
    return path


def _raw(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def build_corpus(out: Path, canary: Path) -> list[Case]:
    """Write every hostile payload under ``out``; ``canary`` is a directory to aim at."""
    out.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []

    def tar(
        name: str,
        members: list[Member],
        needle: str | None,
        code: str = "unsafe_payload",
        limits: ExtractLimits = DEFAULT_LIMITS,
        fmt: int = tarfile.PAX_FORMAT,
    ) -> None:
        path = write_tar(out / f"{name}.tar.gz", members, fmt=fmt)
        cases.append(Case(name, path, code, needle, limits))

    def raw(name: str, data: bytes, code: str = "bad_payload") -> None:
        cases.append(Case(name, _raw(out / name, data), code))

    ok = file_member("ok.txt")
    tar("traversal", [ok, file_member("../evil")], "../evil")
    tar("nested_traversal", [ok, file_member("a/../../evil")], "a/../../evil")
    tar("deep_traversal", [file_member("../../canary/evil")], "../../canary/evil")
    tar("absolute", [ok, file_member(f"{canary}/evil_abs")], f"{canary}/evil_abs")
    tar("absolute_tmp", [file_member("/tmp/evil")], "/tmp/evil")
    tar("symlink_etc", [_special("etc", tarfile.SYMTYPE, "/etc")], "symbolic link")
    tar("symlink_up", [_special("up", tarfile.SYMTYPE, "../..")], "symbolic link")
    tar(
        "symlink_then_write",
        [_special("esc", tarfile.SYMTYPE, str(canary)), file_member("esc/pwned", b"owned")],
        "esc",
    )
    tar(
        "hardlink_outside",
        [_special("h", tarfile.LNKTYPE, str(canary / "secret.txt"))],
        "hard link",
    )
    tar("hardlink_inside", [file_member("a"), _special("b", tarfile.LNKTYPE, "a")], "hard link")
    tar("char_device", [_special("null", tarfile.CHRTYPE, dev=(1, 3))], "character device")
    tar("block_device", [_special("sda", tarfile.BLKTYPE, dev=(8, 0))], "block device")
    tar("fifo", [_special("pipe", tarfile.FIFOTYPE)], "FIFO")
    tar("gnu_sparse", [_special("sparse", tarfile.GNUTYPE_SPARSE)], "sparse")
    tar("volume_label", [_special("vol", b"V")], "vol")
    tar("duplicate_file", [file_member("a"), file_member("a", b"again")], "duplicate")
    tar("duplicate_dir_file", [dir_member("x"), file_member("x")], "duplicate")
    tar("duplicate_file_dir", [file_member("x"), dir_member("x")], "duplicate")
    tar("duplicate_normalized", [file_member("./a"), file_member("a")], "duplicate")
    tar("file_under_file", [file_member("a"), file_member("a/b")], "a/b")
    tar("file_over_implicit_dir", [file_member("d/f"), file_member("d")], "directory")
    tar("control_char", [file_member("bad\x01name")], "control character")
    tar("newline_name", [file_member("new\nline")], "control character")
    tar("del_char", [file_member("del\x7f")], "control character")
    nul = file_member("placeholder")
    nul[0].pax_headers = {"path": "a\x00b"}
    tar("nul_in_pax_path", [nul], "control character")
    tar("empty_name", [file_member("")], "empty name")
    tar("root_is_file", [file_member(".")], "root")
    tar("long_path", [file_member("a/" * 2100 + "f")], "longer than 4096")
    tar("long_component", [file_member("n" * 300)], "longer than 255")
    tar(
        "gnu_longname_traversal",
        [file_member("x" * 120 + "/../../evil")],
        "../../evil",
        fmt=tarfile.GNU_FORMAT,
    )
    negative = file_member("neg")
    negative[0].size = -(10**12)
    tar(
        "negative_size",
        [(negative[0], None), file_member("b")],
        None,
        "bad_payload",
        fmt=tarfile.GNU_FORMAT,
    )
    dir_data = dir_member("d")
    dir_data[0].size = 3
    tar("dir_with_data", [(dir_data[0], b"abc")], "directory with data")
    big_pax = file_member("f")
    big_pax[0].pax_headers = {"comment": "c" * (2 << 20)}
    tar("huge_pax_header", [big_pax], "extended header")
    tar(
        "too_many_members",
        [file_member(f"f{i}") for i in range(50)],
        "more than 10 members",
        limits=ExtractLimits(max_members=10),
    )
    tar(
        "too_many_bytes",
        [file_member("a", bytes(600)), file_member("b", bytes(600))],
        "exceeds 1000 bytes",
        limits=ExtractLimits(max_total_bytes=1000),
    )
    bomb = write_bomb(out / "bomb_small.tar.gz", 8 << 20)
    cases.append(
        Case(
            "bomb_small",
            bomb,
            "unsafe_payload",
            "decompression",
            ExtractLimits(max_ratio=50, ratio_floor_bytes=1 << 20),
        )
    )

    good = write_tar(
        out / "good.tar.gz", [dir_member("app"), file_member("app/x", os.urandom(4096))]
    )
    good_bytes = good.read_bytes()
    plain = write_tar(out / "good.tar", [file_member("a", b"a" * 2000)], compress=False)
    raw("empty", b"")
    raw("garbage", os.urandom(4096))
    raw("text", b"hello, this is not an archive\n" * 40)
    raw("truncated_gzip", good_bytes[: len(good_bytes) // 2])
    raw("truncated_gzip_trailer", good_bytes[:-4])
    corrupt = bytearray(good_bytes)
    for i in range(30, 60):
        corrupt[i] ^= 0xFF
    raw("corrupt_gzip", bytes(corrupt))
    raw("truncated_tar", plain.read_bytes()[: 512 + 2048])  # one member, no end marker
    raw("truncated_tar_data", plain.read_bytes()[:1000])
    raw("gzip_of_garbage", gzip.compress(os.urandom(2048)))
    raw("bzip2_tar", bz2.compress(plain.read_bytes()))
    raw("trailing_garbage_gzip", good_bytes + b"JUNKJUNKJUNK")
    return cases + _crafted(out, canary)


MEMBERS_10 = ExtractLimits(max_members=10)
_U, _B = "unsafe_payload", "bad_payload"


def _file(name: bytes, content: bytes = b"x", **kw: Any) -> bytes:
    return header(name, size=len(content), **kw) + data(content)


def _dir(name: bytes) -> bytes:
    return header(name, kind=b"5", mode=0o755)


def _crafted(out: Path, canary: Path) -> list[Case]:
    """Header-level tricks, written byte by byte (see docs/payloads.md for each)."""
    cases: list[Case] = []

    def case(
        name: str,
        raw: bytes,
        code: str,
        needle: str | None,
        limits: ExtractLimits = DEFAULT_LIMITS,
        compress: bool = True,
    ) -> None:
        path = out / f"{name}.{'tar.gz' if compress else 'bin'}"
        path.write_bytes(gz(raw) if compress else raw)
        cases.append(Case(name, path, code, needle, limits))

    ok = _file(b"ok.txt", b"ok")
    evil = str(canary / "evil").encode()

    # pax path and linkpath overrides: the pax value is what both readers use.
    case(
        "pax_path_traversal", pax([(b"path", b"../evil")]) + _file(b"innocent") + END, _U, "../evil"
    )
    case("pax_path_absolute", pax([(b"path", evil)]) + _file(b"innocent") + END, _U, "absolute")
    for name, value in [("escape", b"a\x1b[2Jb"), ("newline", b"x\ny"), ("c1", b"a\xc2\x9bb")]:
        raw = pax([(b"path", value)]) + _file(b"innocent") + END
        case(f"pax_path_{name}", raw, _U, "control character")
    case("pax_path_empty", pax([(b"path", b"")]) + _file(b"innocent") + END, _U, "empty name")
    long_path = b"d/" * 2100 + b"f"
    case("pax_path_long", pax([(b"path", long_path)]) + _file(b"f") + END, _U, "longer than 4096")
    symlink = header(b"s", kind=b"2", linkname=b"harmless")
    case("pax_linkpath_symlink", pax([(b"linkpath", b"/etc")]) + symlink + END, _U, "symbolic link")
    hard = header(b"h", kind=b"1", linkname=b"ok.txt")
    secret = str(canary / "secret.txt").encode()
    case("pax_linkpath_hardlink", ok + pax([(b"linkpath", secret)]) + hard + END, _U, "hard link")
    case("pax_linkpath_on_file", pax([(b"linkpath", b"/etc")]) + ok + END, _U, "link target")
    for key in (b"path", b"linkpath", b"size"):
        raw = pax([(key, b"0")], kind=b"g") + ok + END
        case(f"pax_global_{key.decode()}", raw, _U, f"global pax header sets '{key.decode()}'")
    size_lie = pax([(b"size", b"1")]) + header(b"a", size=600) + data(b"A" * 600) + END
    case("pax_size_disagrees", size_lie, _B, "disagrees")
    case("pax_size_malformed", pax([(b"size", b"+1")]) + _file(b"a") + END, _B, "pax size")
    huge = pax([(b"size", str(17 << 30).encode())]) + header(b"big", size=0) + data(b"x") + END
    case("pax_size_over_total", huge, _U, "exceeds")
    two = pax([(b"path", b"first")]) + pax([(b"path", b"second")]) + _file(b"u") + END
    case("pax_two_headers", two, _B, "two pax headers")
    for name, body in [
        ("no_newline", b"11 path=ppX"),
        ("trailing_nul", pax_records([(b"path", b"pp")]) + bytes(8)),
        ("bad_length", b"99 path=pp\n"),
        ("no_digits", b" path=pp\n"),
    ]:
        case(f"pax_record_{name}", pax(body) + _file(b"u") + END, _B, "malformed pax header")
    case("pax_record_no_equals", pax(b"8 pathp\n") + _file(b"u") + END, _B, "malformed pax record")
    case("pax_at_end", ok + pax([(b"path", b"p")]) + END, _B, "ends after an extended header")
    global_at_end = ok + pax([(b"comment", b"c")], kind=b"g") + END  # found by the fuzz test
    case("pax_global_at_end", global_at_end, _B, "ends after an extended header")
    between = pax([(b"path", b"p")]) + pax([(b"comment", b"c")], kind=b"g") + _file(b"u") + END
    case("pax_global_between", between, _B, "global pax header between")
    globals_ = pax([(b"comment", b"c")], kind=b"g") * 17 + ok + END
    case("pax_too_many_globals", globals_, _U, "global pax headers")
    records = [(b"comment", b"%d" % i) for i in range(100)]
    case("pax_too_many_records", pax(records) + ok + END, _U, "too many pax records", MEMBERS_10)
    case("pax_dir_with_size", pax([(b"size", b"100")]) + _dir(b"d") + END, _U, "directory with")

    # Sparse members, in every encoding: refused, not expanded.
    sparse_00 = [(b"GNU.sparse.size", b"10"), (b"GNU.sparse.numblocks", b"1")]
    sparse_00 += [(b"GNU.sparse.offset", b"0"), (b"GNU.sparse.numbytes", b"1")]
    case("pax_sparse_00", pax(sparse_00) + _file(b"s") + END, _U, "sparse")
    sparse_01 = [(b"GNU.sparse.size", b"10"), (b"GNU.sparse.map", b"0,1")]
    case("pax_sparse_01", pax(sparse_01) + _file(b"s") + END, _U, "sparse")
    sparse_10 = [(b"GNU.sparse.major", b"1"), (b"GNU.sparse.minor", b"0")]
    sparse_10 += [(b"GNU.sparse.name", b"real"), (b"GNU.sparse.realsize", b"10")]
    raw = pax(sparse_10) + _file(b"GNUSparseFile.0/real", b"1\n0\n1\n".ljust(512, b"\0")) + END
    case("pax_sparse_10", raw, _U, "sparse")
    case("pax_global_sparse", pax(sparse_10, kind=b"g") + ok + END, _U, "sparse")

    # GNU long names and long links.
    case("gnu_longname_absolute", gnu_long(evil) + _file(b"x") + END, _U, "absolute")
    nul_name = header(b"././@LongLink", size=12, kind=b"L") + data(b"ok\0/../evil\0")
    case("gnu_longname_nul", nul_name + _file(b"x") + END, _U, "after a NUL")
    case("gnu_longname_control", gnu_long(b"a\nb") + _file(b"x") + END, _U, "control character")
    case("gnu_longname_long", gnu_long(long_path) + _file(b"x") + END, _U, "longer than 4096")
    two_l = gnu_long(b"first") + gnu_long(b"second") + _file(b"x") + END
    case("gnu_two_longnames", two_l, _B, "two GNU long names")
    both = gnu_long(b"long") + pax([(b"path", b"paxp")]) + _file(b"x") + END
    case("gnu_longname_and_pax_path", both, _B, "both a GNU long name and a pax path")
    case("gnu_longname_at_end", ok + gnu_long(b"x") + END, _B, "ends after an extended header")
    link_k = gnu_long(b"/etc", b"K") + header(b"s", kind=b"2", linkname=b"x")
    case("gnu_longlink_symlink", link_k + END, _U, "symbolic link")
    case("gnu_longlink_on_file", gnu_long(b"/etc", b"K") + ok + END, _U, "link target")
    both_k = gnu_long(b"/a", b"K") + pax([(b"linkpath", b"/b")]) + symlink + END
    case("gnu_longlink_and_pax_linkpath", both_k, _B, "both a GNU long link")
    hidden_records = pax_records([(b"path", b"pp")])
    in_padding = (hidden_records + pax_records([(b"path", b"evil")])).ljust(512, b"\0")
    raw = header(b"./PaxHeaders/f", size=len(hidden_records), kind=b"x") + in_padding
    case("pax_records_in_padding", raw + _file(b"u") + END, _B, "padding of an extended")
    long_padding = header(b"././@LongLink", size=3, kind=b"L") + b"abcdefgh".ljust(512, b"\0")
    case("gnu_longname_in_padding", long_padding + _file(b"u") + END, _B, "padding of an extended")
    short_ext = header(b"./PaxHeaders/f", size=2000, kind=b"x") + data(b"x" * 600)
    case("ext_header_truncated", ok + short_ext, _B, "truncated")

    # Header formats the two readers take differently.
    gnu_prefix = _file(b"evil", magic=b"ustar  \0", prefix=b"..") + END
    case("prefix_gnu_magic", ok + gnu_prefix, _B, "prefix field")
    case("prefix_v7", ok + _file(b"a", magic=b"", prefix=b"pre") + END, _B, "prefix field")
    case("prefix_traversal", _file(b"evil", prefix=b"../..") + END, _U, "../../evil")
    areg_pax = pax([(b"path", b"f")]) + header(b"d/", kind=b"\0") + END
    case("areg_slash_pax", areg_pax, _B, "ambiguous old-style directory")
    areg_long = gnu_long(b"d/") + header(b"x", kind=b"\0") + END
    case("areg_slash_long", areg_long, _B, "ambiguous old-style directory")
    case("regular_trailing_slash", header(b"f/", kind=b"0") + END, _U, "ends with '/'")
    case("link_on_regular", _file(b"a", linkname=b"/etc/passwd") + END, _U, "link target")
    case("unknown_type", _file(b"z", kind=b"Z") + END, _U, "member type")
    case("multivolume", _file(b"m", kind=b"M") + END, _U, "multi-volume")
    case("dumpdir", _file(b"d", b"Yx\0\0", kind=b"D") + END, _U, "dump directory")
    case("hardlink_self", header(b"a", kind=b"1", linkname=b"a") + END, _U, "hard link")

    # Duplicates, also after normalisation.
    for name, second in [
        ("double_slash", b"a//b"),
        ("dot_segment", b"a/./b"),
        ("dot_prefix", b"./a/b"),
        ("trailing_dot", b"a/b/."),
    ]:
        case(f"duplicate_{name}", _file(b"a/b") + _file(second) + END, _U, "duplicate")
    case("duplicate_dir_slash", _dir(b"d") + _dir(b"d/") + END, _U, "duplicate")
    via_pax = _file(b"a") + pax([(b"path", b"a")]) + _file(b"innocent") + END
    case("duplicate_via_pax", via_pax, _U, "duplicate")
    case("duplicate_root", _dir(b".") + _dir(b"./") + END, _U, "duplicate")
    case("dir_under_file", _file(b"a") + _dir(b"a/b") + END, _U, "not a directory")
    too_deep = gnu_long(b"d/" * 256 + b"f") + _file(b"x") + END  # 257 components
    case("too_deep", too_deep, _U, "more than 256 path components")
    deep = _file(b"/".join([b"d"] * 12)) + END
    case("implied_entries_over_limit", deep, _U, "files and directories", MEMBERS_10)

    # Numbers, sizes and checksums.
    for name, field, value in [
        ("size_nul_led", "size", b"\x0000000001000"),
        ("size_plus", "size", b"+0000000001\0"),
        ("size_underscore", "size", b"0000000_001\0"),
        ("size_not_octal", "size", b"00000000009\0"),
        ("size_spaces_only", "size", b" " * 12),
        ("size_inner_space", "size", b"0000 000001\0"),
        ("mode_garbage", "mode", b"zzzzzzz\0"),
        ("uid_negative", "uid", b"-000001\0"),
        ("devmajor_garbage", "devmajor", b"xyz"),
        ("mtime_plus", "mtime", b"+1234567\0"),
    ]:
        bad = header(b"a", fields={field: value}) + data(b"A" * 512)
        case(name, ok + bad + END, _B, f"malformed {field}")
    base256 = b"\x80" + (1 << 80).to_bytes(11, "big")
    case("size_base256_huge", header(b"a", fields={"size": base256}) + END, _U, "exceeds")
    case(
        "size_base256_negative",
        ok + header(b"a", fields={"size": b"\xff" * 12}) + END,
        _B,
        "negative",
    )
    case("size_larger_than_data", header(b"a", size=10000) + data(b"A" * 100), _B, "truncated")
    smaller = header(b"a", size=1) + b"A" * 2048 + END
    case("size_smaller_than_data", ok + smaller, _B, "bad checksum")
    right = header(b"a", size=1)
    real = int(right[148:154], 8)
    case("bad_checksum_first", header(b"a", chksum=real + 1) + END, _B, "not a tar")
    case("bad_checksum_later", ok + header(b"a", chksum=real + 1) + END, _B, "bad checksum")
    modulus = header(b"a", chksum=real + 65521) + END
    case("checksum_off_by_modulus", ok + modulus, _B, "bad checksum")

    # The archive's end, and what follows it.
    case("missing_end", ok, _B, "no end-of-archive")
    case("truncated_header_block", ok + _file(b"b")[:300], _B, "truncated")
    case("trailing_garbage_tar", ok + END + b"JUNK", _B, "after its end-of-archive", compress=False)
    hidden = ok + END + _file(b"hidden") + END
    case("hidden_member_after_end", hidden, _B, "after its end-of-archive")
    lone = ok + bytes(512) + _file(b"hidden") + END
    case("lone_zero_then_member", lone, _B, "after its end-of-archive")
    concat = gz(ok + END) + gz(_file(b"hidden") + END)
    case("concatenated_gzip_hidden", concat, _B, "after its end-of-archive", compress=False)
    tail = gz(ok + END) + _file(b"hidden") + END
    case("gzip_then_raw_tar", tail, _B, "gzip data is corrupt", compress=False)
    many = gz(ok + END) + gz(b"") * 1100
    case("too_many_gzip_members", many, _U, "gzip stream has more than", compress=False)
    return cases


@dataclass(frozen=True)
class Accepted:
    """A trick cairn reads exactly as GNU tar and tarfile do, and what it extracts to."""

    name: str
    path: Path
    files: dict[bytes, bytes]  # relative path -> content
    dirs: frozenset[bytes]


def build_accepted(out: Path) -> list[Accepted]:
    """Write the accepted tricks under ``out``: none of them is flattened (two roots)."""
    out.mkdir(parents=True, exist_ok=True)
    found: list[Accepted] = []
    z = _file(b"z", b"z")  # a second root, so no case is flattened

    def accept(
        name: str,
        raw: bytes,
        files: dict[bytes, bytes],
        dirs: tuple[bytes, ...] = (),
        compress: bool = True,
    ) -> None:
        path = out / f"{name}.{'tar.gz' if compress else 'bin'}"
        path.write_bytes(gz(raw) if compress else raw)
        found.append(Accepted(name, path, {**files, b"z": b"z"}, frozenset(dirs)))

    a = _file(b"a", b"A")
    accept(
        "ustar_evil_pax_innocent",
        pax([(b"path", b"innocent")]) + _file(b"../evil", b"I") + z + END,
        {b"innocent": b"I"},
    )
    accept("nul_in_ustar_name", _file(b"a\0/../../evil", b"A") + z + END, {b"a": b"A"})
    whole = a + _file(b"b", b"B" * 3000) + z + END
    accept(
        "concatenated_gzip_split",
        gz(whole[:1536]) + gz(whole[1536:]),
        {b"a": b"A", b"b": b"B" * 3000},
        compress=False,
    )
    accept("gzip_zero_padding", gz(a + z + END) + bytes(1000), {b"a": b"A"}, compress=False)
    accept("empty_gzip_member_after", gz(a + z + END) + gz(b""), {b"a": b"A"}, compress=False)
    accept("lone_zero_block_at_end", a + z + bytes(512), {b"a": b"A"})
    accept("record_padding", a + z + END + bytes(8192), {b"a": b"A"})
    accept("contiguous_file", _file(b"c", b"C", kind=b"7") + z + END, {b"c": b"C"})
    small256 = header(b"b", fields={"size": b"\x80" + (5).to_bytes(11, "big")}) + data(b"12345")
    accept("base256_size", small256 + z + END, {b"b": b"12345"})
    spaced = {"mode": b"  644 \0", "size": b"         5 \0", "mtime": b" 14000000000"}
    accept(
        "spaces_in_numbers",
        header(b"s", fields=spaced) + data(b"spc!!") + z + END,
        {b"s": b"spc!!"},
    )
    devs = {"devmajor": b"0\0", "devminor": b""}
    accept(
        "odd_device_fields", header(b"d", size=1, fields=devs) + data(b"D") + z + END, {b"d": b"D"}
    )
    high = header(b"caf\xe9\xff\xfe", size=1)
    signed = with_checksum(high, signed_checksum(high))
    accept("signed_checksum", signed + data(b"S") + z + END, {b"caf\xe9\xff\xfe": b"S"})
    accept(
        "case_only_names",
        _file(b"README", b"1") + _file(b"readme", b"2") + z + END,
        {b"README": b"1", b"readme": b"2"},
    )
    modes = (
        _file(b"suid", b"u", mode=0o4755)
        + _file(b"sgid", b"g", mode=0o2644)
        + header(b"sticky", kind=b"5", mode=0o1777)
    )
    accept("setuid_setgid_sticky", modes + z + END, {b"suid": b"u", b"sgid": b"g"}, (b"sticky",))
    old_dir = header(b"d/", kind=b"\0") + _file(b"d/f", b"F", kind=b"\0")
    accept("old_style_dir", old_dir + z + END, {b"d/f": b"F"}, (b"d",))
    zero_header = pax([(b"size", b"5")]) + header(b"p", size=0) + data(b"paxsz")
    accept("pax_size_header_zero", zero_header + z + END, {b"p": b"paxsz"})
    git = pax([(b"comment", b"0123456789abcdef0123456789abcdef01234567")], kind=b"g")
    accept("git_archive_global_comment", git + a + z + END, {b"a": b"A"})
    accept(
        "global_mtime", pax([(b"mtime", b"1600000000.5")], kind=b"g") + a + z + END, {b"a": b"A"}
    )
    long_name = b"l" * 150 + b"/" + b"n" * 150
    accept(
        "gnu_longname",
        gnu_long(long_name) + _file(b"trunc", b"L") + z + END,
        {long_name: b"L"},
        (b"l" * 150,),
    )
    accept(
        "posix_prefix",
        _file(b"name", b"P", prefix=b"pre/fix") + z + END,
        {b"pre/fix/name": b"P"},
        (b"pre", b"pre/fix"),
    )
    accept(
        "dir_after_its_files", _file(b"d/f", b"F") + _dir(b"d") + z + END, {b"d/f": b"F"}, (b"d",)
    )
    accept("explicit_root", _dir(b"./") + _file(b"./a", b"A") + z + END, {b"a": b"A"})
    latin1 = pax([(b"hdrcharset", b"BINARY"), (b"path", b"caf\xe9")]) + _file(b"u", b"U")
    accept("hdrcharset_binary", latin1 + z + END, {b"caf\xe9": b"U"})
    last = pax([(b"path", b"first"), (b"path", b"second")]) + _file(b"u", b"U")
    accept("pax_repeated_key_last_wins", last + z + END, {b"second": b"U"})
    accept("plain_tar", a + z + END, {b"a": b"A"}, compress=False)
    return found
