"""Safe zip extraction against hostile archives built on the spot: slip, absolute paths, links,
devices, bombs, too many members, lying sizes, hostile names."""

from __future__ import annotations

import os
import stat
import zipfile
from pathlib import Path

import pytest

from aggregator.errors import InputTooLarge, UnsafePath, UnsupportedInput
from connectors import archive
from connectors.archive import (
    MAX_COMPONENT_BYTES,
    ByteBudget,
    ExtractResult,
    ZipLimits,
    display_path,
    member_parts,
    write_member,
)

MiB = 1024 * 1024
_in_memory = 0


@pytest.fixture(autouse=True, params=[0, MiB], ids=["on-disk", "in-memory"])
def member_mode(request: pytest.FixtureRequest) -> None:
    """Every test runs twice: members written out, and members kept in memory (then written
    by write_member, as the media reader does for a member it needs as a file). The same
    members must be kept and rejected, for the same reasons, either way."""
    global _in_memory
    _in_memory = request.param


def extract_zip(*args: object, **kwargs: object) -> ExtractResult:
    result = archive.extract_zip(*args, in_memory=_in_memory, **kwargs)  # type: ignore[arg-type]
    for m in result.members:
        if _in_memory:
            assert m.data is not None and len(m.data) == m.size and not m.path.exists()
        write_member(m)
        assert m.path.stat().st_size == m.size
    return result


def _files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def _unix_member(name: str, mode: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = mode << 16
    return info


@pytest.fixture()
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    """(sandbox, dest): dest lives inside sandbox so escapes would land next to it."""
    sandbox = tmp_path / "sandbox"
    dest = sandbox / "a" / "b" / "dest"
    dest.mkdir(parents=True)
    return sandbox, dest


def test_zip_slip_absolute_and_backslash_members_are_rejected_and_the_rest_kept(tmp_path: Path, dirs) -> None:
    sandbox, dest = dirs
    z = tmp_path / "slip.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("good/report.txt", "fine")
        zf.writestr("../evil.txt", "escape")
        zf.writestr("../../../evil2.txt", "escape")
        zf.writestr("ok/../../evil3.txt", "escape")
        zf.writestr("..\\..\\evil4.txt", "escape")
        zf.writestr("/tmp/abs-evil.txt", "absolute")
        zf.writestr("C:\\Windows\\evil5.txt", "drive")
    result = extract_zip(z, dest, ZipLimits())
    assert [m.name for m in result.members] == ["good/report.txt"]
    assert (dest / "good" / "report.txt").read_text() == "fine"
    rejected = dict(result.rejected)
    assert set(rejected) == {"../evil.txt", "../../../evil2.txt", "ok/../../evil3.txt", "..\\..\\evil4.txt",
                             "/tmp/abs-evil.txt", "C:\\Windows\\evil5.txt"}
    assert all(isinstance(e, UnsafePath) for e in rejected.values())
    assert "absolute" in rejected["/tmp/abs-evil.txt"].message
    assert "'..'" in rejected["../evil.txt"].message
    assert str(rejected["../evil.txt"]).startswith("../evil.txt: ")  # the error names the member
    # nothing anywhere in the sandbox except the one good file, and nothing in /tmp
    assert _files_under(sandbox) == {"a/b/dest/good/report.txt"}
    assert not Path("/tmp/abs-evil.txt").exists()


def test_symlink_and_device_members_are_not_created(tmp_path: Path, dirs) -> None:
    sandbox, dest = dirs
    z = tmp_path / "links.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr(_unix_member("link-to-passwd", stat.S_IFLNK | 0o777), "/etc/passwd")
        zf.writestr(_unix_member("dev", stat.S_IFCHR | 0o600), "")
        zf.writestr(_unix_member("fifo", stat.S_IFIFO | 0o600), "")
        zf.writestr(_unix_member("plain.txt", stat.S_IFREG | 0o644), "hello")
    result = extract_zip(z, dest, ZipLimits())
    assert [m.name for m in result.members] == ["plain.txt"]
    reasons = {n: e.message for n, e in result.rejected}
    assert "symbolic link" in reasons["link-to-passwd"]
    assert "device" in reasons["dev"] and "device" in reasons["fifo"]
    assert _files_under(sandbox) == {"a/b/dest/plain.txt"}
    assert not any(p.is_symlink() for p in sandbox.rglob("*"))


def test_zip_bomb_member_is_rejected_by_ratio_and_the_rest_kept(tmp_path: Path, dirs) -> None:
    _, dest = dirs
    z = tmp_path / "bomb.zip"
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        zf.writestr("a-note.txt", "the real content")
        with zf.open("zeros.bin", "w") as w:
            block = bytes(MiB)
            for _ in range(100):
                w.write(block)
    assert z.stat().st_size < 1 * MiB  # 100 MiB of zeros in well under 1 MiB: ratio > 100
    result = extract_zip(z, dest, ZipLimits(max_ratio=50))
    assert [m.name for m in result.members] == ["a-note.txt"]
    (name, err), = result.rejected
    assert name == "zeros.bin" and isinstance(err, InputTooLarge)
    assert "ratio" in err.message
    assert not (dest / "zeros.bin").exists()
    assert sum(p.stat().st_size for p in dest.rglob("*") if p.is_file()) == len("the real content")


def test_total_size_and_file_count_limits_reject_the_whole_archive(tmp_path: Path, dirs) -> None:
    _, dest = dirs
    z = tmp_path / "many.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for i in range(30):
            zf.writestr(f"f{i:02d}.txt", "x" * 1000)
    with pytest.raises(InputTooLarge, match="30 files, more than the limit of 20") as exc:
        extract_zip(z, dest, ZipLimits(max_files=20), label="many.zip")
    assert exc.value.item == "many.zip"
    with pytest.raises(InputTooLarge, match="expand to 30000 bytes"):
        extract_zip(z, dest, ZipLimits(max_total_bytes=10_000))
    assert not any(dest.iterdir())
    # a budget shared with a parent archive counts what was already spent
    budget = ByteBudget(40_000)
    (dest / "one").mkdir()
    extract_zip(z, dest / "one", ZipLimits(), budget)
    assert budget.remaining == 10_000
    (dest / "two").mkdir()
    with pytest.raises(InputTooLarge):
        extract_zip(z, dest / "two", ZipLimits(), budget)


def test_sizes_that_lie_are_caught_while_streaming(tmp_path: Path, dirs) -> None:
    """A member whose central-directory size claims less than it holds is cut off, not trusted."""
    _, dest = dirs
    z = tmp_path / "liar.zip"
    payload = b"A" * 200_000
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("liar.txt", payload)
        zf.writestr("honest.txt", b"ok")
    data = bytearray(z.read_bytes())
    # patch the uncompressed size (offset 24 in the central directory header) of liar.txt
    cd = data.find(b"PK\x01\x02")
    assert data[cd + 46: cd + 46 + 8] == b"liar.txt"
    data[cd + 24: cd + 28] = (1000).to_bytes(4, "little")
    z.write_bytes(bytes(data))
    result = extract_zip(z, dest, ZipLimits())
    assert [m.name for m in result.members] == ["honest.txt"]
    (name, err), = result.rejected
    assert name == "liar.txt" and isinstance(err, UnsupportedInput)
    assert not (dest / "liar.txt").exists()


def test_not_a_zip_and_encrypted_or_duplicate_members(tmp_path: Path, dirs) -> None:
    _, dest = dirs
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"PK\x03\x04 this is not really a zip")
    with pytest.raises(UnsupportedInput, match="not a readable zip"):
        extract_zip(bad, dest, ZipLimits())
    z = tmp_path / "dup.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("same.txt", "first")
        with pytest.warns(UserWarning):
            zf.writestr("same.txt", "second")
        zf.writestr("secret.txt", "not really encrypted")
    data = bytearray(z.read_bytes())  # set the "encrypted" flag bit in the central directory
    cd = data.rfind(b"PK\x01\x02")
    assert data[cd + 46: cd + 46 + 10] == b"secret.txt"
    data[cd + 8] |= 0x1
    z.write_bytes(bytes(data))
    result = extract_zip(z, dest, ZipLimits())
    assert [m.name for m in result.members] == ["same.txt"]
    reasons = {n: e.message for n, e in result.rejected}
    assert "duplicate" in reasons["same.txt"]
    assert "encrypted" in reasons["secret.txt"]


