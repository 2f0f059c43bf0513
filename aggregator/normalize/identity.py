"""Who is the case's patient: reconcile FHIR Patients and DICOM patient attributes into one.

Matching is deliberately conservative and explainable:

* a candidate *seeds* the case patient when it matches what the navigator typed (name tolerant
  to order, commas, DICOM ``^``, case and accents; birth date equal when both are known);
* the cluster then grows by *strong* links only: a shared identifier (system and value; a DICOM
  PatientID counts when it equals any identifier value), the same Patient id in the same source,
  or name **and** birth date both matching;
* whatever joins the cluster but disagrees on name, birth date or sex becomes a conflict for a
  navigator to confirm (never silently merged away: the first Patient's value stays, all values
  are reported); whatever does not join is "another patient".

A FHIR source added with ``--patient-id`` pins its Patient (that id in that source) as a seed
too: the navigator chose it.

Without a seed, the sources are split into *persons* (groups joined by the strong links above).
One person: it is the case's patient, so a single-patient download still works (a typed name
that matched nothing is reported as a conflict against it). Several persons: nothing is chosen -
picking the Patient with the most resources once let a bare Patient with 300 Observations stand
for the real one. The persons are listed (by resource id and counts, never by name) for a
navigator to pick, and every one of them stays out of the record until then.

Documents state their own patient too (a C-CDA ``recordTarget``, an HL7 v2 PID): the media
connector turns those demographics into a Patient tagged with :data:`DEMOGRAPHICS_TAG`, so a
document about another person is "another patient" here like any other resource.

A candidate with neither a name nor a birth date (:attr:`Candidate.anonymous`) can join the
cluster by a shared identifier, but it never seeds it and never confirms anyone's identity.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from aggregator.model import CaseInfo
from aggregator.normalize.dicom import Instance
from aggregator.normalize.scratch import Item

SEX = {"M": "male", "F": "female", "O": "other"}
#: ``meta.tag`` system of a Patient made from a document's own demographics (see connectors.ccda)
DEMOGRAPHICS_TAG = "urn:aggregator:demographics-from"


def fold(text: str) -> str:
    """Lower-case, accents removed, punctuation to spaces (for matching only)."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    return re.sub(r"[^a-z\s]+", " ", text.replace("^", " ").replace("=", " "))


def tokens(text: str) -> frozenset[str]:
    return frozenset(t for t in fold(text).split() if t)


@dataclass(frozen=True)
class PersonName:
    family: tuple[str, ...]
    given: tuple[str, ...]
    display: str

    def matches(self, typed: frozenset[str]) -> bool:
        """Family name tokens and the first given name (or its initial) appear in ``typed``."""
        if not self.family and not self.given:
            return False
        if not set(self.family) <= typed:
            return False
        if not self.given:
            return True
        g = self.given[0]
        return g in typed or (len(g) == 1 and any(t.startswith(g) for t in typed)) or any(
            len(t) == 1 and g.startswith(t) for t in typed)

    def all_tokens(self) -> frozenset[str]:
        return frozenset(self.family) | frozenset(self.given)


def fhir_names(patient: dict[str, Any]) -> list[PersonName]:
    out = []
    raw = patient.get("name")
    for n in raw if isinstance(raw, list) else []:
        if not isinstance(n, dict):
            continue
        family = tuple(fold(str(n.get("family") or "")).split())
        given = tuple(t for g in n.get("given") or [] for t in fold(str(g)).split())
        if not family and not given and n.get("text"):
            parts = fold(str(n["text"])).split()
            family, given = tuple(parts[-1:]), tuple(parts[:-1])
        display = str(n.get("text") or " ".join([*(n.get("given") or []), str(n.get("family") or "")]).strip())
        out.append(PersonName(family, given, display))
    return out


def dicom_name(pn: str) -> PersonName | None:
    """``Family^Given^Middle^Prefix^Suffix`` of the alphabetic group, for matching only.

    Matching folds to Latin letters, so the ideographic and phonetic groups could never match
    what a navigator typed; they are kept in the Patient by :func:`dicom_human_names` instead.
    """
    alpha = pn.split("=")[0]
    if not alpha.strip("^ "):
        return None
    parts = alpha.split("^")
    family = tuple(fold(parts[0]).split())
    given = tuple(t for p in parts[1:3] for t in fold(p).split())
    return PersonName(family, given, alpha)


#: HL7 extension telling the representations of one name apart (ISO 21090 EN.representation)
EN_REPRESENTATION = "http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation"
#: DICOM PN component groups in order (PS3.5 6.2.1.2): alphabetic, ideographic, phonetic
PN_GROUPS = ("ABC", "IDE", "SYL")


