"""The tricks cairn accepts are read exactly as GNU tar and Python's tarfile read them.

Every archive of :func:`hostile.build_accepted` is extracted three ways into empty
directories: by ``extract_release``, by GNU ``tar -xf`` and by ``tarfile`` (``data``
filter). The three trees must hold the same files with the same bytes and the same
directories, and they must equal what the case says; cairn's modes must be masked.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
from hostile import Accepted, build_accepted

from node.deploy.extract import extract_release

ACCEPTED = [
    "ustar_evil_pax_innocent",
    "nul_in_ustar_name",
    "concatenated_gzip_split",
    "gzip_zero_padding",
    "empty_gzip_member_after",
    "lone_zero_block_at_end",
    "record_padding",
    "contiguous_file",
    "base256_size",
    "spaces_in_numbers",
    "odd_device_fields",
    "signed_checksum",
    "case_only_names",
    "setuid_setgid_sticky",
    "old_style_dir",
    "pax_size_header_zero",
    "git_archive_global_comment",
    "global_mtime",
    "gnu_longname",
    "posix_prefix",
    "dir_after_its_files",
    "explicit_root",
    "hdrcharset_binary",
    "pax_repeated_key_last_wins",
    "plain_tar",
]


def _gnu_tar() -> str:
    tar = shutil.which("tar")
    if tar is None:
        pytest.skip("GNU tar is not installed")
    version = subprocess.run([tar, "--version"], capture_output=True, check=True).stdout
    if b"GNU tar" not in version:
        pytest.skip("tar is not GNU tar")
    return tar


def _tree(root: Path) -> tuple[dict[bytes, bytes], frozenset[bytes], dict[bytes, int]]:
    """Files (path -> bytes), directories and modes under ``root``, as bytes paths."""
    files: dict[bytes, bytes] = {}
    dirs: set[bytes] = set()
    modes: dict[bytes, int] = {}
    base = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, base)
            st = os.lstat(full)
            modes[rel] = stat.S_IMODE(st.st_mode)
            if stat.S_ISDIR(st.st_mode):
                dirs.add(rel)
            else:
                assert stat.S_ISREG(st.st_mode), (rel, st.st_mode)
                with open(full, "rb") as f:
                    files[rel] = f.read()
    return files, frozenset(dirs), modes


@pytest.fixture(scope="module")
def accepted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Accepted]:
    return {a.name: a for a in build_accepted(tmp_path_factory.mktemp("accepted"))}


def test_accepted_list_is_complete(accepted: dict[str, Accepted]) -> None:
    assert sorted(accepted) == sorted(ACCEPTED)


@pytest.mark.parametrize("name", ACCEPTED)
def test_accepted_trick_reads_as_gnu_tar_and_tarfile_read_it(
    accepted: dict[str, Accepted], name: str, tmp_path: Path
) -> None:
    case = accepted[name]
    expected_dirs = case.dirs | {
        os.path.dirname(p) for p in case.files if os.path.dirname(p)
    }  # the directories the files' paths imply

    ours = tmp_path / "ours"
    result = extract_release(case.path, ours)
    gnu = tmp_path / "gnu"
    gnu.mkdir()
    subprocess.run([_gnu_tar(), "-xf", str(case.path), "-C", str(gnu)], check=True)
    py = tmp_path / "tarfile"
    with tarfile.open(case.path) as tf:
        tf.extractall(py, filter="data")

    files, dirs, modes = _tree(ours)
    assert not result.flattened
    assert (files, dirs) == (case.files, expected_dirs)
    assert _tree(gnu)[:2] == (files, dirs)
    assert _tree(py)[:2] == (files, dirs)
    for path, mode in modes.items():
        assert mode == 0o755 if path in dirs else mode in (0o644, 0o755), (path, oct(mode))


def test_special_mode_bits_are_masked(accepted: dict[str, Accepted], tmp_path: Path) -> None:
    extract_release(accepted["setuid_setgid_sticky"].path, tmp_path / "rel")
    _, _, modes = _tree(tmp_path / "rel")
    assert modes == {b"suid": 0o755, b"sgid": 0o644, b"sticky": 0o755, b"z": 0o644}
