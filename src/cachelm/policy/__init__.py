"""Eviction and admission policies. Every policy implements `Policy` (see `cachelm.policy.base`).

| policy | evicts first | per-operation cost |
|---|---|---|
| `LRUPolicy` / `FIFOPolicy` | least recently used / oldest insert | O(1) |
| `LFUPolicy` | lowest hit count, then least recent | O(1) (frequency buckets) |
| `TTLPolicy` | expired keys, then its inner policy's victims | O(1) + inner |
| `GDSFPolicy` | lowest ``L + freq × cost / size`` | O(log n) (lazy heap) |
| `S3FIFOPolicy` | one-hit wonders in the small FIFO, then the main FIFO's CLOCK | O(1) amortised |
| `AdaptiveCostPolicy` | two cost-aware experts; follows the one saving more in miniatures | O(log n) |
| `TinyLFUPolicy` | any policy behind a window LRU; refuses keys rarer per byte than victims | O(k) + inner |

k: the keys an insert evicts (one when sizes are equal); TinyLFU estimates each victim's frequency.
"""

from cachelm.policy.adaptive import AdaptiveCostPolicy
from cachelm.policy.base import Policy
from cachelm.policy.gdsf import GDSFPolicy
from cachelm.policy.lfu import LFUPolicy
from cachelm.policy.lru import FIFOPolicy, LRUPolicy
from cachelm.policy.s3fifo import S3FIFOPolicy
from cachelm.policy.sketch import FrequencySketch
from cachelm.policy.tinylfu import TinyLFUPolicy
from cachelm.policy.ttl import TTLPolicy

__all__ = [
    "AdaptiveCostPolicy",
    "FIFOPolicy",
    "FrequencySketch",
    "GDSFPolicy",
    "LFUPolicy",
    "LRUPolicy",
    "Policy",
    "S3FIFOPolicy",
    "TTLPolicy",
    "TinyLFUPolicy",
]
