"""Start-up of the quick commands, as whole processes (issue 19).

Targets on a quiet machine: ``aggregator --version`` and ``--help`` under 100 ms, ``aggregator
case list`` under 200 ms. The peers, run in the same rounds:

* ``python -c pass`` with the same interpreter and site-packages: the interpreter's own start-up,
  which no Python command can go below; each command is also shown *minus* it;
* ``sqlite3 DB 'SELECT ...'``: the same case-list query by SQLite's own shell, for ``case list``;
* ``case list`` on the full (SQLAlchemy) path, on the same home, reached by a database URL with
  a query option (the quick path leaves those to SQLAlchemy): the cost the quick path removes.

Every command is a child process; wall time is measured around it and CPU time (user + sys) is
the child's own, from ``os.wait4``, so that a figure inflated by other processes on a loaded
machine shows as wall time without CPU time. Rounds are interleaved (each round runs every
command once, in turn) so that a change in load hits all of them alike; medians are reported.

Nothing is faster because it does less: the run checks that ``case list --json`` prints the
same bytes on the quick and the full path, that every ``case list`` run appended exactly one
audit entry, and that ``aggregator audit verify`` accepts the chain afterwards. ``--importtime``
adds, per command, the modules whose own import time (``python -X importtime``, median of 7
runs) is largest: where the start-up goes.

    .venv/bin/python bench/bench_startup.py [--repeat 31] [--cases 50] [--importtime]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXE = Path(sys.executable).with_name("aggregator")
TARGETS_MS = {"--version": 100.0, "--help": 100.0, "case list": 200.0, "case list --json": 200.0}
HEAVY = ("sqlalchemy", "alembic", "pydicom", "pynetdicom", "requests", "fhir", "jsonschema", "yaml")
LIST_QUERY = ("SELECT cases.id, cases.checklist, cases.status, cases.case_date, count(sources.id) FROM cases "
              "LEFT OUTER JOIN sources ON sources.case_id = cases.id GROUP BY cases.id ORDER BY cases.id")


def _make_home(home: Path, n_cases: int) -> None:
    """A home with ``n_cases`` cases, every third with a media source (setup, not timed)."""
    sys.path.insert(0, str(ROOT))
    from aggregator.app import App
    from aggregator.cases import add_source, create_case

    app = App.open(home)
    media = home.parent / "media"
    media.mkdir()
    for i in range(n_cases):
        create_case(app, f"case-{i:04d}", "oncology", case_date="2026-01-15")
        if i % 3 == 0:
            add_source(app, f"case-{i:04d}", media=str(media))
    app.close()


def _run(argv: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """One child: (wall s, CPU s, exit status)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_utime + usage.ru_stime, proc.returncode


def _aggregator(*args: str) -> list[str]:
    return [str(EXE), *args]


def _audit_count(db: Path) -> int:
    con = sqlite3.connect(db)
    try:
        return int(con.execute("SELECT count(*) FROM audit_events").fetchone()[0])
    finally:
        con.close()


