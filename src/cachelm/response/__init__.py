"""Response caching: the exact cache, single-flight, JSONL export/import, and tool-result memoization.

The OpenAI SDK wrapper (`cachelm.response.openai_client`) and the LangChain adapter
(`cachelm.response.langchain`) are imported from their own modules, so their optional dependencies are only
needed by whoever uses them.
"""

from cachelm.response.exact import CachedResponse, ExactCache, cacheable_response
from cachelm.response.memoize import memoize
from cachelm.response.singleflight import AsyncSingleFlight, SingleFlight

__all__ = [
    "AsyncSingleFlight",
    "CachedResponse",
    "ExactCache",
    "SingleFlight",
    "cacheable_response",
    "memoize",
]
