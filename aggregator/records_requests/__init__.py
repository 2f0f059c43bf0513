"""Records requests: from the gap report to right-of-access letters, tracked until the records arrive.

A gap report says what is missing and who holds it; what a navigator does next is write to each
institution's records department and follow up. This package turns the open gaps into one letter
per institution (:mod:`.draft` words each line for a records clerk, :mod:`.letter` renders the
text and PDF from one template), stores them with the case, and marks lines received when a later
check no longer shows their gap (:mod:`.store`).
"""

from aggregator.records_requests.draft import Line, Plan, plan_requests
from aggregator.records_requests.store import (
    OVERDUE_DAYS_ENV,
    SEND_TO_ENV,
    draft_requests,
    get_request,
    list_requests,
    mark_sent,
    track,
)

__all__ = ["OVERDUE_DAYS_ENV", "SEND_TO_ENV", "Line", "Plan", "draft_requests", "get_request", "list_requests",
           "mark_sent", "plan_requests", "track"]
