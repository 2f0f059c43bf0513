"""Records requests: from the gap report to right-of-access letters, tracked until the records arrive.

A gap report says what is missing and who holds it; what a navigator does next is write to each
institution's records department and follow up. This package turns the open gaps into one letter
per institution (:mod:`.draft` words each line for a records clerk, :mod:`.letter` renders the
text and PDF from one template), stores them with the case, and marks lines received when a later
check no longer shows their gap, with what filled it (:mod:`.store`). The rule in force (days,
extension, follow-up points; :mod:`.rules`) and the calendar arithmetic (:mod:`.schedule`) say when
each request is due and when to follow up (:func:`due_reminders`, for ``request list --due`` and the
sync job); :mod:`.annotate` tells the gap report which gaps were asked for, when, and when they are due.
"""

from aggregator.records_requests.draft import Line, Plan, plan_requests
from aggregator.records_requests.rules import OVERDUE_DAYS_ENV, RULES_ENV, Rule, load_rules
from aggregator.records_requests.store import (
    SEND_TO_ENV,
    close,
    draft_requests,
    due_reminders,
    get_request,
    list_requests,
    mark_acknowledged,
    mark_followed_up,
    mark_received,
    mark_sent,
    track,
)

__all__ = ["OVERDUE_DAYS_ENV", "RULES_ENV", "SEND_TO_ENV", "Line", "Plan", "Rule", "close", "draft_requests",
           "due_reminders", "get_request", "list_requests", "load_rules", "mark_acknowledged", "mark_followed_up",
           "mark_received", "mark_sent", "plan_requests", "track"]
