"""Semantic-cache accuracy: `python benchmarks/semantic_eval.py --data ../shared/data --report`.

The same as `cachelm eval semantic`; see cachelm.semantic.evaluate for what is measured and how.
"""

from __future__ import annotations

import sys

from cachelm.semantic.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
