"""Stubs and summaries: is this document the report or note itself, or something in its place?

A second opinion is only as good as the underlying documents. Records routinely hold a
stand-in: a pathology DiagnosticReport whose whole text is "See outside report.", a note that
says "report to follow", a pathology text without a diagnosis, a discharge summary or an IPS
patient summary where the visit note should be. Each counts as ``summary-only`` in the gap report,
with the words that gave it away.

Two halves, because the bytes and the checklist live in different phases:

* :func:`profile_bytes` / :func:`profile_text` read a document's text once, at normalization
  (where the attachment bytes are at hand), into a small :class:`~aggregator.model.TextProfile`
  carried on the record's :class:`~aggregator.model.DocumentFile`;
* :func:`judge` and :func:`summary_type` decide, in the checklist, from that profile, the
  resource's classes and its type codes.

The rules are clinical knowledge and live in ``schemas/tables/stubs.yaml``. Only text the project
can read is judged: plain text, HTML/XHTML, C-CDA narrative, Composition narrative. A PDF or an
image is never called a stub from its bytes (no text is extracted from them); its document type
still counts.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from html import unescape
from html.parser import HTMLParser
from typing import Any, NamedTuple
from xml.etree.ElementTree import Element, ParseError

from defusedxml import ElementTree as SafeET
from defusedxml.common import DefusedXmlException

from aggregator.errors import ConfigError
from aggregator.model import TextProfile
from aggregator.tables import compile_pattern, load_mapping

TABLE = "tables/stubs.yaml"
LOINC_SYSTEMS = frozenset({"http://loinc.org", "urn:oid:2.16.840.1.113883.6.1"})
_CDA = "{urn:hl7-org:v3}"
_WORD = re.compile(r"[^\W\d_]{2,}")
_SPACE = re.compile(r"\s+")
#: a text of at most this many words keeps its start as the snippet a gap detail quotes
_SNIPPET_WORDS = 40
_SNIPPET_CHARS = 120


@dataclass(frozen=True)
class Rules:
    kinds: tuple[str, ...]
    min_words: dict[str, int]
    default_min: int
    pointer_max_words: int
    pointers: tuple[re.Pattern[str], ...]
    required: dict[str, tuple[str, ...]]
    sections: dict[str, tuple[re.Pattern[str], ...]]
    summary_classes: frozenset[str]
    summary_codes: dict[str, str]
    summary_titles: tuple[tuple[re.Pattern[str], str], ...]
    max_bytes: int


class Verdict(NamedTuple):
    """Why a document is not the report itself: ``pointer``, ``short`` or ``missing-section``."""

    code: str
    trigger: str


def _compile(pattern: str, where: str) -> re.Pattern[str]:
    return compile_pattern(pattern, f"bad pattern in {TABLE} ({where})")


def parse_rules(data: Mapping[str, Any]) -> Rules:
    """Build the rules from the YAML document (exposed for tests of custom tables)."""
    mins = {str(k): int(v) for k, v in (data.get("min_words") or {}).items()}
    default = mins.pop("default", 0)
    summary = data.get("summary_documents") or {}
    sections = {str(k): tuple(_compile(p, f"sections.{k}") for p in v or [])
                for k, v in (data.get("sections") or {}).items()}
    required = {str(k): tuple(map(str, v or [])) for k, v in (data.get("required_sections") or {}).items()}
    for kind, keys in required.items():
        for key in keys:
            if key not in sections:
                raise ConfigError(f"{TABLE}: required section {key!r} of {kind} has no headings")
    return Rules(
        kinds=tuple(map(str, data.get("kinds") or [])),
        min_words=mins,
        default_min=default,
        pointer_max_words=int(data.get("pointer_max_words") or 0),
        pointers=tuple(_compile(p, "pointers") for p in data.get("pointers") or []),
        required=required,
        sections=sections,
        summary_classes=frozenset(map(str, data.get("summary_classes") or [])),
        summary_codes={str(k): str(v) for k, v in (summary.get("loinc") or {}).items()},
        summary_titles=tuple((_compile(t["pattern"], "summary_documents.titles"), str(t["label"]))
                             for t in summary.get("titles") or []),
        max_bytes=int(data.get("max_bytes") or 262144),
    )


@lru_cache(maxsize=1)
def load_rules() -> Rules:
    """The shipped rules (read once per process)."""
    return parse_rules(load_mapping(TABLE, "stub rules"))


# --- text of a document ----------------------------------------------------------------------

_BLOCK_TAGS = frozenset({"p", "div", "br", "tr", "li", "h1", "h2", "h3", "h4", "h5", "h6", "table", "td",
                         "th", "section", "title", "paragraph", "item", "caption", "thead", "tbody", "pre",
                         "ul", "ol", "dl", "dt", "dd", "hr", "blockquote", "header", "footer", "body"})
_SKIP_TAGS = frozenset({"script", "style"})


class _Html(HTMLParser):
    """Text of HTML/XHTML with a line break at each block element (headings stay on their line)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        t = tag.lower().rsplit(":", 1)[-1]
        if t in _SKIP_TAGS:
            self._skip += 1
        elif t in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        t = tag.lower().rsplit(":", 1)[-1]
        if t in _SKIP_TAGS:
            self._skip = max(0, self._skip - 1)
        elif t in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def html_text(markup: str) -> str:
    parser = _Html()
    parser.feed(markup)
    parser.close()
    return unescape("".join(parser.parts))


