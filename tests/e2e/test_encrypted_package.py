"""Encrypted delivery (issue 16): ``package --zip --encrypt`` with a passphrase (WinZip AES-256)
or ``--recipient`` (age), opened by a real 7-Zip and by ``verify``.

The case runs through the installed command in a child process under umask 000 (the worst
case), so the modes seen are the ones a careless service would get. 7-Zip is Debian's ``7zip``
(``7zz``), installed by ``scripts/install.sh``.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

EXE = Path(sys.executable).with_name("aggregator")
SEVEN_ZIP = shutil.which("7zz") or shutil.which("7z")
PASSPHRASE = "correct horse battery staple 16"
QUESTION = "Grade & margins: <DCIS> or invasive?"


def _run(home: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "AGGREGATOR_HOME": str(home), **(env or {})}
    full.pop("AGGREGATOR_DATABASE_URL", None)
    return subprocess.run([str(EXE), *args], capture_output=True, text=True, env=full, timeout=300,
                          preexec_fn=lambda: os.umask(0))  # umask 000: the worst case


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if not EXE.exists():
        pytest.skip(f"the console script is not installed next to {sys.executable}")
    from fixtures.generate import generate_download

    root = tmp_path_factory.mktemp("sealed")
    info = generate_download(root / "dl")
    home = root / "home"
    for args in [
        ("case", "create", "jd", "--checklist", "oncology", "--patient-name", info.patient_name,
         "--birth-date", info.birth_date, "--case-date", info.case_date.isoformat()),
        ("case", "set", "jd", "--question", QUESTION),
        ("source", "add", "jd", "--media", str(root / "dl")),
        ("pull", "jd", "--json"),
    ]:
        r = _run(home, *args)
        assert r.returncode == 0, (args, r.stderr[-2000:])
    secret = root / "secret"
    secret.mkdir(mode=0o700)
    pw = secret / "pass.txt"
    pw.write_text(PASSPHRASE + "\n")
    out = root / "out"
    r = _run(home, "package", "jd", "--out", str(out / "jd.zip"), "--zip", "--encrypt", "--passphrase-file", str(pw),
             "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    return {"root": root, "home": home, "pw": pw, "out": out, "zip": out / "jd.zip", "info": info}


def test_encrypted_zip_is_aes256_and_owner_only(case: dict[str, Any]) -> None:
    z: Path = case["zip"]
    assert _mode(z) == 0o600
    # nothing but the finished zip next to it, and no staging left in the case folder
    assert sorted(p.name for p in case["out"].iterdir()) == ["jd.zip"]
    leftovers = list((case["home"] / "cases" / "jd" / "tmp").glob("package-*"))
    assert leftovers == []
    import pyzipper

    with pyzipper.AESZipFile(z) as zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        assert {"manifest.json", "summary.html", "DICOMDIR", "fhir/bundle.json"} <= {i.filename for i in infos}
        # every member: encrypted (flag bit 0), WinZip AES with a 256-bit key (strength 3)
        assert {(i.flag_bits & 1, i.wz_aes_strength) for i in infos} == {(1, 3)}
    # and the name patient's name is nowhere in the archive's bytes (names and contents are sealed)
    raw = z.read_bytes()
    assert case["info"].patient_name.encode() not in raw
    assert b"FINAL DIAGNOSIS" not in raw


@pytest.mark.skipif(SEVEN_ZIP is None, reason="7-Zip is not installed (Debian package 7zip)")
def test_7zip_opens_it_with_the_passphrase_and_the_files_verify(case: dict[str, Any], tmp_path: Path) -> None:
    assert SEVEN_ZIP
    listing = subprocess.run([SEVEN_ZIP, "l", "-slt", f"-p{PASSPHRASE}", str(case["zip"])], capture_output=True,
                             text=True, timeout=120)
    assert listing.returncode == 0, listing.stdout[-2000:]
    methods = {line.split("=", 1)[1].strip() for line in listing.stdout.splitlines() if line.startswith("Method =")}
    assert methods and all(m.startswith("AES-256") for m in methods), methods
    dest = tmp_path / "opened"
    r = subprocess.run([SEVEN_ZIP, "x", "-y", f"-p{PASSPHRASE}", f"-o{dest}", str(case["zip"])],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    v = _run(case["home"], "verify", str(dest), "--json")
    assert v.returncode == 0, v.stdout[-2000:]
    assert '"ok": true' in v.stdout
    # the extracted summary is the real page, with the record in it and the case question first
    page = (dest / "summary.html").read_text(encoding="utf-8")
    assert "FINAL DIAGNOSIS" in page
    assert "Grade &amp; margins: &lt;DCIS&gt; or invasive?" in page and "<DCIS>" not in page
    assert page.index('id="case-question"') < page.index('id="overview"')


@pytest.mark.skipif(SEVEN_ZIP is None, reason="7-Zip is not installed (Debian package 7zip)")
def test_7zip_refuses_a_wrong_passphrase(case: dict[str, Any], tmp_path: Path) -> None:
    assert SEVEN_ZIP
    r = subprocess.run([SEVEN_ZIP, "x", "-y", "-pnot the passphrase at all", f"-o{tmp_path / 'x'}", str(case["zip"])],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "Wrong password" in r.stdout + r.stderr


def test_verify_with_passphrase_file_or_env(case: dict[str, Any]) -> None:
    r = _run(case["home"], "verify", str(case["zip"]), "--passphrase-file", str(case["pw"]))
    assert r.returncode == 0, r.stderr
    assert "package OK" in r.stdout
    r = _run(case["home"], "verify", str(case["zip"]), "--passphrase-env", "PKG_PASS", env={"PKG_PASS": PASSPHRASE})
    assert r.returncode == 0, r.stderr


def test_wrong_or_missing_passphrase_is_a_clear_error(case: dict[str, Any], tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("this is not the passphrase\n")
    r = _run(case["home"], "verify", str(case["zip"]), "--passphrase-file", str(bad))
    assert r.returncode == 1
    assert "wrong passphrase" in r.stderr
    assert "Traceback" not in r.stderr
    r = _run(case["home"], "verify", str(case["zip"]))
    assert r.returncode == 1
    assert "encrypted" in r.stderr and "--passphrase-file" in r.stderr
    r = _run(case["home"], "verify", str(case["zip"]), "--passphrase-env", "UNSET_PKG_PASS")
    assert r.returncode == 2 and "UNSET_PKG_PASS is not set" in r.stderr


def test_a_plaintext_member_or_a_forged_plain_package_fails_verify(case: dict[str, Any], tmp_path: Path) -> None:
    # someone without the passphrase adds a file: it cannot be encrypted with the key, so it is named
    added = tmp_path / "added.zip"
    shutil.copy(case["zip"], added)
    with zipfile.ZipFile(added, "a") as zf:
        zf.writestr("documents/NOTE.TXT", b"inserted later")
    r = _run(case["home"], "verify", str(added), "--passphrase-file", str(case["pw"]), "--json")
    assert r.returncode == 1
    assert "documents/NOTE.TXT" in r.stdout and "not encrypted" in r.stdout
    # a whole plaintext package, manifest included, handed over in its place: it verifies on its
    # own, but not as the sealed package the consultant was promised
    plain = tmp_path / "plain.zip"
    r = _run(case["home"], "package", "jd", "--out", str(plain), "--zip")
    assert r.returncode == 0, r.stderr
    assert _run(case["home"], "verify", str(plain)).returncode == 0
    r = _run(case["home"], "verify", str(plain), "--passphrase-file", str(case["pw"]), "--json")
    assert r.returncode == 1 and "not encrypted" in r.stdout


def test_passphrase_rules(case: dict[str, Any], tmp_path: Path) -> None:
    out = str(tmp_path / "p.zip")
    # never an option that takes the passphrase itself
    r = _run(case["home"], "package", "jd", "--out", out, "--zip", "--encrypt", "--passphrase", PASSPHRASE)
    assert r.returncode == 2 and "No such option" in r.stderr
    r = _run(case["home"], "package", "jd", "--out", out, "--zip", "--encrypt")
    assert r.returncode == 2 and "never given on the command line" in r.stderr
    r = _run(case["home"], "package", "jd", "--out", out, "--encrypt", "--passphrase-file", str(case["pw"]))
    assert r.returncode == 2 and "--zip" in r.stderr
    r = _run(case["home"], "package", "jd", "--out", out, "--zip", "--encrypt", "--passphrase-env", "SHORT",
             env={"SHORT": "tooshort"})
    assert r.returncode == 2 and "too short" in r.stderr
    assert not any(tmp_path.iterdir())
    # the passphrase is stored nowhere: not in the database (audit trail included), not in the case folder
    for dirpath, _, files in os.walk(case["home"]):
        for name in files:
            assert PASSPHRASE.encode() not in (Path(dirpath) / name).read_bytes(), name


def test_an_encrypted_target_is_not_overwritten_with_another_passphrase(case: dict[str, Any], tmp_path: Path) -> None:
    other = tmp_path / "other.txt"
    other.write_text("another long passphrase\n")
    before = case["zip"].read_bytes()
    r = _run(case["home"], "package", "jd", "--out", str(case["zip"]), "--zip", "--encrypt",
             "--passphrase-file", str(other))
    assert r.returncode == 1 and "does not open" in r.stderr
    assert case["zip"].read_bytes() == before


def test_age_recipient(case: dict[str, Any], tmp_path: Path) -> None:
    x25519 = pytest.importorskip("pyrage").x25519
    me, stranger = x25519.Identity.generate(), x25519.Identity.generate()
    ident, wrong = tmp_path / "me.key", tmp_path / "stranger.key"
    ident.write_text(f"# created: test\n# public key: {me.to_public()}\n{me}\n")
    wrong.write_text(f"{stranger}\n")
    out = tmp_path / "out"
    r = _run(case["home"], "package", "jd", "--out", str(out / "jd.zip"), "--zip", "--recipient", str(me.to_public()),
             "--json")
    assert r.returncode == 0, r.stderr
    sealed = out / "jd.zip.age"
    assert sorted(p.name for p in out.iterdir()) == ["jd.zip.age"]
    assert _mode(sealed) == 0o600
    assert sealed.read_bytes().startswith(b"age-encryption.org/v1\n")
    assert b"manifest.json" not in sealed.read_bytes()  # unlike WinZip AES, age hides the names too
    r = _run(case["home"], "verify", str(sealed), "--identity-file", str(ident))
    assert r.returncode == 0, r.stderr
    r = _run(case["home"], "verify", str(sealed), "--identity-file", str(wrong))
    assert r.returncode == 1 and "no identity in the identity file matches" in r.stderr
    r = _run(case["home"], "verify", str(sealed))
    assert r.returncode == 1 and "--identity-file" in r.stderr
    # an age file is never overwritten: it cannot be told to be a previous package
    r = _run(case["home"], "package", "jd", "--out", str(out / "jd.zip"), "--zip", "--recipient", str(me.to_public()))
    assert r.returncode == 1 and "not overwritten" in r.stderr


# --- in process: where the bytes go -------------------------------------------------------------

_WATCH: list[tuple[str, str]] | None = None
_HOOKED = False


def _watch_writes(event: str, args: tuple[Any, ...]) -> None:
    """sys.addaudithook callback: every file opened for writing and every folder made, while watched."""
    if _WATCH is None:
        return
    if event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if writing and isinstance(path, str | bytes | os.PathLike):
            _WATCH.append(("write", os.path.abspath(os.fsdecode(path))))
    elif event == "os.mkdir":
        _WATCH.append(("mkdir", os.path.abspath(os.fsdecode(args[0]))))


def test_plaintext_is_written_only_inside_the_case_folder(tmp_path: Path) -> None:
    """Every file opened for writing while an encrypted package is made is in the case folder,
    except the database and the one (encrypted) zip next to the target before its rename."""
    global _WATCH, _HOOKED
    import pyzipper

    from aggregator.app import App
    from aggregator.cases import add_source, create_case
    from aggregator.jobs.pull import pull_case
    from aggregator.package.sealing import Sealing
    from aggregator.pipeline import package_case
    from fixtures.generate import generate_download

    generate_download(tmp_path / "dl")
    home = tmp_path / "home"
    app = App.open(home)
    create_case(app, "c", "oncology")
    add_source(app, "c", media=str(tmp_path / "dl"))
    (pulled,) = pull_case(app, "c")
    assert pulled.state == "done", pulled.error
    case_dir = str(app.case_dir("c")) + os.sep
    out = tmp_path / "out" / "c.zip"
    if not _HOOKED:
        sys.addaudithook(_watch_writes)
        _HOOKED = True
    _WATCH = []
    try:
        path, _ = package_case(app, "c", out, as_zip=True, sealing=Sealing(passphrase=PASSPHRASE.encode()))
        seen = list(_WATCH)
    finally:
        _WATCH = None
    assert path == out
    outside = sorted({p for kind, p in seen if kind == "write" and not p.startswith(case_dir)
                      and not p.startswith(str(home / "aggregator.db")) and not p.endswith(".pyc")})
    # one file outside the case folder: the archive being written, which is ciphertext
    assert len(outside) == 1 and outside[0].endswith("package.zip"), outside
    assert Path(outside[0]).parent.parent == out.parent
    # staged files did go through the case folder, and were removed
    assert any(kind == "write" and p.startswith(case_dir + "tmp") for kind, p in seen)
    assert not list(Path(case_dir, "tmp").glob("package-*"))
    with pyzipper.AESZipFile(out) as zf:
        assert all(i.flag_bits & 1 for i in zf.infolist())
