"""manifest.json: the size and SHA-256 of every file in a package, and what it was made from.

The manifest is what makes a package *verifiable* by a recipient who trusts nothing else: each
file is listed with its exact size and SHA-256, sorted by path, so ``verify`` can name any file
that is missing, altered or extra. It also says which case, sources and tool version produced
the package. The schema lives in ``schemas/manifest.schema.json`` (package data).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from importlib.resources import files
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema

from aggregator import __version__
from aggregator.blobs import sha256_file
from aggregator.model import SourceInfo

MANIFEST = "manifest.json"
MANIFEST_SCHEMA = "package-manifest/1"
SCHEMA_FILE = "manifest.schema.json"
TOOL_NAME = "second-opinion-aggregator"


@lru_cache(maxsize=1)
def manifest_schema() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(files("schemas").joinpath(SCHEMA_FILE).read_text(encoding="utf-8"))
    return data


def schema_problems(manifest: Any) -> list[str]:
    """Human-readable schema violations of a parsed manifest (empty when valid)."""
    validator = jsonschema.Draft202012Validator(manifest_schema())
    out = []
    for err in sorted(validator.iter_errors(manifest), key=lambda e: list(e.absolute_path)):
        where = "/".join(str(p) for p in err.absolute_path) or "(root)"
        out.append(f"{where}: {err.message[:200]}")
    return out


def unsafe_relpath(rel: str) -> bool:
    """True when ``rel`` is not a plain relative path that stays inside the package.

    Rejects absolute paths, drive letters, backslashes, NUL, empty parts, ``.`` and ``..`` parts:
    a manifest or zip member naming such a path is hostile or broken, never a package file.
    """
    if not rel or "\x00" in rel or "\\" in rel or rel.startswith("/"):
        return True
    parts = PurePosixPath(rel).parts
    if rel.endswith("/") or any(p in ("", ".", "..") for p in rel.split("/")):
        return True
    return bool(parts and len(parts[0]) >= 2 and parts[0][1] == ":")


def file_entries(root: Path, relpaths: Iterable[str],
                 known: Mapping[str, tuple[str, int]] | None = None) -> list[dict[str, Any]]:
    """Size and SHA-256 of each listed file under ``root``, sorted by path.

    ``known`` gives (SHA-256, size) for files that are not under ``root`` but streamed into a
    zip straight from the content-addressed blob store (their address is their hash; the zip
    writer checks it as the bytes go by), so a 2 GB study is not read twice.
    """
    known = known or {}
    out = []
    for rel in sorted(set(relpaths)):
        if rel in known:
            digest, size = known[rel]
        else:
            digest, size = sha256_file(root / rel)
        out.append({"path": rel, "size": size, "sha256": digest})
    return out


def build_manifest(
    root: Path,
    relpaths: Iterable[str],
    *,
    case_id: str,
    created: str,
    checklist: str | None,
    sources: Sequence[SourceInfo],
    counts: dict[str, int],
    known: Mapping[str, tuple[str, int]] | None = None,
) -> dict[str, Any]:
    srcs = []
    for s in sorted(sources, key=lambda s: s.id):
        d: dict[str, Any] = {"id": s.id, "kind": s.kind, "label": s.label}
        if s.method:
            d["method"] = s.method
        d["pulled_at"] = s.pulled_at
        d["organization"] = s.organization
        srcs.append(d)
    return {
        "schema": MANIFEST_SCHEMA,
        "case": case_id,
        "created": created,
        "tool": {"name": TOOL_NAME, "version": __version__},
        "created_from": {"checklist": checklist, "sources": srcs, "record": dict(sorted(counts.items()))},
        "files": file_entries(root, relpaths, known),
    }


def dump_manifest(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
