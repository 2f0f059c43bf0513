"""Recall and precision of the gap report on the labelled set of :mod:`fixtures.labelled`.

Issue 11 ("A record the consultant can trust") is checked this way: on about 80 labelled cases,
each a complete record with one known item removed, recall must be 1.0 and precision at least
0.95 for every kind of gap. This script is that check, so that a change to the engine can be
measured before and after, and a regression shows up as a number.

Each case is built in its own temporary home through the real CLI, in-process
(``aggregator.cli.main``): ``case create`` with the fixture's patient name, birth date and case
date, ``source add --media`` for the download (and for the held-back folder of the
``unpulled-source`` cases, which is added but not pulled), ``pull``, ``check --json``.

Scoring, per case: the reported gaps are the (item, reason) pairs of every gap of every item
whose status is missing or partial, each pair counted once however many subjects it covers. A
pair equal to the label is a true positive; any other pair is a false positive (another item, or
the right item with a wrong reason); a label with no equal pair is a false negative. Tables:
by reason (true positives and false negatives count under the label's reason, false positives
under the reported reason) and by case kind (everything under the case's kind).

    .venv/bin/python bench/eval_gaps.py [--cases N] [--only KIND] [--jobs 2] [--json] [--no-fail] [--keep DIR]

Exit status 1 when overall or any reason's recall is below 1.0 or precision below 0.95 (or a
case could not run); ``--no-fail`` only reports.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from fixtures.labelled import CASES, KINDS, LabelledCase, write_case  # noqa: E402

RECALL_MIN = 1.0
PRECISION_MIN = 0.95


@dataclass
class CaseResult:
    name: str
    kind: str
    expected: list[tuple[str, str]]
    reported: list[tuple[str, str]] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0


# --------------------------------------------------------------------------- running one case


def _cli(home: Path, *args: str) -> tuple[int, str]:
    """``aggregator --home HOME ARGS...`` in this process; returns (exit code, stdout)."""
    from aggregator.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["--home", str(home), *args])
    return code, out.getvalue()


def _json_cli(home: Path, *args: str) -> Any:
    code, out = _cli(home, *args, "--json")
    if code != 0:
        raise RuntimeError(f"`aggregator {args[0]} {args[1] if len(args) > 1 else ''}` exited {code}: "
                           f"{out.strip()[:300]}")
    return json.loads(out)


def reported_gaps(report: dict[str, Any]) -> list[tuple[str, str]]:
    """The (item, reason) pairs of a gap report, once each, sorted."""
    pairs = {(item["id"], gap["reason"]) for item in report["items"] if item["status"] in ("missing", "partial")
             for gap in item.get("gaps", [])}
    return sorted(pairs)


def run_case(case: LabelledCase, work: Path) -> CaseResult:
    """Write ``case`` under ``work`` and run it through the CLI."""
    started = time.perf_counter()
    res = CaseResult(case.name, case.kind, case.labels)
    try:
        written = write_case(case, work / "files")
        home = work / "home"
        info = written.info
        _json_cli(home, "case", "create", "c", "--checklist", case.checklist, "--patient-name", info.patient_name,
                  "--birth-date", info.birth_date, "--case-date", info.case_date.isoformat())
        source = _json_cli(home, "source", "add", "c", "--media", str(written.download))
        if written.held_back is not None:
            _json_cli(home, "source", "add", "c", "--media", str(written.held_back))
        pulls = _json_cli(home, "pull", "c", "--source", str(source["id"]))
        failed = [p for p in pulls if p.get("state") != "done"]
        if failed:
            raise RuntimeError(f"pull did not finish: {[p.get('state') for p in failed]}")
        report = _json_cli(home, "check", "c")
        res.reported = reported_gaps(report)
    except Exception as exc:  # one broken case must not hide the others' figures
        res.error = f"{type(exc).__name__}: {exc}"
    res.seconds = round(time.perf_counter() - started, 2)
    return res


def _run_one(args: tuple[LabelledCase, str | None]) -> CaseResult:
    case, keep = args
    if keep:
        work = Path(keep) / case.name.replace("/", "__")
        work.mkdir(parents=True, exist_ok=True)
        return run_case(case, work)
    with tempfile.TemporaryDirectory(prefix="eval-gaps-") as tmp:
        return run_case(case, Path(tmp))


def run_cases(cases: Sequence[LabelledCase], *, jobs: int = 2, keep: str | None = None) -> list[CaseResult]:
    """Run every case (``jobs`` processes; 1 runs in this process), results in the cases' order."""
    work = [(c, keep) for c in cases]
    if jobs <= 1:
        return [_run_one(w) for w in work]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(_run_one, work, chunksize=1))


# --------------------------------------------------------------------------- scoring


@dataclass
class Tally:
    tp: int = 0
    fp: int = 0
    fn: int = 0

    @property
    def recall(self) -> float | None:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else None

    @property
    def precision(self) -> float | None:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else None

    def passes(self) -> bool:
        r, p = self.recall, self.precision
        return (r is None or r >= RECALL_MIN) and (p is None or p >= PRECISION_MIN)

    def as_dict(self) -> dict[str, Any]:
        return {"tp": self.tp, "fp": self.fp, "fn": self.fn, "recall": self.recall, "precision": self.precision}


