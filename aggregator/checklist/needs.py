"""What one checklist's rules read of a record: which resources, and which facts of each.

Apart from the index that uses it because it is decided from the checklist alone, once, before
any resource is read; the index then asks it per (resource type, classes) pair.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from aggregator.checklist.loader import Item, Selector

#: where a resource names its encounter (the ``encounter`` link compares these)
ENCOUNTER_PATHS = ("encounter", "context.encounter", "context")


@dataclass(frozen=True)
class Plan:
    """Which facts of a resource to keep (the union over every selector that matches it)."""

    keep: bool = False
    document: bool = False
    images: bool = False
    display: bool = False
    paths: frozenset[str] = frozenset()
    identifiers: bool = False
    window: int | None = None
    """Days: every rule that matches the resource needs it only while it is at most this old
    (windowed presence candidates and subjects); None: needed whatever its date."""
    stale_for: tuple[Selector, ...] = ()
    """The presence selectors among those rules: a gap there cites the newest stale candidate's date."""

    def __or__(self, other: Plan) -> Plan:
        return Plan(self.keep or other.keep, self.document or other.document, self.images or other.images,
                     self.display or other.display, self.paths | other.paths,
                     self.identifiers or other.identifiers)


_NOTHING = Plan()


class Needs:
    """What one checklist's rules read of the record: which resources, and which facts of each.

    Why: the rules only ever look at resources that a selector (applies_if, subjects, target,
    components, summaries) matches by type and class, and at a handful of their fields. Deciding
    that once per (resource type, classes) pair lets the index drop everything else while it
    streams the record: billing resources, vital signs no item asks for, and the bulk of every
    kept resource.
    """

    def __init__(self, items: Iterable[Item]) -> None:
        self._rules: list[tuple[Selector, Plan, int | None, bool]] = []
        """(selector, facts, window in days or None, is a presence candidate)"""
        for item in items:
            self._add_item(item)
        self._cache: dict[tuple[str, frozenset[str]], Plan] = {}

    def _add_item(self, item: Item) -> None:
        if item.applies_if is not None:
            self._rules.append((item.applies_if, Plan(keep=True), None, False))
        for comp in item.components:  # components are only ever read by the presence rule
            self._rules.append((comp, _content_plan(comp), comp.within_days, True))
        if item.target is not None:
            target = _content_plan(item.target)
            if item.rule == "each" and item.subjects is not None:
                s_paths: set[str] = set()
                t_paths: set[str] = set()
                idents = False
                for lk in item.links:
                    if lk.via == "reference":
                        (t_paths if lk.from_ == "target" else s_paths).add(lk.path)
                    elif lk.via == "shared-reference":
                        s_paths.add(lk.path)
                        t_paths.add(lk.path)
                    elif lk.via == "encounter":
                        s_paths.update(ENCOUNTER_PATHS)
                        t_paths.update(ENCOUNTER_PATHS)
                    elif lk.via == "shared-identifier":
                        idents = True
                # each() only looks at fresh subjects, but at every target (and at their dates)
                self._rules.append((item.subjects, Plan(keep=True, display=True, paths=frozenset(s_paths),
                                                         identifiers=idents), item.subjects.within_days, False))
                target = target | Plan(keep=True, paths=frozenset(t_paths), identifiers=idents)
                self._rules.append((item.target, target, None, False))
            else:
                self._rules.append((item.target, target, item.target.within_days, item.rule == "presence"))
        if item.summaries:
            self._rules.append((Selector(classes_any=item.summaries), Plan(keep=True), None, False))

    def plan(self, rtype: str, classes: frozenset[str]) -> Plan:
        """The facts to keep of a resource of this type and classes (nothing: do not keep it)."""
        key = (rtype, classes)
        got = self._cache.get(key)
        if got is None:
            got = _NOTHING
            windows: list[int] = []
            unbounded = False
            stale_for: list[Selector] = []
            for sel, plan, window, presence in self._rules:
                if sel.matches(rtype, classes):
                    got = got | plan
                    if window is None:
                        unbounded = True
                    else:
                        windows.append(window)
                        if presence:
                            stale_for.append(sel)
            if got.keep and windows and not unbounded:
                got = replace(got, window=max(windows), stale_for=tuple(stale_for))
            self._cache[key] = got
        return got


def _content_plan(sel: Selector) -> Plan:
    return Plan(keep=True, document=sel.content not in ("any", "images"), images=sel.content == "images")
