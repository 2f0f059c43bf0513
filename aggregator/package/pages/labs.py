"""Lab tests, vital signs and social history as series of values, for tables and trend charts.

A large record holds tens of thousands of Observations; a series keeps only what the page shows
of each value (date, number or text, unit, flag), never the resource.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aggregator.package.pages.fmt import fmt_date, fmt_number, fmt_unit, parse_when

#: Observation categories with their own section; everything else is a "result"
VITALS = "vital-signs"
SOCIAL = "social-history"
#: interpretation codes (v3 ObservationInterpretation) that mean high / low / abnormal
HIGH = frozenset({"H", "HH", "HU", ">", "AA"})
LOW = frozenset({"L", "LL", "LU", "<"})
ABNORMAL = frozenset({"A", "AA", "HH", "LL", "POS", "DET", "R"})
#: the flag as printed: a letter and an arrow, so it never relies on colour alone
FLAG_TEXT = {"H": "▲ H", "L": "▼ L", "A": "● A"}
#: the range dash a printed reference range uses
DASH = "\u2013"


def _concept_text(concept: Any) -> str:
    if not isinstance(concept, Mapping):
        return ""
    if concept.get("text"):
        return str(concept["text"])
    for c in concept.get("coding") or []:
        if isinstance(c, Mapping) and (c.get("display") or c.get("code")):
            return str(c.get("display") or c.get("code"))
    return ""


def category_of(res: Mapping[str, Any]) -> str:
    """'vital-signs', 'social-history', or the first category code (default 'laboratory')."""
    codes = [str(c.get("code")) for cat in res.get("category") or [] if isinstance(cat, Mapping)
             for c in cat.get("coding") or [] if isinstance(c, Mapping) and c.get("code")]
    for special in (VITALS, SOCIAL):
        if special in codes:
            return special
    return codes[0] if codes else "laboratory"


def _flag(res: Mapping[str, Any], value: float | None, low: float | None, high: float | None) -> str:
    """'H', 'L', 'A' or '': the source's interpretation first, else the value against its range."""
    for concept in res.get("interpretation") or []:
        if not isinstance(concept, Mapping):
            continue
        for c in concept.get("coding") or []:
            code = str(c.get("code") or "").upper() if isinstance(c, Mapping) else ""
            if code in HIGH:
                return "H"
            if code in LOW:
                return "L"
            if code in ABNORMAL:
                return "A"
            if code == "N":
                return ""
    if value is not None:
        if high is not None and value > high:
            return "H"
        if low is not None and value < low:
            return "L"
    return ""


def _range(res: Mapping[str, Any]) -> tuple[float | None, float | None, str]:
    """(low, high, text) of the first reference range."""
    for rr in res.get("referenceRange") or []:
        if not isinstance(rr, Mapping):
            continue
        low = _num((rr.get("low") or {}).get("value"))
        high = _num((rr.get("high") or {}).get("value"))
        if rr.get("text"):
            text = str(rr["text"])
        elif low is not None and high is not None:
            text = f"{fmt_number(rr['low']['value'])}{DASH}{fmt_number(rr['high']['value'])}"
        elif low is not None:
            text = f"≥ {fmt_number(rr['low']['value'])}"
        elif high is not None:
            text = f"≤ {fmt_number(rr['high']['value'])}"
        else:
            text = ""
        return low, high, text
    return None, None, ""


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


@dataclass
class Value:
    """One value of a series, as the page shows it."""

    when: str
    """The source's date/dateTime text (sort key and chart position)."""
    text: str
    """The value as printed (number with its precision, coded text, or 'absent: reason')."""
    number: float | None
    flag: str
    ref_id: str
    order: int = 0
    """Position in the bundle: values of equal dates keep the record's order (the later one is latest)."""
    show_time: bool = False

    @property
    def date_text(self) -> str:
        return fmt_date(self.when, with_time=self.show_time)

    @property
    def flag_text(self) -> str:
        return FLAG_TEXT.get(self.flag, "")


@dataclass
class Series:
    """All values of one test (one code; a blood pressure's systolic and diastolic are two series)."""

    key: str
    title: str
    category: str
    unit: str = ""
    low: float | None = None
    high: float | None = None
    range_text: str = ""
    panel: str = ""
    values: list[Value] = field(default_factory=list)

    def ordered(self) -> list[Value]:
        """Values oldest first (stable for equal dates), times shown where a day holds two values."""
        vals = sorted(self.values, key=lambda v: (parse_when(v.when), v.order))
        days: dict[str, int] = {}
        for v in vals:
            day = parse_when(v.when)[0]
            days[day] = days.get(day, 0) + 1
        for v in vals:
            v.show_time = days[parse_when(v.when)[0]] > 1
        return vals

    @property
    def latest(self) -> Value:
        return self.ordered()[-1]

    @property
    def charted(self) -> list[Value]:
        return [v for v in self.ordered() if v.number is not None and parse_when(v.when)[0]]


