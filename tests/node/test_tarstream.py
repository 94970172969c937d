"""The stream's guards and the header numbers, tested below extract_release."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest
from hostile import file_member, write_bomb, write_tar
from hypothesis import given, settings
from hypothesis import strategies as st
from tarcraft import END, data, gz, header

from node.deploy.extract import ExtractLimits, extract_release
from node.deploy.tarheaders import _number
from node.deploy.tarstream import open_stream
from node.errors import DeployFailed

EXAMPLES = int(os.environ.get("CAIRN_FUZZ_EXAMPLES", "300"))
MiB = 1 << 20


def test_bomb_is_cut_off_at_the_floor_having_read_little(tmp_path: Path) -> None:
    bomb = write_bomb(tmp_path / "bomb.tar.gz", 256 * MiB)
    with open(bomb, "rb", buffering=0) as f:
        src = open_stream(f, max_ratio=50, ratio_floor_bytes=MiB, max_bytes=1 << 40)
        with pytest.raises(DeployFailed) as info:
            src.skip(256 * MiB + 512)
        read = f.tell()

    assert info.value.code == "unsafe_payload" and "decompression ratio" in info.value.message
    # Refused on the first 1 MiB step past the floor, having read one 64 KiB input step.
    assert MiB < src.produced <= 2 * MiB + 512
    assert read <= 64 << 10


def test_decompressed_stream_is_bounded_also_after_the_end(tmp_path: Path) -> None:
    """Trailing zeros cost no member and no file byte, but are counted all the same."""
    blob = tmp_path / "padded.tar.gz"
    blob.write_bytes(gz(header(b"a", size=1) + data(b"A") + END + bytes(17 * MiB)))
    limits = ExtractLimits(max_members=1, max_total_bytes=1)  # stream: 1 + 8 KiB + 16 MiB

    with pytest.raises(DeployFailed) as info:
        extract_release(blob, tmp_path / "rel", limits)

    assert info.value.code == "unsafe_payload"
    assert f"expands to more than {1 + (8 << 10) + (16 << 20)} bytes" in info.value.message
    assert not (tmp_path / "rel").exists()


def test_trailing_zeros_within_the_bound_are_fine(tmp_path: Path) -> None:
    blob = tmp_path / "padded.tar.gz"
    blob.write_bytes(gz(header(b"a", size=1) + data(b"A") + END + bytes(MiB)))
    result = extract_release(blob, tmp_path / "rel")
    assert (result.files, (tmp_path / "rel" / "a").read_bytes()) == (1, b"A")


def test_directories_listed_after_their_files_are_not_counted_twice(tmp_path: Path) -> None:
    members = [file_member(f"d{i}/f") for i in range(5)]
    for i in range(5):
        info = tarfile.TarInfo(f"d{i}")
        info.type = tarfile.DIRTYPE
        members.append((info, None))
    blob = write_tar(tmp_path / "p.tar.gz", members)  # 10 members, 10 entries

    assert extract_release(blob, tmp_path / "rel", ExtractLimits(max_members=10)).dirs == 5
    with pytest.raises(DeployFailed) as info:
        extract_release(blob, tmp_path / "rel2", ExtractLimits(max_members=9))
    assert "member 'd4/f': more than 9 files and directories" in info.value.message


def test_plain_tar_stream_reads_through(tmp_path: Path) -> None:
    buf = io.BytesIO(header(b"a", size=3) + data(b"abc") + END)
    src = open_stream(buf, max_ratio=1, ratio_floor_bytes=0, max_bytes=1 << 20)
    assert src.read(512)[:1] == b"a" and src.read(3) == b"abc"


_field = st.one_of(
    st.binary(min_size=8, max_size=8),
    st.binary(min_size=12, max_size=12),
    st.builds(
        lambda lead, digits, tail, width: (lead + digits + tail).ljust(width, b"\0")[:width],
        st.sampled_from([b"", b" ", b"  ", b"\0", b"+", b"-"]),
        st.text("01234567 _89", max_size=11).map(str.encode),
        st.sampled_from([b"", b"\0", b" ", b" \0", b"\0x", b"x"]),
        st.sampled_from([8, 12]),
    ),
)


@settings(max_examples=EXAMPLES, database=None, derandomize=True)
@given(_field)
def test_a_number_cairn_accepts_is_the_number_tarfile_reads(field: bytes) -> None:
    value = _number(field)
    if value is not None:
        assert tarfile.nti(field) == value  # type: ignore[attr-defined]
