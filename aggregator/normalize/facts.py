"""The compact facts of one resource that normalization's global steps need.

Why: a record of hundreds of thousands of resources must not be held as dicts. The worker that
validates a resource also extracts these facts (its status, identifiers, de-duplication keys,
what a report carries, its reference strings), so the parent never parses the body: it writes
the facts to the scratch database (:mod:`aggregator.normalize.scratch`) and spools the body to
disk; steps that need more read the body back.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from aggregator.normalize.dicom import study_uid_of
from aggregator.normalize.uids import identifier_uid


@dataclass(slots=True)
class Facts:
    """What the global steps need to know of a resource without reading its body."""

    rtype: str
    rid: str
    status: str = ""
    doc_status: str = ""
    updated: float = 0.0
    version: int = 0
    carries: frozenset[str] = frozenset()
    #: ``(system, value)`` of each identifier (reference lookup by conditional references)
    idents: tuple[tuple[str, str], ...] = ()
    #: de-duplication keys of the business-identifier rule
    ident_keys: tuple[str, ...] = ()
    #: de-duplication key of the observation-value rule (a digest), or None
    obs_key: bytes | None = None
    study_uid: str = ""
    #: reference strings of the top-level ``subject`` and ``patient`` (identity counts and
    #: "another patient" decisions)
    patient_refs: tuple[str, ...] | None = None
    #: every reference string of the body, in :func:`reference_nodes` order (resolved in the
    #: scratch database once every resource is loaded)
    refs: tuple[str, ...] | None = None
    #: digest of the body without id, meta, text and the values of its references: the
    #: content-hash rule adds the references' resolved targets to it (see dedup.content_key)
    cbase: bytes = b""


PATIENT_FIELDS = ("subject", "patient")


def digest(text: str) -> bytes:
    """A 128-bit digest standing for a long match key (keys are only compared for equality)."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def codes(cc: Any) -> tuple[str, ...]:
    if not isinstance(cc, dict):
        return ()
    return tuple(sorted(f"{c.get('system') or ''}|{c.get('code') or ''}" for c in cc.get("coding") or []
                        if isinstance(c, dict) and c.get("code"))) or ((str(cc.get("text")),) if cc.get("text")
                                                                        else ())


def value_key(data: dict[str, Any]) -> str | None:
    for k, v in data.items():
        if not k.startswith("value"):
            continue
        if k == "valueQuantity" and isinstance(v, dict):
            return f"Q|{v.get('value')}|{v.get('code') or v.get('unit') or ''}"
        if k == "valueCodeableConcept":
            return "C|" + ",".join(codes(v))
        return f"{k}|{orjson.dumps(v, option=orjson.OPT_SORT_KEYS).decode()}"
    return None


def observation_key(d: dict[str, Any]) -> str | None:
    """Same code, effective time, value and unit (with components): the observation-value rule."""
    code = codes(d.get("code"))
    eff = d.get("effectiveDateTime") or d.get("effectiveInstant") or (
        (d.get("effectivePeriod") or {}).get("start") if isinstance(d.get("effectivePeriod"), dict) else None)
    value = value_key(d)
    comps = [f"{','.join(codes(c.get('code')))}={value_key(c)}" for c in d.get("component") or []
             if isinstance(c, dict)]
    if not code or not eff or (value is None and not comps):
        return None
    return f"Observation|{','.join(code)}|{eff}|{value}|{';'.join(sorted(comps))}"


def identifier_keys(rtype: str, d: dict[str, Any]) -> tuple[str, ...]:
    code = "|".join(codes(d.get("code")))
    idents = d.get("identifier")
    if isinstance(idents, dict):
        idents = [idents]
    out = []
    for i in idents if isinstance(idents, list) else []:
        if isinstance(i, dict) and i.get("system") and i.get("value"):
            if rtype == "ImagingStudy" and identifier_uid(i):
                continue  # the StudyInstanceUID, however spelled: handled by study-instance-uid with merging
            out.append(f"{rtype}|{i['system']}|{i['value']}|{code}")
    return tuple(out)


def carries(res: dict[str, Any]) -> frozenset[str]:
    """What a report holds beyond metadata: ``text`` (attachments, narrative sections), ``results``."""
    out = set()
    atts = list(res.get("presentedForm") or []) + [c.get("attachment") for c in res.get("content") or []
                                                    if isinstance(c, dict)]
    if any(isinstance(a, dict) and (a.get("data") or a.get("url")) for a in atts):
        out.add("text")
    if res.get("section"):
        out.add("text")
    if res.get("result"):
        out.add("results")
    if res.get("conclusion"):
        out.add("conclusion")
    return frozenset(out)


def instant(value: Any) -> float:
    if not isinstance(value, str) or not value:
        return 0.0
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return 0.0
    # a time without a zone is read as UTC, not in the machine's TZ: the same data must give
    # the same order and the same record times on every machine
    return (dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)).timestamp()


def version(value: Any) -> int:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return 0


def reference_nodes(node: Any, out: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every Reference object under ``node`` (a dict with a string ``reference``), in document
    order. The one walk that defines reference positions: facts, caches and rewriting agree."""
    if isinstance(node, dict):
        if isinstance(node.get("reference"), str):
            out.append(node)
        for v in node.values():
            if isinstance(v, dict | list):
                reference_nodes(v, out)
    elif isinstance(node, list):
        for v in node:
            if isinstance(v, dict | list):
                reference_nodes(v, out)
    return out


def content_base(d: dict[str, Any], nodes: list[dict[str, Any]]) -> bytes:
    """Digest of ``d`` without id, meta and text, with every reference value blanked.

    Computed where the body is parsed anyway (a validation worker), so de-duplication never has
    to read a body back to compare contents: it hashes this digest with the references' targets.
    """
    originals = [n["reference"] for n in nodes]
    for n in nodes:
        n["reference"] = ""
    try:
        body = {k: v for k, v in d.items() if k not in ("id", "meta", "text")}
        return hashlib.blake2b(orjson.dumps(body, option=orjson.OPT_SORT_KEYS), digest_size=16).digest()
    finally:
        for n, ref in zip(nodes, originals, strict=True):
            n["reference"] = ref


def facts_of(d: dict[str, Any]) -> Facts:
    """The facts of one valid resource (``d`` is the JSON that goes to the bundle)."""
    rtype = str(d["resourceType"])
    rid = d.get("id")
    meta = d.get("meta")
    idents = d.get("identifier")
    pairs = tuple((str(i.get("system") or ""), str(i["value"])) for i in idents
                  if isinstance(i, dict) and i.get("value")) if isinstance(idents, list) else ()
    obs = observation_key(d) if rtype == "Observation" else None
    nodes = reference_nodes(d, [])
    prefs = tuple(ref["reference"] for fld in PATIENT_FIELDS
                  if isinstance(ref := d.get(fld), dict) and isinstance(ref.get("reference"), str))
    return Facts(
        rtype, str(rid) if rid else "",
        status=str(d.get("status") or ""), doc_status=str(d.get("docStatus") or ""),
        updated=instant(meta.get("lastUpdated")) if isinstance(meta, dict) else 0.0,
        version=version(meta.get("versionId")) if isinstance(meta, dict) else 0,
        carries=carries(d), idents=pairs, ident_keys=identifier_keys(rtype, d),
        obs_key=digest(obs) if obs is not None else None,
        study_uid=study_uid_of(d) if rtype == "ImagingStudy" else "",
        patient_refs=prefs,
        refs=tuple(n["reference"] for n in nodes), cbase=content_base(d, nodes),
    )
