"""How dates, numbers and units read on the page.

A physician reads "24 Aug 2020", not ``2020-08-24T00:52:41+00:00``; "82.6 mmHg", not
``82.60002748167719 mm[Hg]``. Everything here is a pure function of its input (no clock, no
locale), so the page stays byte-identical across machines.
"""

from __future__ import annotations

import re
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from functools import cache
from importlib import resources
from typing import Any

import yaml

MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
#: digits kept when a value carries more than a measurement can mean (a computed float)
SIGNIFICANT = 4
#: beyond this many significant digits a JSON number is taken as computed, not as the source's precision
MAX_SOURCE_DIGITS = 6
_DATE = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?(?:T(\d{2}):(\d{2}))?")


def parse_when(value: Any) -> tuple[str, str]:
    """(day key ``YYYY-MM-DD`` or shorter, ``HH:MM`` or "") of a FHIR date/dateTime; ("", "") if unreadable.

    The local time as written by the source is kept (no conversion to UTC): a lab drawn at 07:45
    reads 07:45, on the day the patient saw it.
    """
    m = _DATE.match(str(value or ""))
    if not m:
        return "", ""
    y, mo, d, hh, mm = m.groups()
    day = "-".join(p for p in (y, mo, d) if p)
    return day, (f"{hh}:{mm}" if hh else "")


def fmt_date(value: Any, *, with_time: bool = False) -> str:
    """'24 Aug 2020' (or 'Aug 2020', '2020' for partial dates); with the time only when asked."""
    day, time = parse_when(value)
    if not day:
        return str(value or "")
    parts = day.split("-")
    try:
        if len(parts) == 3:
            text = f"{int(parts[2])} {MONTHS[int(parts[1]) - 1]} {parts[0]}"
        elif len(parts) == 2:
            text = f"{MONTHS[int(parts[1]) - 1]} {parts[0]}"
        else:
            text = parts[0]
    except (ValueError, IndexError):
        return day
    return f"{text} {time}" if with_time and time else text


def to_date(value: Any) -> date | None:
    """The calendar day of a FHIR date/dateTime (the first of the month/year for partial dates)."""
    day, _ = parse_when(value)
    parts = [int(p) for p in day.split("-")] if day else []
    if not parts:
        return None
    try:
        return date(parts[0], parts[1] if len(parts) > 1 else 1, parts[2] if len(parts) > 2 else 1)
    except ValueError:
        return None


def to_datetime(value: Any) -> datetime | None:
    """Day and local time (naive) of a FHIR date/dateTime, for placing points on a time axis."""
    d = to_date(value)
    if d is None:
        return None
    _, time = parse_when(value)
    hh, mm = (int(x) for x in time.split(":")) if time else (0, 0)
    return datetime(d.year, d.month, d.day, min(hh, 23), min(mm, 59))


def fmt_number(value: Any) -> str:
    """A number with its source's precision; a computed float rounded to 4 significant digits.

    JSON keeps no trailing zeros, so the shortest representation of the parsed value is the best
    available reading of what the source wrote; only when that has more digits than any
    instrument reports (``82.60002748167719``) is it rounded.
    """
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    try:
        d = Decimal(str(value))
    except (InvalidOperation, ValueError):
        return str(value)
    if not d.is_finite():
        return str(value)
    digits = len(d.as_tuple().digits)
    if digits > MAX_SOURCE_DIGITS and d != d.to_integral_value():
        if abs(d) >= 10 ** (SIGNIFICANT - 1):
            return format(d.quantize(Decimal(1)), "f")  # never round away integer digits
        d = Decimal(f"{float(d):.{SIGNIFICANT}g}")
        text = format(d, "f")
        if "." in text:
            text = text.rstrip("0").rstrip(".")
        return text
    return format(d, "f")


@cache
def _ucum_table() -> dict[str, str]:
    text = resources.files("schemas").joinpath("tables/ucum-display.yaml").read_text("utf-8")
    data = yaml.safe_load(text) or {}
    return {str(k): str(v) for k, v in (data.get("units") or {}).items()}


def fmt_unit(unit: Any, code: Any = None) -> str:
    """A UCUM unit as a reader writes it (``mm[Hg]`` → mmHg, ``10*3/uL`` → 10³/µL, ``Cel`` → °C).

    The human ``unit`` text wins when the source gave one that is not itself a UCUM code; a code
    is translated with the table, and failing that its annotations (``{...}``) and brackets are
    dropped.
    """
    table = _ucum_table()
    for raw in (unit, code):
        if raw in (None, ""):
            continue
        text = str(raw)
        if text in table:
            return table[text]
        if not any(c in text for c in "[]{}*"):
            return text.replace("u", "µ", 1) if re.fullmatch(r"u[a-zA-Z]{1,2}(/.*)?", text) else text
        text = re.sub(r"\{[^}]*\}", "", text)
        text = re.sub(r"10\*(\d+)", lambda m: "10" + m.group(1).translate(_SUPERSCRIPT), text)
        text = text.replace("[", "").replace("]", "")
        return text.strip() or str(raw)
    return ""


_SUPERSCRIPT = str.maketrans("0123456789-", "⁰¹²³⁴⁵⁶⁷⁸⁹⁻")
