"""Safe extraction: every hostile payload is refused without a trace; good ones land intact."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import stat
import tarfile
from pathlib import Path
from typing import Any

import pytest
from hostile import (
    Case,
    build_corpus,
    dir_member,
    file_member,
    write_bomb,
    write_tar,
)

from node.deploy.extract import ExtractLimits, extract_release, sweep_temp
from node.errors import DeployFailed

HOSTILE = [
    "traversal",
    "nested_traversal",
    "deep_traversal",
    "absolute",
    "absolute_tmp",
    "symlink_etc",
    "symlink_up",
    "symlink_then_write",
    "hardlink_outside",
    "hardlink_inside",
    "char_device",
    "block_device",
    "fifo",
    "gnu_sparse",
    "volume_label",
    "duplicate_file",
    "duplicate_dir_file",
    "duplicate_file_dir",
    "duplicate_normalized",
    "file_under_file",
    "file_over_implicit_dir",
    "control_char",
    "newline_name",
    "del_char",
    "nul_in_pax_path",
    "empty_name",
    "root_is_file",
    "long_path",
    "long_component",
    "gnu_longname_traversal",
    "negative_size",
    "dir_with_data",
    "huge_pax_header",
    "too_many_members",
    "too_many_bytes",
    "bomb_small",
    "empty",
    "garbage",
    "text",
    "truncated_gzip",
    "truncated_gzip_trailer",
    "corrupt_gzip",
    "truncated_tar",
    "truncated_tar_data",
    "gzip_of_garbage",
    "bzip2_tar",
    "trailing_garbage_gzip",
    # Written byte by byte (tests/node/tarcraft.py): the parser-difference tricks.
    "pax_path_traversal",
    "pax_path_absolute",
    "pax_path_escape",
    "pax_path_newline",
    "pax_path_c1",
    "pax_path_empty",
    "pax_path_long",
    "pax_linkpath_symlink",
    "pax_linkpath_hardlink",
    "pax_linkpath_on_file",
    "pax_global_path",
    "pax_global_linkpath",
    "pax_global_size",
    "pax_size_disagrees",
    "pax_size_malformed",
    "pax_size_over_total",
    "pax_two_headers",
    "pax_record_no_newline",
    "pax_record_trailing_nul",
    "pax_record_bad_length",
    "pax_record_no_digits",
    "pax_record_no_equals",
    "pax_at_end",
    "pax_global_at_end",
    "pax_global_between",
    "pax_too_many_globals",
    "pax_too_many_records",
    "pax_dir_with_size",
    "pax_sparse_00",
    "pax_sparse_01",
    "pax_sparse_10",
    "pax_global_sparse",
    "gnu_longname_absolute",
    "gnu_longname_nul",
    "gnu_longname_control",
    "gnu_longname_long",
    "gnu_two_longnames",
    "gnu_longname_and_pax_path",
    "gnu_longname_at_end",
    "gnu_longlink_symlink",
    "gnu_longlink_on_file",
    "gnu_longlink_and_pax_linkpath",
    "ext_header_truncated",
    "pax_records_in_padding",
    "gnu_longname_in_padding",
    "prefix_gnu_magic",
    "prefix_v7",
    "prefix_traversal",
    "areg_slash_pax",
    "areg_slash_long",
    "regular_trailing_slash",
    "link_on_regular",
    "unknown_type",
    "multivolume",
    "dumpdir",
    "hardlink_self",
    "duplicate_double_slash",
    "duplicate_dot_segment",
    "duplicate_dot_prefix",
    "duplicate_trailing_dot",
    "duplicate_dir_slash",
    "duplicate_via_pax",
    "duplicate_root",
    "dir_under_file",
    "implied_entries_over_limit",
    "too_deep",
    "size_nul_led",
    "size_plus",
    "size_underscore",
    "size_not_octal",
    "size_spaces_only",
    "size_inner_space",
    "mode_garbage",
    "uid_negative",
    "devmajor_garbage",
    "mtime_plus",
    "size_base256_huge",
    "size_base256_negative",
    "size_larger_than_data",
    "size_smaller_than_data",
    "bad_checksum_first",
    "bad_checksum_later",
    "checksum_off_by_modulus",
    "missing_end",
    "truncated_header_block",
    "trailing_garbage_tar",
    "hidden_member_after_end",
    "lone_zero_then_member",
    "concatenated_gzip_hidden",
    "gzip_then_raw_tar",
    "too_many_gzip_members",
]


@pytest.fixture(scope="module")
def arena(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Case]]:
    """A base dir holding ``canary/`` and ``releases/``, and the corpus built elsewhere."""
    base = tmp_path_factory.mktemp("arena")
    canary = base / "canary"
    (canary / "sub").mkdir(parents=True)
    (canary / "secret.txt").write_text("do not touch\n")
    (canary / "sub" / "data.bin").write_bytes(os.urandom(1000))
    (base / "releases").mkdir()
    cases = build_corpus(tmp_path_factory.mktemp("corpus"), canary)
    return base, {c.name: c for c in cases}


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry under ``root``: type, mode and content or link target."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = os.lstat(p)
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), p.read_bytes())
    return out


def test_corpus_is_complete(arena: tuple[Path, dict[str, Case]]) -> None:
    assert sorted(arena[1]) == sorted(HOSTILE)


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_payload_is_refused_without_a_trace(
    arena: tuple[Path, dict[str, Case]], name: str
) -> None:
    base, cases = arena
    case = cases[name]
    dest = base / "releases" / "rel"
    before = snapshot(base)
    tmp_evil = os.path.lexists("/tmp/evil")
    releases_mtime = os.stat(dest.parent).st_mtime_ns

    with pytest.raises(DeployFailed) as info:
        extract_release(case.path, dest, case.limits)

    err = info.value
    assert (err.code, err.phase, err.status) == (case.code, "extract", 422), err.message
    if case.needle is not None:
        assert case.needle in err.message
    assert snapshot(base) == before  # canary intact, no dest, no .tmp-*, nothing beside
    # Refused by the checking pass: not even the temp directory was created.
    assert os.stat(dest.parent).st_mtime_ns == releases_mtime
    assert not os.path.lexists(dest)
    assert os.path.lexists("/tmp/evil") == tmp_evil


def test_bomb_at_default_limits_is_refused(tmp_path: Path) -> None:
    bomb = write_bomb(tmp_path / "bomb.tar.gz", 200 << 20)
    assert bomb.stat().st_size < 1 << 20
    (tmp_path / "releases").mkdir()
    dest = tmp_path / "releases" / "rel"

    with pytest.raises(DeployFailed) as info:
        extract_release(bomb, dest)

    assert info.value.code == "unsafe_payload"
    assert "decompression" in info.value.message
    assert os.listdir(tmp_path / "releases") == []


def test_compressible_payload_under_the_ratio_floor_is_accepted(tmp_path: Path) -> None:
    blob = write_bomb(tmp_path / "zeros.tar.gz", 16 << 20)
    result = extract_release(blob, tmp_path / "rel")
    assert result.bytes == 16 << 20
    assert (tmp_path / "rel" / "bomb.bin").stat().st_size == 16 << 20


def _extract(tmp_path: Path, members: list[Any], **kw: Any) -> tuple[Path, Any]:
    blob = write_tar(tmp_path / "p.tar.gz", members, **kw)
    dest = tmp_path / "releases" / "rel"
    dest.parent.mkdir(exist_ok=True)
    result = extract_release(blob, dest)
    assert [p for p in os.listdir(dest.parent) if p.startswith(".tmp-")] == []
    return dest, result


def test_single_root_directory_is_flattened(tmp_path: Path) -> None:
    dest, result = _extract(
        tmp_path,
        [
            dir_member("myapp"),
            file_member("myapp/component.toml", b"[install]\n"),
            dir_member("myapp/sub"),
            file_member("myapp/sub/b.txt", b"b"),
        ],
    )
    assert result.flattened
    assert (result.files, result.dirs) == (2, 1)
    assert (dest / "component.toml").read_bytes() == b"[install]\n"
    assert (dest / "sub" / "b.txt").read_bytes() == b"b"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o755


def test_implicit_single_root_is_flattened(tmp_path: Path) -> None:
    dest, result = _extract(tmp_path, [file_member("myapp/a", b"a")])
    assert result.flattened
    assert sorted(os.listdir(dest)) == ["a"]


def test_two_roots_are_not_flattened(tmp_path: Path) -> None:
    dest, result = _extract(tmp_path, [file_member("a/x"), file_member("b/y")])
    assert not result.flattened
    assert sorted(os.listdir(dest)) == ["a", "b"]
    assert stat.S_IMODE(dest.stat().st_mode) == 0o755


def test_single_root_file_is_not_flattened(tmp_path: Path) -> None:
    dest, result = _extract(tmp_path, [file_member("README", b"hi")])
    assert not result.flattened
    assert (dest / "README").read_bytes() == b"hi"


def test_modes_are_masked(tmp_path: Path) -> None:
    modes = {"rwx_all": 0o777, "rw_all": 0o666, "setuid": 0o4755, "private_x": 0o700}
    modes |= {"private": 0o600, "setgid_sticky": 0o3644}
    members = [file_member(f"{n}", mode=m) for n, m in modes.items()]
    members += [dir_member("d_private", 0o700), dir_member("d_open", 0o777)]
    dest, _ = _extract(tmp_path, members)

    got = {p.name: stat.S_IMODE(os.lstat(p).st_mode) for p in dest.iterdir()}
    assert got == {
        "rwx_all": 0o755,
        "rw_all": 0o644,
        "setuid": 0o755,
        "private_x": 0o755,
        "private": 0o644,
        "setgid_sticky": 0o644,
        "d_private": 0o755,
        "d_open": 0o755,
    }


def test_nested_and_empty_dirs_and_dot_prefixes(tmp_path: Path) -> None:
    dest, result = _extract(
        tmp_path,
        [
            dir_member("."),
            dir_member("./empty"),
            dir_member("./deep/a/b/c/empty"),
            file_member("./deep/a/b/c/f.txt", b"f"),
            file_member("./top.txt", b"t"),
        ],
    )
    assert not result.flattened
    assert (dest / "empty").is_dir() and os.listdir(dest / "empty") == []
    assert os.listdir(dest / "deep/a/b/c/empty") == []
    assert (dest / "deep/a/b/c/f.txt").read_bytes() == b"f"
    assert (result.files, result.dirs) == (2, 6)


def test_plain_tar_is_accepted(tmp_path: Path) -> None:
    dest, result = _extract(tmp_path, [file_member("a.txt", b"plain")], compress=False)
    assert (dest / "a.txt").read_bytes() == b"plain"
    assert result.bytes == 5


def test_deepest_allowed_path_is_extracted_and_removable(tmp_path: Path) -> None:
    blob = write_tar(tmp_path / "p.tar.gz", [file_member("d/" * 255 + "f", b"deep")])
    result = extract_release(blob, tmp_path / "rel")
    assert (tmp_path / "rel" / ("d/" * 254 + "f")).read_bytes() == b"deep"  # flattened
    assert result.dirs == 254
    shutil.rmtree(tmp_path / "rel")  # recursive on Python 3.11: why the depth is bounded


def test_long_and_unicode_names(tmp_path: Path) -> None:
    long_dir = "/".join(["d" * 100] * 5)
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        sub = tmp_path / str(fmt)
        sub.mkdir()
        dest, _ = _extract(
            sub, [file_member(f"{long_dir}/{'f' * 200}", b"L"), file_member("héllo-✓.txt")]
        )
        assert (dest / long_dir / ("f" * 200)).read_bytes() == b"L"
        assert (dest / "héllo-✓.txt").exists()


def test_contents_and_mtime_survive(tmp_path: Path) -> None:
    blobs = {f"dir{i % 7}/file{i}.bin": os.urandom(i * 997) for i in range(60)}
    blobs["big.bin"] = os.urandom(3 << 20)
    dest, result = _extract(tmp_path, [file_member(n, d) for n, d in blobs.items()])
    for name, data in blobs.items():
        assert (dest / name).read_bytes() == data
    assert result.bytes == sum(map(len, blobs.values()))
    assert (dest / "big.bin").stat().st_mtime == 1_700_000_000


def test_concatenated_gzip_members_are_read(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name in ("a", "b"):
            info, data = file_member(name, name.encode() * 3000)
            tf.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    blob = tmp_path / "multi.tar.gz"
    blob.write_bytes(gzip.compress(raw[:1536]) + gzip.compress(raw[1536:]))

    extract_release(blob, tmp_path / "rel")
    assert (tmp_path / "rel" / "b").read_bytes() == b"b" * 3000


def test_empty_archive_gives_an_empty_release(tmp_path: Path) -> None:
    dest, result = _extract(tmp_path, [])
    assert os.listdir(dest) == [] and result.files == 0


def test_member_limit_is_inclusive(tmp_path: Path) -> None:
    blob = write_tar(tmp_path / "p.tar.gz", [file_member(f"f{i}") for i in range(10)])
    result = extract_release(blob, tmp_path / "rel", ExtractLimits(max_members=10))
    assert result.files == 10


def test_existing_dest_is_a_caller_error(tmp_path: Path) -> None:
    blob = write_tar(tmp_path / "p.tar.gz", [file_member("a")])
    (tmp_path / "rel").mkdir()
    with pytest.raises(FileExistsError):
        extract_release(blob, tmp_path / "rel")
    assert os.listdir(tmp_path / "rel") == []


class _Boom(Exception):
    pass


class _FailAt:
    def __init__(self, name: str, after: int = 1) -> None:
        self.name, self.after, self.hits = name, after, 0

    def hit(self, name: str) -> None:
        if name == self.name:
            self.hits += 1
            if self.hits >= self.after:
                raise _Boom(name)


@pytest.mark.parametrize(("point", "after"), [("extract.member", 2), ("extract.before_publish", 1)])
def test_failure_at_a_crash_point_leaves_nothing(tmp_path: Path, point: str, after: int) -> None:
    blob = write_tar(tmp_path / "p.tar.gz", [file_member("app/a"), file_member("app/b")])
    releases = tmp_path / "releases"
    releases.mkdir()

    with pytest.raises(_Boom):
        extract_release(blob, releases / "rel", faults=_FailAt(point, after))

    assert os.listdir(releases) == []


def test_sweep_temp_removes_crash_leftovers(tmp_path: Path) -> None:
    (tmp_path / ".tmp-rel-abc" / "x").mkdir(parents=True)
    (tmp_path / ".tmp-rel-abc" / "x" / "f").write_text("f")
    (tmp_path / ".tmp-link").symlink_to("/etc")
    (tmp_path / "keep").mkdir()

    removed = sweep_temp(tmp_path)

    assert sorted(p.name for p in removed) == [".tmp-link", ".tmp-rel-abc"]
    assert os.listdir(tmp_path) == ["keep"]
    assert sweep_temp(tmp_path / "missing") == []


def test_no_descriptor_is_left_open(tmp_path: Path) -> None:
    """Directories revisited in rotating order, more of them than the descriptor cache."""
    members = []
    for i in range(400):
        members.append(file_member(f"r/a{i % 40}/b/c/f{i}"))
        members.append(file_member(f"r/a{(i * 7) % 40}/g{i}"))
    blob = write_tar(tmp_path / "p.tar.gz", members)
    before = sorted(os.listdir("/proc/self/fd"))

    result = extract_release(blob, tmp_path / "rel")

    assert result.files == 800
    assert sorted(os.listdir("/proc/self/fd")) == before
