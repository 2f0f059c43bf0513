"""The HTTP API (``aggregator serve``): the CLI's commands over HTTP, for navigators and consultants.

Routes call the same core functions as the CLI (:mod:`aggregator.cases`, :mod:`aggregator.pipeline`,
:mod:`aggregator.jobs.pull`, ...) and add only HTTP concerns: authentication and roles
(:mod:`.auth`), RFC 9457 problems (:mod:`.problems`), background jobs (:mod:`.jobs`) and
hardening (:mod:`.middleware`).
"""

from aggregator.api.app import create_app

__all__ = ["create_app"]
