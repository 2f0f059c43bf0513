"""Following FHIR search result pages: ``Bundle.link[next]`` exactly as given, loops refused.

Servers own their paging: the next URL may be a rewritten compartment search (Medplum turns
``$everything`` into ``Patient?_compartment=...&_offset=...``) or an opaque cursor, so the
client must not rebuild it. Two server behaviours need care:

* a ``next`` link that was already visited (a loop) - refused with :class:`ProtocolError`
  instead of looping forever;
* offset caps: Medplum answers 400 "Search offset exceeds maximum" past ``_offset`` 10000 while
  still emitting the ``next`` link that triggers it. The paginator then re-runs the failing
  search with ``_sort=_lastUpdated`` (which Medplum pages with ``_cursor``) and without
  ``_offset``, and drops every resource it already yielded, so nothing is lost or doubled.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import requests

from aggregator.errors import ProtocolError
from connectors.http import HttpClient, RequestRejected, mask_url, with_params

log = logging.getLogger(__name__)

OFFSET_CAP = re.compile(r"offset.{0,40}(exceed|maximum|too (large|high|deep))|(exceed|maximum).{0,40}offset", re.I)
#: A search that returns more pages than this is certainly a paging bug on the server.
MAX_PAGES = 100_000


@dataclass
class Page:
    """One searchset page: its bundle, the URL that produced it, and the HTTP response."""

    bundle: dict[str, Any]
    url: str
    response: requests.Response
    cursor_mode: bool = False


def next_link(bundle: dict[str, Any]) -> str | None:
    for link in bundle.get("link") or []:
        if isinstance(link, dict) and link.get("relation") == "next" and isinstance(link.get("url"), str):
            return str(link["url"])
    return None


def entry_key(entry: Any) -> str | None:
    res = entry.get("resource") if isinstance(entry, dict) else None
    if isinstance(res, dict) and res.get("resourceType") and res.get("id"):
        return f"{res['resourceType']}/{res['id']}"
    return None


def is_offset_cap(error: RequestRejected) -> bool:
    return error.status == 400 and bool(OFFSET_CAP.search(error.message))


@dataclass
class Paginator:
    """Iterate the pages of one search, starting at ``url`` (+ ``params`` for the first page)."""

    client: HttpClient
    url: str
    params: list[tuple[str, str]] | None = None
    #: keys (``Type/id``) yielded so far by this search; repeats are dropped
    seen: set[str] = field(default_factory=set)
    switched: bool = False
    pages: int = 0
    #: entries dropped because this search had already yielded them
    repeats: int = 0

    def __iter__(self) -> Iterator[Page]:
        visited: set[str] = set()
        url: str | None = self.url
        params = self.params
        while url is not None:
            if url in visited:
                raise ProtocolError("the server's next link points to a page already read (paging loop)",
                                    item=mask_url(url))
            visited.add(url)
            self.pages += 1
            if self.pages > MAX_PAGES:
                raise ProtocolError(f"more than {MAX_PAGES} pages; giving up", item=mask_url(url))
            try:
                bundle, resp = self.client.get_json(url, params=params)
            except RequestRejected as exc:
                if self.switched or not is_offset_cap(exc):
                    raise
                restart = with_params(resp_url(url, params), {"_offset": None, "_sort": "_lastUpdated"})
                log.info("offset cap at %s: switching to _sort=_lastUpdated cursor paging", mask_url(url))
                self.switched = True
                url, params = restart, None
                visited.clear()
                continue
            if bundle.get("resourceType") != "Bundle":
                raise ProtocolError("search answer is not a Bundle", item=mask_url(url))
            # Drop what this search already yielded: offset pages shift when the server's data
            # changes mid-search, and the cursor run after an offset-cap switch starts over.
            entries = []
            for e in bundle.get("entry") or []:
                k = entry_key(e)
                if k:
                    if k in self.seen:
                        self.repeats += 1
                        continue
                    self.seen.add(k)
                entries.append(e)
            bundle["entry"] = entries
            yield Page(bundle, resp.url or url, resp, self.switched)
            url, params = next_link(bundle), None


def resp_url(url: str, params: list[tuple[str, str]] | None) -> str:
    """The URL with the first-page params folded in (what the server saw)."""
    if not params:
        return url
    return with_params(url, dict(params))