def representation(name: Any) -> str:
    """``ABC``, ``IDE`` or ``SYL`` from a HumanName's EN-representation extension, else ``""``."""
    for ext in (name.get("extension") or []) if isinstance(name, dict) else []:
        if isinstance(ext, dict) and ext.get("url") == EN_REPRESENTATION:
            return str(ext.get("valueCode") or "")
    return ""


def _group_name(group: str) -> dict[str, Any]:
    parts = [p.strip() for p in group.split("^")] + [""] * 5
    hn: dict[str, Any] = {"text": " ".join(group.replace("^", " ").split())}
    if parts[0]:
        hn["family"] = parts[0]
    given = [p for p in parts[1:3] if p]
    if given:
        hn["given"] = given
    if parts[3]:
        hn["prefix"] = [parts[3]]
    if parts[4]:
        hn["suffix"] = [parts[4]]
    return hn


def dicom_human_names(pn: str) -> list[tuple[str, dict[str, Any]]]:
    """Every non-empty component group of a DICOM PN as ``(group code, FHIR HumanName)``.

    The alphabetic group comes first (the primary name). When the value has an ideographic or
    phonetic group, every name carries the EN-representation extension (``ABC``/``IDE``/``SYL``)
    so a reader can tell ``Yamada^Tarou=山田^太郎=やまだ^たろう``'s three spellings apart; a
    plain one-group name stays a plain HumanName.
    """
    groups = pn.split("=")[:3]
    marked = any(g.strip("^ ") for g in groups[1:])
    out = []
    for code, group in zip(PN_GROUPS, groups, strict=False):
        if not group.strip("^ "):
            continue
        hn = _group_name(group)
        if marked:
            hn = {"extension": [{"url": EN_REPRESENTATION, "valueCode": code}], **hn}
        out.append((code, hn))
    return out


def typed_name(text: str) -> frozenset[str]:
    return tokens(text)


def _date(value: str) -> str:
    v = value.strip()
    if len(v) == 8 and v.isdigit():
        return f"{v[:4]}-{v[4:6]}-{v[6:]}"
    return v[:10]


@dataclass
class Candidate:
    """A Patient resource, or one distinct DICOM patient (PatientID, issuer, name, birth date)."""

    label: str
    source_id: int
    names: list[PersonName]
    birth_date: str
    sex: str
    identifiers: set[tuple[str, str]]
    item: Item | None = None
    instances: list[Instance] = field(default_factory=list)
    refs: int = 0
    document: str = ""
    """``ccda`` / ``hl7v2`` when the demographics are what a document states about its patient."""

    @property
    def anonymous(self) -> bool:
        """Neither a name nor a birth date: such a candidate can never confirm who the patient is."""
        return not self.names and not self.birth_date

    @property
    def count(self) -> int:
        """What stands behind it: resources referring to it, or DICOM instances."""
        return self.refs + len(self.instances)

    @property
    def values(self) -> set[str]:
        return {v for _, v in self.identifiers}

    def name_matches(self, typed: frozenset[str]) -> bool:
        return any(n.matches(typed) for n in self.names)

    def same_person_name(self, other: Candidate) -> bool:
        return any(a.matches(b.all_tokens()) or b.matches(a.all_tokens()) for a in self.names for b in other.names)


def dicom_identifier_system(issuer: str) -> str:
    if re.fullmatch(r"[0-2](\.(0|[1-9][0-9]*))+", issuer):
        return f"urn:oid:{issuer}"
    if issuer:
        return "urn:aggregator:dicom-issuer:" + quote(issuer, safe="")
    return "urn:aggregator:dicom-patient-id"


def from_item(item: Item) -> Candidate:
    p = item.body()
    idents = {(str(i.get("system") or ""), str(i.get("value"))) for i in p.get("identifier") or []
              if isinstance(i, dict) and i.get("value")}
    meta = p.get("meta")
    tags = (meta.get("tag") if isinstance(meta, dict) else None) or []
    doc = next((str(t.get("code") or "") for t in tags
                if isinstance(t, dict) and t.get("system") == DEMOGRAPHICS_TAG), "")
    return Candidate(f"{item.ref}", item.source_id, fhir_names(p), _date(str(p.get("birthDate") or "")),
                     str(p.get("gender") or ""), idents, item=item, document=doc if item.derived else "")


