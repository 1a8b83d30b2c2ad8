"""Trace-driven cache simulation: chat-derived and synthetic traces replayed through the real policies."""

from cachelm.sim.chat import (
    PrefillModel,
    chat_kv_trace,
    chat_response_trace,
    load_conversations,
    qqp_trace,
)
from cachelm.sim.simulator import SimClock, SimResult, compare, simulate
from cachelm.sim.synthetic import Pricing, scan_trace, shifting_trace, zipf_trace
from cachelm.sim.trace import Request, Trace

__all__ = [
    "PrefillModel",
    "Pricing",
    "Request",
    "SimClock",
    "SimResult",
    "Trace",
    "chat_kv_trace",
    "chat_response_trace",
    "compare",
    "load_conversations",
    "qqp_trace",
    "scan_trace",
    "shifting_trace",
    "simulate",
    "zipf_trace",
]
