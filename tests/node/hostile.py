"""Builds the hostile payload corpus for the extraction tests, in a temp directory.

Nothing binary is committed: every archive is written here with :mod:`tarfile` (which
writes whatever names and types it is given) or by hand for the malformed ones. Each
:class:`Case` says which ``DeployFailed`` code extraction must answer and, where the
failure is about one member, a fragment the message must contain.
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

from node.deploy.extract import ExtractLimits

__all__ = [
    "Case",
    "Member",
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
    return cases