def from_instances(instances: Iterable[Instance]) -> list[Candidate]:
    groups: dict[tuple[int, str, str, str, str], list[Instance]] = {}
    for inst in instances:
        groups.setdefault((inst.source_id, inst.patient_id, inst.issuer, inst.patient_name, inst.birth_date),
                          []).append(inst)
    out = []
    for (sid, pid, issuer, name, birth), members in sorted(groups.items()):
        pn = dicom_name(name)
        idents = {(dicom_identifier_system(issuer), pid)} if pid else set()
        sex = SEX.get(members[0].sex.upper(), "") if members[0].sex else ""
        out.append(Candidate(f"dicom:{members[0].sop_uid}", sid, [pn] if pn else [], _date(birth), sex, idents,
                             instances=members))
    return out


def _linked(a: Candidate, b: Candidate) -> bool:
    if a.item is not None and b.item is not None and a.source_id == b.source_id and a.item.rid \
            and a.item.rid == b.item.rid:
        return True
    if a.identifiers & b.identifiers:
        return True
    if (a.item is None or b.item is None) and (a.values & b.values):
        return True  # a DICOM PatientID equal to an identifier value, whatever the issuer
    return bool(a.birth_date and a.birth_date == b.birth_date and a.same_person_name(b))


@dataclass
class Identity:
    members: list[Candidate]
    others: list[Candidate]
    conflicts: list[dict[str, Any]]
    several: list[list[Candidate]] = field(default_factory=list)
    """Nothing was chosen: the persons found in the sources (each a list of candidates)."""
    pinned: bool = False
    """The cluster was seeded by the typed demographics or a source's patient id."""


def _pinned(c: Candidate, pins: dict[int, str]) -> bool:
    """The FHIR Patient a source was added for. A DICOM PatientID does not pin: another person may
    share it (that is what issuers and birth dates tell apart)."""
    pid = pins.get(c.source_id)
    return bool(pid) and c.item is not None and not c.item.derived and c.item.rid == pid


def persons(candidates: list[Candidate]) -> list[list[Candidate]]:
    """Candidates grouped by the strong links (connected groups), in a stable order."""
    groups: list[list[Candidate]] = []
    rest = sorted(candidates, key=lambda c: (c.source_id, c.label))
    while rest:
        group = [rest.pop(0)]
        _grow(group, rest)
        groups.append(sorted(group, key=lambda c: (c.item is None, c.source_id, c.label)))
    return groups


def _grow(group: list[Candidate], rest: list[Candidate]) -> None:
    """Move into ``group`` every candidate of ``rest`` linked to it, directly or through one moved
    before, until none is left to move (both lists change in place, order kept).

    One function for the persons found and the case patient's cluster, so that the two can never
    disagree on who is linked to whom."""
    grew = True
    while grew:
        grew = False
        for c in list(rest):
            if any(_linked(c, m) for m in group):
                group.append(c)
                rest.remove(c)
                grew = True


def reconcile(case: CaseInfo, candidates: list[Candidate], pins: dict[int, str] | None = None) -> Identity:
    """Split candidates into the case patient's cluster and the others; list the conflicts.

    ``pins`` maps a source id to the patient id it was added with (``--patient-id``)."""
    typed = typed_name(case.patient_name) if case.patient_name else frozenset()
    birth = _date(case.birth_date) if case.birth_date else ""
    seeds: list[Candidate] = [c for c in candidates if _pinned(c, pins or {})]
    if typed or birth:
        for c in candidates:
            if c in seeds or c.anonymous:
                continue
            if typed and not c.name_matches(typed):
                continue
            if birth and c.birth_date and c.birth_date != birth:
                continue
            if not typed and not c.birth_date:
                continue
            seeds.append(c)
    pinned = bool(seeds)
    conflicts: list[dict[str, Any]] = []
    if not seeds and candidates:
        found = persons(candidates)
        if len(found) > 1:
            return Identity([], sorted(candidates, key=lambda c: (c.source_id, c.label)), [], found)
        seeds = list(found[0])
        anchor = max(seeds, key=lambda c: (c.item is not None, c.refs, len(c.instances),
                                           -c.source_id, _neg(c.label)))
        if typed:
            conflicts.append({"field": "name", "values": sorted({case.patient_name or "",
                                                                 *(n.display for n in anchor.names)}),
                              "sources": [anchor.source_id], "resources": [anchor.label], "case": True})
        if birth and anchor.birth_date and anchor.birth_date != birth:
            conflicts.append({"field": "birthDate", "values": sorted({birth, anchor.birth_date}),
                              "sources": [anchor.source_id], "resources": [anchor.label], "case": True})
    members = list(seeds)
    rest = [c for c in candidates if c not in members]
    _grow(members, rest)
    members.sort(key=lambda c: (c.item is None, c.source_id, c.label))
    conflicts.extend(_conflicts(members))
    return Identity(members, sorted(rest, key=lambda c: (c.source_id, c.label)), conflicts, pinned=pinned)


