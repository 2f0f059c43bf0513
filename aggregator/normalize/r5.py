"""R4 copies of resources that arrive in R5 shape.

Servers and exports increasingly send R5-shaped JSON to clients that asked for R4. Where R5
only moved or re-wrapped an element that R4 also has (a CodeableReference split back into a
CodeableConcept and a Reference, a renamed ``occurrence``/``performed``, ``actualPeriod``
back to ``period``), the information is the same, so the record keeps it instead of
quarantining the resource. Elements that R4 cannot hold are left in place: the copy then
still fails R4 validation and the resource is quarantined with its reason, never silently
trimmed. The raw R5 JSON stays in the raw store either way.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

Json = dict[str, Any]


def _split_codeable_refs(items: Any) -> tuple[list[Any], list[Any]]:
    """CodeableReference list -> (CodeableConcepts, References)."""
    concepts: list[Any] = []
    refs: list[Any] = []
    for item in items if isinstance(items, list) else [items]:
        if not isinstance(item, dict):
            continue
        if isinstance(item.get("concept"), dict):
            concepts.append(item["concept"])
        if isinstance(item.get("reference"), dict):
            refs.append(item["reference"])
    return concepts, refs


def _reason(res: Json, code_field: str = "reasonCode", ref_field: str = "reasonReference") -> None:
    if "reason" not in res:
        return
    values = res.pop("reason")
    # Encounter.reason is [{use, value: [CodeableReference]}]; elsewhere a CodeableReference list.
    flat: list[Any] = []
    for v in values if isinstance(values, list) else [values]:
        if isinstance(v, dict) and "value" in v and not ({"concept", "reference"} & set(v)):
            flat.extend(v["value"] if isinstance(v["value"], list) else [v["value"]])
        else:
            flat.append(v)
    concepts, refs = _split_codeable_refs(flat)
    if concepts:
        res[code_field] = concepts
    if refs:
        res[ref_field] = refs


def _medication(res: Json) -> None:
    med = res.get("medication")
    if isinstance(med, dict) and ({"concept", "reference"} & set(med)):
        res.pop("medication")
        if isinstance(med.get("reference"), dict):
            res["medicationReference"] = med["reference"]
        elif isinstance(med.get("concept"), dict):
            res["medicationCodeableConcept"] = med["concept"]


def _rename(res: Json, old_prefix: str, new_prefix: str) -> None:
    for key in [k for k in res if k.startswith(old_prefix)]:
        res[new_prefix + key[len(old_prefix):]] = res.pop(key)


def _first_coding(cc: Any) -> Any:
    if isinstance(cc, dict) and isinstance(cc.get("coding"), list) and cc["coding"]:
        return cc["coding"][0]
    return cc


def _medication_request(res: Json) -> None:
    _medication(res)
    _reason(res)


def _medication_statement(res: Json) -> None:
    _medication(res)
    _reason(res)
    # R5 statuses say whether the statement is recorded, not whether the drug is taken.
    status = res.get("status")
    if status == "recorded":
        res["status"] = "unknown"
    elif status == "draft":
        res["status"] = "intended"


def _procedure(res: Json) -> None:
    _rename(res, "occurrence", "performed")
    _reason(res)


def _encounter(res: Json) -> None:
    if isinstance(res.get("class"), list):
        classes = res.pop("class")
        coding = next((_first_coding(c) for c in classes if isinstance(c, dict) and c.get("coding")), None)
        if coding is not None:
            res["class"] = coding
    if "actualPeriod" in res:
        res["period"] = res.pop("actualPeriod")
    _reason(res)
    for p in res.get("participant") or []:
        if isinstance(p, dict) and "actor" in p and "individual" not in p:
            p["individual"] = p.pop("actor")
    st = res.get("serviceType")
    if isinstance(st, list):
        concepts, _ = _split_codeable_refs(st)
        res.pop("serviceType")
        if concepts:
            res["serviceType"] = concepts[0]
    for d in res.get("diagnosis") or []:
        if isinstance(d, dict) and isinstance(d.get("condition"), list):
            _, refs = _split_codeable_refs(d.pop("condition"))
            if refs:
                d["condition"] = refs[0]


def _imaging_study(res: Json) -> None:
    if isinstance(res.get("modality"), list):
        res["modality"] = [_first_coding(m) for m in res["modality"]]
    for s in res.get("series") or []:
        if isinstance(s, dict):
            if isinstance(s.get("modality"), dict):
                s["modality"] = _first_coding(s["modality"])
            body = s.get("bodySite")
            if isinstance(body, dict) and ({"concept", "reference"} & set(body)):
                s["bodySite"] = _first_coding(body.get("concept"))
    if "procedure" in res:
        concepts, refs = _split_codeable_refs(res.pop("procedure"))
        if concepts:
            res["procedureCode"] = concepts
        if refs:
            res["procedureReference"] = refs[0]
    _reason(res)


def _diagnostic_report(res: Json) -> None:
    if "study" in res:
        studies = res.pop("study")
        imaging = [r for r in studies if isinstance(r, dict) and str(r.get("reference", "")).find("ImagingStudy") >= 0]
        if imaging:
            res["imagingStudy"] = imaging
        if len(imaging) != len(studies):
            res["study"] = [r for r in studies if r not in imaging]  # stays invalid: nothing dropped


def _document_reference(res: Json) -> None:
    context = res.get("context")
    if isinstance(context, list):
        res.pop("context")
        enc: list[Any] = []
        related: list[Any] = []
        for ref in context:
            target = str(ref.get("reference") or "") if isinstance(ref, dict) else ""
            (enc if target.startswith(("Encounter/", "EpisodeOfCare/")) else related).append(ref)
        context = {k: v for k, v in (("encounter", enc), ("related", related)) if v}
        res["context"] = context
    ctx: Json = res.get("context") if isinstance(res.get("context"), dict) else {}  # type: ignore[assignment]
    if "period" in res:
        ctx["period"] = res.pop("period")
    for name in ("facilityType", "practiceSetting"):
        if name in res:
            ctx[name] = res.pop(name)
    if "event" in res:
        concepts, _ = _split_codeable_refs(res.pop("event"))
        if concepts:
            ctx["event"] = concepts
    if ctx:
        res["context"] = ctx
    for c in res.get("content") or []:
        if isinstance(c, dict) and isinstance(c.get("profile"), list) and "format" not in c:
            profiles = c.pop("profile")
            coding = next((p.get("valueCoding") for p in profiles if isinstance(p, dict) and p.get("valueCoding")),
                          None)
            if coding is not None:
                c["format"] = coding
    for rel in res.get("relatesTo") or []:
        if isinstance(rel, dict) and isinstance(rel.get("code"), dict):
            code = _first_coding(rel["code"])
            if isinstance(code, dict) and code.get("code"):
                rel["code"] = code["code"]


def _allergy(res: Json) -> None:
    t = res.get("type")
    if isinstance(t, dict):
        coding = _first_coding(t)
        if isinstance(coding, dict) and coding.get("code"):
            res["type"] = coding["code"]
    for p in res.pop("participant", None) or []:
        if not isinstance(p, dict) or not isinstance(p.get("actor"), dict):
            continue
        fn = _first_coding(p.get("function")) if p.get("function") else None
        role = fn.get("code") if isinstance(fn, dict) else None
        res.setdefault("asserter" if role == "author" and "recorder" in res else "recorder", p["actor"])


CONVERTERS: dict[str, Callable[[Json], None]] = {
    "MedicationRequest": _medication_request,
    "MedicationStatement": _medication_statement,
    "MedicationAdministration": _medication_request,
    "MedicationDispense": _medication_request,
    "Procedure": _procedure,
    "Encounter": _encounter,
    "ImagingStudy": _imaging_study,
    "DiagnosticReport": _diagnostic_report,
    "DocumentReference": _document_reference,
    "AllergyIntolerance": _allergy,
    "ServiceRequest": _reason,
    "Immunization": _reason,
}


def to_r4(obj: Json) -> Json | None:
    """An R4-shaped deep copy of ``obj``, or None when no known R5 shape applies."""
    convert = CONVERTERS.get(str(obj.get("resourceType")))
    if convert is None:
        return None
    fixed = copy.deepcopy(obj)
    convert(fixed)
    return fixed if fixed != obj else None