def _importtime(argv: list[str], env: dict[str, str]) -> dict[str, float]:
    """Each imported module's own import time in ms (``self`` in ``-X importtime``)."""
    r = subprocess.run([sys.executable, "-X", "importtime", "-c",
                        "import sys; from aggregator.cli import main; sys.exit(main(sys.argv[1:]))", *argv],
                       capture_output=True, text=True, env={**env, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    own: dict[str, float] = {}
    for line in r.stderr.splitlines():
        if line.startswith("import time:") and "imported package" not in line:
            self_us, _cumulative, name = line.split("|")
            own[name.strip()] = float(self_us.split(":")[1]) / 1000
    return own


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=31, help="rounds (each runs every command once)")
    ap.add_argument("--cases", type=int, default=50, help="cases in the home that case list lists")
    ap.add_argument("--importtime", action="store_true", help="print where each command's start-up goes")
    args = ap.parse_args()
    if not EXE.exists():
        print(f"the console script is not installed next to {sys.executable}", file=sys.stderr)
        return 2

    tmp = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    try:
        home = tmp / "home"
        _make_home(home, args.cases)
        db = home / "aggregator.db"
        env = {**os.environ, "AGGREGATOR_HOME": str(home)}
        env.pop("AGGREGATOR_DATABASE_URL", None)
        full_env = {**env, "AGGREGATOR_DATABASE_URL": f"sqlite:///{db}?timeout=30"}

        # the same output on both paths, before anything is timed
        quick_out = subprocess.run(_aggregator("case", "list", "--json"), capture_output=True, env=env, cwd=ROOT)
        full_out = subprocess.run(_aggregator("case", "list", "--json"), capture_output=True, env=full_env,
                                  cwd=ROOT)
        assert quick_out.returncode == 0 and full_out.returncode == 0, (quick_out.stderr, full_out.stderr)
        same = quick_out.stdout == full_out.stdout
        listed = len(json.loads(quick_out.stdout))

        commands: dict[str, tuple[list[str], dict[str, str]]] = {
            "python -c pass": ([sys.executable, "-c", "pass"], env),
            "--version": (_aggregator("--version"), env),
            "--help": (_aggregator("--help"), env),
            "case list": (_aggregator("case", "list"), env),
            "case list --json": (_aggregator("case", "list", "--json"), env),
            "case list (full path)": (_aggregator("case", "list"), full_env),
        }
        sqlite_cli = shutil.which("sqlite3")
        if sqlite_cli:
            commands["sqlite3 DB 'SELECT ...'"] = ([sqlite_cli, str(db), LIST_QUERY], env)
        audited_runs = sum(1 for name in commands if name.startswith("case list"))

        before = _audit_count(db)
        walls: dict[str, list[float]] = {name: [] for name in commands}
        cpus: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.repeat):
            for name, (argv, cenv) in commands.items():
                wall, cpu, rc = _run(argv, cenv)
                assert rc == 0, (name, rc)
                walls[name].append(wall)
                cpus[name].append(cpu)
        written = _audit_count(db) - before
        verify = subprocess.run(_aggregator("audit", "verify", "--json"), capture_output=True, env=env, cwd=ROOT)
        verified = verify.returncode == 0 and json.loads(verify.stdout)["ok"]

        wall_med = {k: statistics.median(v) * 1000 for k, v in walls.items()}
        cpu_med = {k: statistics.median(v) * 1000 for k, v in cpus.items()}
        bare_wall, bare_cpu = wall_med["python -c pass"], cpu_med["python -c pass"]
        load = os.getloadavg()
        print(f"start-up, {args.repeat} interleaved rounds, {listed} cases listed; load average "
              f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} CPUs")
        print(f"{'command':<26} {'wall ms':>8} {'cpu ms':>7} {'-python':>8} {'x python':>9} {'target':>7} "
              f"{'tgt/wall':>9} {'min wall':>9}")
        for name in commands:
            w, c = wall_med[name], cpu_med[name]
            target = TARGETS_MS.get(name)
            tgt = f"{target:>7.0f} {target / w:>8.2f}x" if target else f"{'':>7} {'':>9}"
            print(f"{name:<26} {w:>8.1f} {c:>7.1f} {w - bare_wall:>8.1f} {w / bare_wall:>8.2f}x {tgt} "
                  f"{min(walls[name]) * 1000:>9.1f}")
        print("CPU over python -c pass: " + ", ".join(
            f"{k} {cpu_med[k] - bare_cpu:+.1f} ms" for k in commands if k != "python -c pass"))
        full = wall_med["case list (full path)"]
        print(f"case list, full path / quick path: {full / wall_med['case list']:.2f}x wall, "
              f"{cpu_med['case list (full path)'] / cpu_med['case list']:.2f}x CPU")
        if sqlite_cli:
            peer = wall_med["sqlite3 DB 'SELECT ...'"]
            print(f"case list / sqlite3 shell: {wall_med['case list'] / peer:.2f}x wall "
                  f"(the shell has no interpreter to start)")
        print(f"checks: --json identical on both paths: {'yes' if same else 'NO'}; audit entries written "
              f"{written} of {audited_runs * args.repeat} expected; audit verify: {'ok' if verified else 'FAILED'}")

        if args.importtime:
            for name, argv in (("--version", ["--version"]), ("--help", ["--help"]),
                               ("case list", ["case", "list"]), ("case list (full path)", ["case", "list"])):
                cenv = full_env if "full" in name else env
                runs = [_importtime(argv, cenv) for _ in range(7)]
                mods = set().union(*runs)
                med = {m: statistics.median(run.get(m, 0.0) for run in runs) for m in mods}
                heavy = sorted({m.split(".")[0] for m in mods if m.split(".")[0] in HEAVY})
                print(f"\n-X importtime, {name}: {len(mods)} modules, {sum(med.values()):.1f} ms importing "
                      f"(median of 7; heavy: {', '.join(heavy) or 'none'}); the most costly, by own time:")
                for m, ms in sorted(med.items(), key=lambda kv: -kv[1])[:12]:
                    print(f"  {ms:>7.1f} ms  {m}")
        ok = same and written == audited_runs * args.repeat and verified
        return 0 if ok else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