def _decode(raw: bytes) -> str | None:
    """Bytes -> text, or None for what is not text (NUL bytes outside UTF-16)."""
    for bom, enc in ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")):
        if raw.startswith(bom):
            return raw.decode(enc, errors="replace")
    if b"\x00" in raw[:4096]:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _cda_text(root: Element) -> str | None:
    """The narrative of a C-CDA structured body: each section's title and text, one per line."""
    body = root.find(f"{_CDA}component/{_CDA}structuredBody")
    if body is None:
        return None  # a non-XML body (scanned PDF in base64) is not judged by its text
    lines: list[str] = []
    for section in body.iter(f"{_CDA}section"):
        title = section.find(f"{_CDA}title")
        if title is not None:
            lines.append(" ".join(title.itertext()))
        text = section.find(f"{_CDA}text")
        if text is not None:
            lines.append("\n".join(t for t in text.itertext()))
    return "\n".join(lines)


def _kind_of_bytes(raw: bytes, content_type: str) -> str:
    ctype = content_type.split(";", 1)[0].strip().lower()
    if ctype in ("text/plain", "text/markdown", "text/csv"):
        return "text"
    if ctype in ("text/html", "application/xhtml", "application/xhtml+xml"):
        return "html"
    if ctype in ("text/xml", "application/xml", "application/hl7-v3+xml", "application/cda+xml"):
        return "xml"
    if ctype and ctype not in ("application/octet-stream", "binary/octet-stream"):
        return "other"  # PDF, images, Word, RTF...: no text extraction here
    head = raw[:512].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith(b"%pdf") or not head:
        return "other"
    if head.startswith(b"<"):
        return "html" if b"<html" in head or b"<!doctype html" in head else "xml"
    return "text"


def text_of(raw: bytes, content_type: str) -> str | None:
    """The readable text of a document's bytes, or None when it is not judged by its text."""
    kind = _kind_of_bytes(raw, content_type)
    if kind == "other":
        return None
    text = _decode(raw)
    if text is None:
        return None
    if kind == "html":
        return html_text(text)
    if kind == "xml":
        try:
            root = SafeET.fromstring(raw)
        except (ParseError, DefusedXmlException, ValueError):
            return None
        if root.tag != f"{_CDA}ClinicalDocument":
            return None  # another XML form (SDC, XDS metadata): its words are not in text nodes
        return _cda_text(root)
    return text


def profile_text(text: str, rules: Rules | None = None) -> TextProfile:
    """Words, pointer phrase, section headings and (short texts) the start of ``text``."""
    rules = rules or load_rules()
    words = len(_WORD.findall(text))
    flat = _SPACE.sub(" ", text).strip()
    pointer = ""
    if words <= rules.pointer_max_words:
        for pat in rules.pointers:
            m = pat.search(flat)
            if m is not None:
                pointer = m.group(0).strip()[:80]
                break
    found = frozenset(key for key, pats in rules.sections.items() if any(p.search(text) for p in pats))
    snippet = flat[:_SNIPPET_CHARS] if words <= _SNIPPET_WORDS else ""
    return TextProfile(words, pointer, found, snippet)


def profile_bytes(raw: bytes, content_type: str, rules: Rules | None = None) -> TextProfile | None:
    """The profile of a document's bytes; None when it is not judged by text (PDF, image...)."""
    rules = rules or load_rules()
    if len(raw) > rules.max_bytes:
        return None  # far longer than any stub: not read
    text = text_of(raw, content_type)
    return None if text is None else profile_text(text, rules)


