"""Checklists are data: every shipped one validates; bad ones fail with the path and the problem."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from aggregator.checklist import list_checklists, load_checklist, validate_checklist_file
from aggregator.errors import ChecklistError, NotFound

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_checklists() -> None:
    assert list_checklists() == ["cardiology", "general", "oncology", "surgery"]
    for name in list_checklists():
        assert validate_checklist_file(ROOT / "schemas" / "checklists" / f"{name}.yaml") == []
        cl = load_checklist(name)
        assert cl.name == name and cl.items and cl.source == f"builtin:{name}"
        assert cl.to_dict()["items"][0]["id"] == "identity"
    ids = {i.id for i in load_checklist("general").items}
    assert {"pathology-report", "radiology-images", "lab-results", "clinical-notes", "problem-list",
            "medications"} <= ids
    assert {"breast-receptors", "lung-biomarkers", "colorectal-biomarkers", "prostate-results",
            "staging"} <= {i.id for i in load_checklist("oncology").items}


def test_unknown_name_lists_the_choices() -> None:
    with pytest.raises(NotFound) as exc:
        load_checklist("dermatology")
    assert "oncology" in str(exc.value)
    with pytest.raises(NotFound):
        load_checklist("./nope.yaml")


def _write(tmp_path: Path, data: object) -> Path:
    p = tmp_path / "custom.yaml"
    p.write_text(yaml.safe_dump(data), encoding="utf-8")
    return p


def test_custom_checklist_by_path(tmp_path: Path) -> None:
    data = yaml.safe_load((ROOT / "schemas/checklists/general.yaml").read_text())
    data["name"] = "custom"
    cl = load_checklist(str(_write(tmp_path, data)))
    assert cl.name == "custom" and cl.source.endswith("custom.yaml")


def test_errors_name_the_item_and_field(tmp_path: Path) -> None:
    data = yaml.safe_load((ROOT / "schemas/checklists/general.yaml").read_text())
    data["items"][1]["target"]["content"] = "pdf"
    data["items"][2]["subjects"]["classes_any"] = ["radiology-reprot"]
    data["items"][3]["target"]["within"] = "90 days"
    data["items"][4]["colour"] = "red"
    data["items"][5]["id"] = data["items"][6]["id"]
    errors = validate_checklist_file(_write(tmp_path, data))
    text = "\n".join(errors)
    assert "items[1] (pathology-report).target.content: 'pdf' is not one of" in text
    assert "items[3] (lab-results).target.within: '90 days' is not a duration" in text
    assert "'colour' was unexpected" in text
    # semantic errors are reported once the schema is satisfied
    data["items"][1]["target"]["content"] = "document"
    data["items"][3]["target"]["within"] = "90d"
    del data["items"][4]["colour"]
    errors = validate_checklist_file(_write(tmp_path, data))
    assert any("unknown class 'radiology-reprot'" in e and "radiology-report" in e for e in errors)
    assert any("duplicate item id" in e for e in errors)
    with pytest.raises(ChecklistError) as exc:
        load_checklist(str(_write(tmp_path, data)))
    assert "radiology-reprot" in str(exc.value)


def test_each_rule_needs_links_and_bad_yaml_is_reported(tmp_path: Path) -> None:
    data = {"name": "x", "title": "X", "items": [{"id": "a", "title": "A", "rule": "each",
                                                  "target": {"classes_any": ["note"]}}]}
    errors = validate_checklist_file(_write(tmp_path, data))
    assert any("'subjects' is a required property" in e for e in errors)
    p = tmp_path / "broken.yaml"
    p.write_text("name: [unclosed\n", encoding="utf-8")
    assert "not valid YAML" in validate_checklist_file(p)[0]
    p.write_text("- just\n- a list\n", encoding="utf-8")
    assert "mapping" in validate_checklist_file(p)[0]


def test_grace_is_a_checklist_setting_carried_by_every_window(tmp_path: Path) -> None:
    for name in list_checklists():
        cl = load_checklist(name)
        assert cl.grace_days == 7, name
        windowed = [s for i in cl.items for s in (i.subjects, i.target, *i.components) if s and s.within_days]
        assert windowed and all(s.grace_days == 7 for s in windowed), name
    data = yaml.safe_load((ROOT / "schemas/checklists/general.yaml").read_text())
    del data["grace"]
    assert load_checklist(str(_write(tmp_path, data))).grace_days == 0  # nothing after the case date
    data["grace"] = "2w"
    cl = load_checklist(str(_write(tmp_path, data)))
    assert cl.grace_days == 14 and next(i for i in cl.items if i.id == "lab-results").target.grace_days == 14
    data["grace"] = "a week"
    assert validate_checklist_file(_write(tmp_path, data)) == [
        "grace: 'a week' is not a duration: use a number and d, w, m or y, e.g. 90d"]