def _neg(label: str) -> tuple[int, ...]:
    return tuple(-ord(ch) for ch in label)


def _conflicts(members: list[Candidate]) -> list[dict[str, Any]]:
    out = []
    births = {c.birth_date for c in members if c.birth_date}
    if len(births) > 1:
        out.append(_conflict("birthDate", [(c, c.birth_date) for c in members if c.birth_date]))
    sexes = {c.sex for c in members if c.sex}
    if len(sexes) > 1:
        out.append(_conflict("gender", [(c, c.sex) for c in members if c.sex]))
    named = [c for c in members if c.names]
    if named and any(not c.same_person_name(named[0]) for c in named[1:]):
        out.append(_conflict("name", [(c, c.names[0].display) for c in named]))
    return out


def _conflict(fld: str, pairs: list[tuple[Candidate, str]]) -> dict[str, Any]:
    return {"field": fld, "values": sorted({v for _, v in pairs}),
            "sources": sorted({c.source_id for c, _ in pairs}),
            "resources": sorted({c.label for c, _ in pairs})}


def merged_patient(pid: str, case: CaseInfo, members: list[Candidate]) -> dict[str, Any]:
    """One Patient carrying every identifier and name of the cluster, plus ``link``s to the
    source copies it replaces (by identifier: those copies are not in the bundle)."""
    fhir = [c for c in members if c.item is not None]
    base: dict[str, Any] = fhir[0].item.body() if fhir and fhir[0].item is not None else {}
    base = {k: v for k, v in base.items() if k not in ("id", "meta", "text", "link")}
    patient: dict[str, Any] = {"resourceType": "Patient", "id": pid}
    idents: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    names: list[dict[str, Any]] = []
    seen_names: set[str] = set()
    links: list[dict[str, Any]] = []
    for c in fhir:
        assert c.item is not None
        data = c.item.body()
        for i in data.get("identifier") or []:
            if isinstance(i, dict) and i.get("value"):
                k = (str(i.get("system") or ""), str(i["value"]))
                if k not in seen:
                    seen.add(k)
                    idents.append(i)
        for nm in data.get("name") or []:
            nkey = repr(sorted(nm.items())) if isinstance(nm, dict) else repr(nm)
            if nkey not in seen_names:
                seen_names.add(nkey)
                names.append(nm)
        for link in data.get("link") or []:
            if isinstance(link, dict) and link not in links:
                links.append(link)
        links.append({"other": {"identifier": {"system": f"urn:aggregator:source:{c.source_id}",
                                               "value": c.item.ref}}, "type": "seealso"})
    known = [n for c in fhir for n in c.names]
    for c in members:
        if c.item is not None:
            continue
        for system, value in sorted(c.identifiers):
            if (system, value) not in seen:
                seen.add((system, value))
                idents.append({"type": {"text": "DICOM PatientID"}, "system": system, "value": value})
        raw = c.instances[0].patient_name if c.instances else ""
        for code, hn in dicom_human_names(raw):
            if code == "ABC":
                # the alphabetic group is added unless a name already known says the same
                pn = dicom_name(raw)
                if pn is None or any(pn.matches(k.all_tokens()) or k.matches(pn.all_tokens()) for k in known):
                    continue
                known.append(pn)
            elif any(representation(n) == code and n.get("text") == hn["text"] for n in names):
                continue  # ideographic/phonetic spellings cannot be folded: kept unless identical
            names.append(hn)
    if not fhir and not names and case.patient_name:
        names.append({"text": case.patient_name})
    if idents:
        patient["identifier"] = idents
    if names:
        patient["name"] = names
    for fld, v in base.items():
        if fld not in ("resourceType", "identifier", "name"):
            patient[fld] = v
    if "gender" not in patient:
        sex = next((c.sex for c in members if c.sex), "")
        if sex:
            patient["gender"] = sex
    if "birthDate" not in patient:
        b = next((c.birth_date for c in members if c.birth_date), "") or (case.birth_date or "")
        if re.fullmatch(r"\d{4}(-\d{2}(-\d{2})?)?", b):
            patient["birthDate"] = b
    if links:
        patient["link"] = links
    return patient