def value_of(res: Mapping[str, Any]) -> tuple[str, float | None, str]:
    """(printed value, number or None, readable unit) of an Observation's (or component's) value[x]."""
    q = res.get("valueQuantity")
    if isinstance(q, Mapping):
        number = _num(q.get("value"))
        comparator = str(q.get("comparator") or "")
        return f"{comparator}{fmt_number(q.get('value'))}", (None if comparator else number), fmt_unit(
            q.get("unit"), q.get("code"))
    if "valueInteger" in res:
        return fmt_number(res["valueInteger"]), _num(res["valueInteger"]), ""
    for key in ("valueString", "valueDateTime", "valueTime"):
        if key in res:
            return (fmt_date(res[key]) if key == "valueDateTime" else str(res[key])), None, ""
    if "valueBoolean" in res:
        return ("yes" if res["valueBoolean"] else "no"), None, ""
    if "valueCodeableConcept" in res:
        return _concept_text(res["valueCodeableConcept"]), None, ""
    if isinstance(res.get("valueRange"), Mapping):
        r = res["valueRange"]
        lo, hi = r.get("low") or {}, r.get("high") or {}
        return (f"{fmt_number(lo.get('value'))}{DASH}{fmt_number(hi.get('value'))}", None,
                fmt_unit(lo.get("unit") or hi.get("unit"), lo.get("code") or hi.get("code")))
    if res.get("dataAbsentReason"):
        return f"not reported ({_concept_text(res['dataAbsentReason'])})", None, ""
    return "", None, ""


def _code_key(concept: Any) -> str:
    if isinstance(concept, Mapping):
        for c in concept.get("coding") or []:
            if isinstance(c, Mapping) and c.get("code"):
                return f"{c.get('system', '')}|{c['code']}"
    return _concept_text(concept).lower()


class SeriesBook:
    """Series by test while the record streams, with the panel each value was reported in."""

    def __init__(self) -> None:
        self.series: dict[str, Series] = {}
        self.panel_of: dict[str, str] = {}
        """Observation reference → the lab panel (DiagnosticReport) listing it."""

    def add_panel(self, report: Mapping[str, Any], refs: list[str]) -> None:
        name = _concept_text(report.get("code"))
        for ref in refs:
            self.panel_of.setdefault(ref, name)

    def add(self, res: Mapping[str, Any], ref_keys: list[str]) -> None:
        category = category_of(res)
        ref_id = ref_keys[0] if ref_keys else ""
        parts: list[tuple[str, str, Mapping[str, Any]]] = []
        text, _, _ = value_of(res)
        if text or not res.get("component"):
            parts.append((_code_key(res.get("code")), _concept_text(res.get("code")), res))
        for comp in res.get("component") or []:
            if isinstance(comp, Mapping):
                parts.append((_code_key(comp.get("code")), _concept_text(comp.get("code")), comp))
        when = str(_when(res) or "")
        for key, title, node in parts:
            skey = f"{category}|{key}"
            s = self.series.get(skey)
            printed, number, unit = value_of(node)
            low, high, rtext = _range(node)
            if s is None:
                s = self.series[skey] = Series(skey, title or "(untitled test)", category)
            if unit and not s.unit:
                s.unit = unit
            if rtext and (not s.range_text or when >= max((v.when for v in s.values), default="")):
                s.low, s.high, s.range_text = low, high, rtext
            for k in ref_keys:
                if k in self.panel_of and not s.panel:
                    s.panel = self.panel_of[k]
            s.values.append(Value(when, printed, number, _flag(node, number, low, high), ref_id, len(s.values)))

    def finish(self) -> None:
        """Name each series' panel once all reports are known (a panel may follow its results)."""
        for s in self.series.values():
            if s.panel:
                continue
            for v in s.values:
                if v.ref_id in self.panel_of:
                    s.panel = self.panel_of[v.ref_id]
                    break

    def groups(self, category: str) -> list[tuple[str, list[Series]]]:
        """(group title, series sorted by title) for one section; labs grouped by panel, then category."""
        out: dict[str, list[Series]] = {}
        for s in self.series.values():
            in_section = s.category == category if category in (VITALS, SOCIAL) else s.category not in (
                VITALS, SOCIAL)
            if not in_section:
                continue
            group = s.panel or ("" if category in (VITALS, SOCIAL) else _category_title(s.category))
            out.setdefault(group, []).append(s)
        return [(g, sorted(out[g], key=lambda s: (s.title.lower(), s.key))) for g in sorted(out, key=_group_order)]


def _group_order(title: str) -> tuple[int, str]:
    return (1 if title.startswith("Other ") else 0, title.lower())


def _category_title(code: str) -> str:
    titles = {"laboratory": "Other laboratory results", "imaging": "Imaging measurements",
              "procedure": "Procedure results", "survey": "Surveys and scores", "exam": "Examination findings",
              "therapy": "Therapy", "activity": "Activity"}
    return titles.get(code, f"Other results ({code})")


def _when(res: Mapping[str, Any]) -> Any:
    for key in ("effectiveDateTime", "issued"):
        if res.get(key):
            return res[key]
    period = res.get("effectivePeriod")
    if isinstance(period, Mapping) and period.get("start"):
        return period["start"]
    if res.get("effectiveInstant"):
        return res["effectiveInstant"]
    return None
