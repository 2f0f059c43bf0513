"""Second-opinion checklists: declarative YAML items evaluated against the normalized record.

Public API (used by the CLI and the pipeline)::

    list_checklists() -> list[str]
    load_checklist(name_or_path) -> Checklist
    validate_checklist_file(path) -> list[str]
    evaluate(checklist, record, ledger, case, sources) -> dict   # the gap report
    render_text(report) -> str
"""

from aggregator.checklist.engine import evaluate
from aggregator.checklist.loader import Checklist, Item, list_checklists, load_checklist, validate_checklist_file
from aggregator.checklist.report import render_text

__all__ = [
    "Checklist",
    "Item",
    "evaluate",
    "list_checklists",
    "load_checklist",
    "render_text",
    "validate_checklist_file",
]
