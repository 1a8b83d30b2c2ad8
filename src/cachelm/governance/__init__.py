"""Governance: keep cached answers good over time.

- `Governance.mark_bad`: a bad answer leaves the cache with its semantic neighbours above a similarity,
  and the decision rule hears the negative outcome.
- `Governance.refresh_on_model_change`: on a new model revision, a background job recomputes the most
  valuable entries under the new key and drops the rest.
- `RequestLog`: the requests behind cached answers, which both need.

See docs/GOVERNANCE.md.
"""

from cachelm.governance.core import BadAnswerReport, Governance, Neighbour
from cachelm.governance.journal import LoggedRequest, RequestLog
from cachelm.governance.refresh import (
    EntryStats,
    Recompute,
    RefreshJob,
    RefreshPlan,
    RefreshProgress,
    default_value,
    recency_value,
)
from cachelm.governance.upstream import http_recompute

__all__ = [
    "BadAnswerReport",
    "EntryStats",
    "Governance",
    "LoggedRequest",
    "Neighbour",
    "Recompute",
    "RefreshJob",
    "RefreshPlan",
    "RefreshProgress",
    "RequestLog",
    "default_value",
    "http_recompute",
    "recency_value",
]
