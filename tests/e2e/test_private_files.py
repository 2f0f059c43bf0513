"""Patient data on disk is owner-only, whatever the umask (issue 12, part 3).

The whole path runs through the installed command in a child process started with umask 000,
the worst case: a service unit or a shell where nothing restricts new files.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from aggregator.privacy import apply_mode, exposure_warning, make_private_dir, parse_mode

EXE = Path(sys.executable).with_name("aggregator")


def _run(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AGGREGATOR_HOME": str(home)}
    env.pop("AGGREGATOR_DATABASE_URL", None)
    return subprocess.run([str(EXE), *args], capture_output=True, text=True, env=env, timeout=300,
                          preexec_fn=lambda: os.umask(0))  # umask 000: the worst case


def _modes(root: Path) -> dict[str, int]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = stat.S_IMODE(p.lstat().st_mode)
    out["."] = stat.S_IMODE(root.stat().st_mode)
    return out


def _open_to_others(modes: dict[str, int]) -> dict[str, str]:
    return {p: f"{m:04o}" for p, m in modes.items() if m & 0o077}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    if not EXE.exists():
        pytest.skip(f"the console script is not installed next to {sys.executable}")
    from fixtures.generate import generate_download

    root = tmp_path_factory.mktemp("private")
    info = generate_download(root / "dl")
    home = root / "home"
    steps = [
        ("case", "create", "jd", "--checklist", "oncology", "--patient-name", info.patient_name,
         "--birth-date", info.birth_date, "--case-date", info.case_date.isoformat()),
        ("source", "add", "jd", "--media", str(root / "dl")),
        ("pull", "jd", "--json"),
        ("check", "jd", "--json"),
        ("package", "jd", "--out", str(root / "pkg")),
        ("package", "jd", "--out", str(root / "pkg.zip"), "--zip"),
    ]
    for args in steps:
        r = _run(home, *args)
        assert r.returncode == 0, (args, r.stderr[-2000:])
    return home, root / "pkg", root / "pkg.zip"


def test_home_database_and_case_folders_are_owner_only_under_umask_000(built: tuple[Path, Path, Path]) -> None:
    home, _, _ = built
    modes = _modes(home)
    assert "aggregator.db" in modes and any(p.startswith("cases/jd/raw") for p in modes)
    assert _open_to_others(modes) == {}
    assert stat.S_IMODE(home.stat().st_mode) == 0o700


def test_packages_are_owner_only_under_umask_000(built: tuple[Path, Path, Path]) -> None:
    _, pkg, zipped = built
    modes = _modes(pkg)
    assert "manifest.json" in modes and "DICOMDIR" in modes
    assert _open_to_others(modes) == {}
    assert stat.S_IMODE(zipped.stat().st_mode) == 0o600
    assert zipfile.is_zipfile(zipped)


def test_package_mode_option_shares_deliberately(built: tuple[Path, Path, Path], tmp_path: Path) -> None:
    home, _, _ = built
    out = tmp_path / "shared-pkg"
    r = _run(home, "package", "jd", "--out", str(out), "--mode", "0640")
    assert r.returncode == 0, r.stderr
    modes = _modes(out)
    files = {p: m for p, m in modes.items() if (out / p).is_file()}
    dirs = {p: m for p, m in modes.items() if (out / p).is_dir()}
    assert files and set(files.values()) == {0o640}
    assert dirs and set(dirs.values()) == {0o750}
    bad = _run(home, "package", "jd", "--out", str(tmp_path / "x"), "--mode", "rw-r")
    assert bad.returncode == 2 and "octal" in bad.stderr


def test_an_existing_loose_home_is_tightened(tmp_path: Path) -> None:
    if not EXE.exists():
        pytest.skip("console script not installed")
    home = tmp_path / "loose"
    home.mkdir()
    os.chmod(home, 0o777)
    r = _run(home, "case", "list")
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert stat.S_IMODE((home / "aggregator.db").stat().st_mode) == 0o600


def test_exposure_warning_names_the_fix(tmp_path: Path) -> None:
    d = tmp_path / "h"
    d.mkdir()
    os.chmod(d, 0o755)
    warning = exposure_warning(d)
    assert warning is not None and "chmod 700" in warning and "0755" in warning
    os.chmod(d, 0o700)
    assert exposure_warning(d) is None


def test_make_private_dir_leaves_existing_parents_alone(tmp_path: Path) -> None:
    os.chmod(tmp_path, 0o755)
    target = make_private_dir(tmp_path / "a" / "b")
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o700
    assert stat.S_IMODE(target.stat().st_mode) == 0o700


def test_apply_mode_and_parse_mode(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("x")
    apply_mode(tmp_path / "d", 0o604)
    assert stat.S_IMODE((tmp_path / "d" / "f").stat().st_mode) == 0o604
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o705
    assert parse_mode("0640") == parse_mode("640") == parse_mode("0o640") == 0o640
    for bad in ("999", "rw", "1777"):
        with pytest.raises(ValueError):
            parse_mode(bad)