@dataclass
class Score:
    overall: Tally
    by_reason: dict[str, Tally]
    by_kind: dict[str, Tally]
    mismatches: list[dict[str, Any]]
    errors: list[dict[str, str]]

    def passes(self) -> bool:
        return not self.errors and self.overall.passes() and all(t.passes() for t in self.by_reason.values())

    def as_dict(self) -> dict[str, Any]:
        return {"overall": self.overall.as_dict(),
                "by_reason": {k: v.as_dict() for k, v in sorted(self.by_reason.items())},
                "by_kind": {k: v.as_dict() for k, v in sorted(self.by_kind.items())},
                "mismatches": self.mismatches, "errors": self.errors, "pass": self.passes(),
                "thresholds": {"recall": RECALL_MIN, "precision": PRECISION_MIN}}


def score(results: Iterable[CaseResult]) -> Score:
    overall = Tally()
    by_reason: dict[str, Tally] = {}
    by_kind: dict[str, Tally] = {}
    mismatches: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []

    def count(what: str, reason: str, kind: str) -> None:
        for t in (overall, by_reason.setdefault(reason, Tally()), by_kind.setdefault(kind, Tally())):
            setattr(t, what, getattr(t, what) + 1)

    for r in results:
        by_kind.setdefault(r.kind, Tally())
        if r.error is not None:
            errors.append({"case": r.name, "error": r.error})
            continue
        reported = set(r.reported)
        wanted = dict(r.expected)  # item -> reason (one label per item)
        missed_items = set()
        for item, reason in r.expected:
            if (item, reason) in reported:
                count("tp", reason, r.kind)
            else:
                count("fn", reason, r.kind)
                missed_items.add(item)
                got = sorted(rs for it, rs in reported if it == item)
                mismatches.append({"case": r.name, "item": item, "expected": reason, "got": ", ".join(got) or "no gap"})
        for item, reason in sorted(reported - set(r.expected)):
            count("fp", reason, r.kind)
            if item in missed_items:
                continue  # the false negative's row above already shows this reason as "got"
            mismatches.append({"case": r.name, "item": item, "expected": wanted.get(item, "no gap"), "got": reason})
    return Score(overall, by_reason, by_kind, mismatches, errors)


# --------------------------------------------------------------------------- output


def _fmt(x: float | None) -> str:
    return "  -  " if x is None else f"{x:5.2f}"


def _table(title: str, rows: dict[str, Tally], overall: Tally | None = None) -> list[str]:
    out = [f"{title:<26} {'TP':>4} {'FP':>4} {'FN':>4}  recall  precision"]
    items = sorted(rows.items())
    if overall is not None:
        items.append(("OVERALL", overall))
    for name, t in items:
        flag = "" if t.passes() else "  <-"
        out.append(f"{name:<26} {t.tp:>4} {t.fp:>4} {t.fn:>4}  {_fmt(t.recall)}   {_fmt(t.precision)}{flag}")
    return out


def render(s: Score, results: Sequence[CaseResult], seconds: float) -> str:
    lines = [f"{len(results)} labelled cases in {seconds:.1f} s "
             f"(thresholds: recall >= {RECALL_MIN}, precision >= {PRECISION_MIN})", ""]
    lines += _table("by reason", s.by_reason, s.overall)
    lines += ["", *_table("by case kind", s.by_kind)]
    if s.mismatches:
        lines += ["", f"mismatches ({len(s.mismatches)}):", f"  {'case':<58} {'item':<18} {'expected':<22} got"]
        lines += [f"  {m['case']:<58} {m['item']:<18} {m['expected']:<22} {m['got']}" for m in s.mismatches]
    if s.errors:
        lines += ["", f"cases that did not run ({len(s.errors)}):"]
        lines += [f"  {e['case']}: {e['error']}" for e in s.errors]
    lines += ["", "PASS" if s.passes() else "FAIL"]
    return "\n".join(lines)


def select(cases: Sequence[LabelledCase], *, only: str | None = None, n: int | None = None
           ) -> list[LabelledCase]:
    """Cases of one kind (case kind or expected reason) and/or the first ``n`` taken round-robin over kinds."""
    chosen = [c for c in cases if only is None or c.kind == only
              or (c.expected is not None and c.expected.reason == only)]
    if n is None or n >= len(chosen):
        return chosen
    queues: dict[str, list[LabelledCase]] = {}
    for c in chosen:
        queues.setdefault(c.kind, []).append(c)
    picked: list[LabelledCase] = []
    while len(picked) < n:
        for q in queues.values():
            if q and len(picked) < n:
                picked.append(q.pop(0))
    return picked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, help="only N cases, taken round-robin over the kinds")
    kinds = sorted(set(KINDS) | {c.expected.reason for c in CASES if c.expected})
    parser.add_argument("--only", choices=kinds, help="only cases of this kind (case kind or expected reason)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (default 2; 1 runs in-process)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--no-fail", action="store_true", help="exit 0 even below the thresholds")
    parser.add_argument("--keep", metavar="DIR", help="keep each case's files and home under DIR")
    args = parser.parse_args(argv)

    cases = select(CASES, only=args.only, n=args.cases)
    started = time.perf_counter()
    results = run_cases(cases, jobs=args.jobs, keep=args.keep)
    seconds = time.perf_counter() - started
    s = score(results)
    if args.json:
        doc = s.as_dict()
        doc["cases"] = [asdict(r) for r in results]
        doc["seconds"] = round(seconds, 1)
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        print(render(s, results, seconds))
    return 0 if args.no_fail or s.passes() else 1


if __name__ == "__main__":
    sys.exit(main())