# --- the verdict --------------------------------------------------------------------------------


def kind_of(classes: Iterable[str], rules: Rules | None = None) -> str:
    """The document kind whose rules apply (the first of ``kinds`` among its classes), or ''."""
    rules = rules or load_rules()
    have = set(classes)
    return next((k for k in rules.kinds if k in have), "")


def verdict(kind: str, prof: TextProfile, rules: Rules | None = None) -> Verdict | None:
    """Why this text is not a full document of ``kind``, or None when it is."""
    rules = rules or load_rules()
    minimum = rules.min_words.get(kind, rules.default_min)
    required = rules.required.get(kind, ())
    missing = next((key for key in required if key not in prof.sections), None)
    # a report with its diagnosis and some length that mentions a pending addendum is the report
    structured = bool(required) and missing is None and prof.words >= 2 * minimum
    if prof.pointer and not structured:
        return Verdict("pointer", prof.pointer)
    if prof.words < minimum:
        return Verdict("short", prof.snippet or f"{prof.words} words")
    if missing is not None:
        return Verdict("missing-section", missing)
    return None


def judge(classes: Iterable[str], profiles: Sequence[TextProfile | None], rules: Rules | None = None) -> str:
    """The gap detail when every judged text of a document is a stub; '' when one is full or
    none could be judged (a PDF next to a stub text counts as the document)."""
    rules = rules or load_rules()
    if not profiles or any(p is None for p in profiles):
        return ""
    kind = kind_of(classes, rules)
    found = [verdict(kind, p, rules) for p in profiles if p is not None]
    if not found or any(v is None for v in found):
        return ""
    first = next(v for v in found if v is not None)
    return describe(kind, first)


def describe(kind: str, v: Verdict) -> str:
    noun = kind.replace("-", " ") if kind else "document"
    if v.code == "pointer":
        return f'its text points elsewhere instead of being the {noun}: "{v.trigger}"'
    if v.code == "short":
        return f'its text is too short to be the {noun}: "{v.trigger}"'
    return f"its text has no {v.trigger} section, so it is not the {noun} itself"


def _codings(value: Any) -> Iterable[Mapping[str, Any]]:
    values = value if isinstance(value, list) else [value]
    for v in values:
        if isinstance(v, Mapping):
            for c in v.get("coding") or []:
                if isinstance(c, Mapping):
                    yield c


def _texts(value: Any) -> Iterable[str]:
    values = value if isinstance(value, list) else [value]
    for v in values:
        if isinstance(v, Mapping):
            if isinstance(v.get("text"), str):
                yield v["text"]
            for c in _codings(v):
                if isinstance(c.get("display"), str):
                    yield c["display"]


def summary_type(res: Mapping[str, Any], rules: Rules | None = None) -> str:
    """What summary document this resource is by its type ("discharge summary"), or ''.

    Reads the document type (DocumentReference/Composition ``type``, DiagnosticReport ``code``)
    and a Composition's title; never the narrative, where "discharge summary" may be mentioned.
    """
    rules = rules or load_rules()
    fields = [res.get("type"), res.get("code")]
    for c in (c for f in fields for c in _codings(f)):
        if str(c.get("system") or "") in LOINC_SYSTEMS:
            label = rules.summary_codes.get(str(c.get("code") or "").strip())
            if label:
                return f"{label} (LOINC {str(c.get('code')).strip()})"
    texts = [t for f in fields for t in _texts(f)]
    if res.get("resourceType") == "Composition" and isinstance(res.get("title"), str):
        texts.append(res["title"])
    blob = " | ".join(texts)
    for pat, label in rules.summary_titles:
        if pat.search(blob):
            return label
    return ""


def wants_summary(classes: Iterable[str], rules: Rules | None = None) -> bool:
    """Whether a checklist selector naming these classes asks for a summary document itself."""
    rules = rules or load_rules()
    return bool(set(classes) & rules.summary_classes)


def composition_text(res: Mapping[str, Any]) -> str:
    """The narrative of a Composition's sections (nested ones too), titles included."""
    parts: list[str] = []

    def walk(sections: Any) -> None:
        for s in sections or []:
            if not isinstance(s, Mapping):
                continue
            if isinstance(s.get("title"), str):
                parts.append(s["title"])
            text = s.get("text")
            if isinstance(text, Mapping) and isinstance(text.get("div"), str):
                parts.append(html_text(text["div"]))
            walk(s.get("section"))

    walk(res.get("section"))
    return "\n".join(parts)