def test_hostile_member_names_are_extracted_under_safe_names(tmp_path: Path, dirs) -> None:
    sandbox, dest = dirs
    long_name = "r" * 300 + ".pdf"
    z = tmp_path / "names.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr(long_name, "long")
        zf.writestr("tab\there\x01.txt", "ctl")
        zf.writestr("ümlaut/ファイル.json", "{}")
    result = extract_zip(z, dest, ZipLimits())
    assert not result.rejected
    by_name = {m.name: m for m in result.members}
    assert set(by_name) == {long_name, "tab\there\x01.txt", "ümlaut/ファイル.json"}
    long_member = by_name[long_name]
    assert long_member.path.read_text() == "long"
    assert len(long_member.path.name.encode()) <= MAX_COMPONENT_BYTES and long_member.path.suffix == ".pdf"
    assert by_name["tab\there\x01.txt"].path.name == "tab_here_.txt"
    assert (dest / "ümlaut" / "ファイル.json").read_text() == "{}"
    for m in result.members:
        assert m.path.resolve().is_relative_to(dest.resolve())
    assert all(p.resolve().is_relative_to(dest.resolve()) for p in sandbox.rglob("*") if p.is_file())


def test_member_parts_and_display_path() -> None:
    assert member_parts("a/./b//c.txt") == ["a", "b", "c.txt"]
    for bad in ("../x", "a/../../x", "/x", "\\x", "C:x", "a\\..\\x", "", "./"):
        with pytest.raises(UnsafePath):
            member_parts(bad)
    undecodable = os.fsdecode(b"scan-\xff\xfe.pdf")
    shown = display_path(undecodable)
    assert shown == "scan-\\xff\\xfe.pdf"
    shown.encode("utf-8")  # valid UTF-8, storable in any database
    assert display_path("a\nb\x00c\u202e.txt") == "a\\x0ab\\x00c\\u202e.txt"
    long = "x" * 1000 + ".json"
    d1, d2 = display_path(long), display_path("x" * 999 + "y.json")
    assert len(d1) <= 240 and d1.endswith(".json") and d1 != d2


def test_a_member_under_another_members_file_conflicts(tmp_path: Path, dirs) -> None:
    """``a`` as a file and ``a/b`` under it cannot both exist: the later one is refused, with
    or without the file system there to say so (members kept in memory are not on disk)."""
    _, dest = dirs
    z = tmp_path / "clash.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("notes", "a file")
        zf.writestr("notes/inner.txt", "under a file")
        zf.writestr("other/x.txt", "fine")
    result = extract_zip(z, dest, ZipLimits())
    assert [m.name for m in result.members] == ["notes", "other/x.txt"]
    ((name, err),) = result.rejected
    assert name == "notes/inner.txt" and "conflicts with another member" in err.message
    assert (dest / "notes").read_text() == "a file"
