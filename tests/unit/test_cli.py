"""The `cachelm` command: stats, purge, export, import, pass-through commands, and its error contract."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cachelm import cli
from cachelm.crypto import Keyring
from cachelm.response.exact import ExactCache
from cachelm.store.encrypted import EncryptedStore
from cachelm.store.redis import RedisStore
from cachelm.store.sqlite import SQLiteStore
from tests.at_rest import raw_bytes


def chat(text: str, model: str = "gpt-4o-mini") -> dict[str, Any]:
    return {"model": model, "temperature": 0, "messages": [{"role": "user", "content": text}]}


def answer(text: str) -> dict[str, Any]:
    message = {"role": "assistant", "content": f"re: {text}"}
    return {
        "object": "chat.completion",
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
    }


SPEC = [  # name, tenant, user, tags, model, age in seconds
    ("a1", "acme", "ann", ["faq"], "gpt-4o-mini", 10 * 86400),
    ("a2", "acme", "bob", ["faq", "billing"], "gpt-4o", 3 * 86400),
    ("g1", "globex", "ann", ["faq"], "gpt-4o-mini", 600),
    ("d1", "default", "", [], "gpt-4o", 30),
]


@pytest.fixture
def db(tmp_path: Path) -> str:
    """A SQLite store with four entries of known metadata; returns its URL."""
    path = tmp_path / "cache.db"
    with SQLiteStore(path) as store:
        cache = ExactCache(store)
        now = time.time()
        for name, tenant, user, tags, model, age in SPEC:
            req = chat(name, model)
            record = cache.make_record(
                cache.key_for(req, tenant=tenant), req, answer(name), tenant=tenant, user=user, tags=tags,
                created=now - age,
            )  # fmt: skip
            store.put(record)
    return f"sqlite:///{path}"


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def names_left(url: str) -> set[str]:
    with SQLiteStore(url[len("sqlite://") :]) as store:
        contents = {json.loads(r.value)["choices"][0]["message"]["content"] for r in store.scan()}
    return {c.removeprefix("re: ") for c in contents}


def test_stats_table_and_json(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["stats", "--store", db, "--json"], capsys)
    assert code == 0
    report = json.loads(out)
    assert report["entries"] == 4
    assert report["tenants"]["acme"]["entries"] == 2
    assert report["models"]["gpt-4o"]["entries"] == 2
    assert report["tags"]["faq"]["entries"] == 3
    assert report["bytes"] == sum(row["bytes"] for row in report["tenants"].values()) > 0
    assert report["oldest_age_s"] == pytest.approx(10 * 86400, abs=60)
    code, out, _ = run(["stats", "--store", db], capsys)
    assert code == 0 and "entries  4" in out and "acme" in out and "globex" in out


@pytest.mark.parametrize(
    ("filters", "left"),
    [
        (["--tenant", "acme"], {"g1", "d1"}),
        (["--user", "ann"], {"a2", "d1"}),
        (["--tag", "faq", "--tenant", "acme"], {"g1", "d1"}),
        (["--model", "gpt-4o"], {"a1", "g1"}),
        (["--older-than", "2d"], {"g1", "d1"}),
        (["--older-than", "300"], {"d1"}),  # d1 is 30 s old: minutes of slack on a loaded machine
        (["--all"], set()),
    ],
)
def test_purge(db: str, capsys: pytest.CaptureFixture[str], filters: list[str], left: set[str]) -> None:
    code, out, _ = run(["purge", "--store", db, *filters], capsys)
    assert code == 0
    assert out == f"purged {4 - len(left)} entries\n"
    assert names_left(db) == left


def test_purge_refuses_to_run_without_a_filter(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["purge", "--store", db], capsys)
    assert code == 2 and err.startswith("cachelm: error: purge needs a filter") and err.count("\n") == 1
    code, _, err = run(["purge", "--store", db, "--all", "--tenant", "acme"], capsys)
    assert code == 2 and "--all cannot be combined" in err
    assert len(names_left(db)) == 4


def test_durations() -> None:
    assert cli.parse_duration("90") == 90
    assert cli.parse_duration("15m") == 900
    assert cli.parse_duration("1.5h") == 5400
    assert cli.parse_duration("7d") == 7 * 86400
    with pytest.raises(Exception, match="`--older-than`"):
        cli.parse_duration("yesterday")


def test_bad_duration_is_a_usage_error(db: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cachelm.cli", "purge", "--store", db, "--older-than", "soon"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2 and "--older-than" in result.stderr


def test_export_then_import_into_another_store(
    db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dump = tmp_path / "dump.jsonl"
    code, _, err = run(["export", "--store", db, "--out", str(dump)], capsys)
    assert code == 0 and "exported 4 entries" in err
    assert len(dump.read_text().splitlines()) == 4
    target = f"sqlite:///{tmp_path / 'copy.db'}"
    code, out, _ = run(["import", "--store", target, str(dump)], capsys)
    assert (code, out) == (0, "imported 4 entries\n")
    assert names_left(target) == {"a1", "a2", "g1", "d1"}
    with SQLiteStore(tmp_path / "copy.db") as store:
        hit = ExactCache(store).lookup(chat("g1"), tenant="globex")
    assert hit is not None and hit.response == answer("g1")


def test_export_to_stdout_with_a_filter(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["export", "--store", db, "--tenant", "acme", "--tag", "billing"], capsys)
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert [(x["tenant"], x["user"]) for x in lines] == [("acme", "bob")]


def test_import_seed_lines_uses_the_server_key_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CACHELM_KEY_SECRET", "s3cret")
    seed = tmp_path / "seed.jsonl"
    seed.write_text(
        json.dumps({"request": chat("hours?"), "response": answer("hours?"), "tags": ["faq"]}) + "\n"
    )
    url = f"sqlite:///{tmp_path / 'seeded.db'}"
    assert run(["import", "--store", url, str(seed)], capsys)[0] == 0
    with SQLiteStore(tmp_path / "seeded.db") as store:
        assert ExactCache(store, key_secret=b"s3cret").lookup(chat("hours?")) is not None
        assert ExactCache(store).lookup(chat("hours?")) is None  # keys depend on the secret


def test_a_malformed_jsonl_line_is_reported_with_its_number(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"request": chat("x"), "response": answer("x")})
    bad.write_text(f"{good}\n{good}\n{{oops\n")
    url = f"sqlite:///{tmp_path / 'target.db'}"
    code, _, err = run(["import", "--store", url, str(bad)], capsys)
    assert code == 2
    assert err.startswith("cachelm: error: line 3: not valid JSON") and err.count("\n") == 1
    assert "nothing was imported" in err
    with SQLiteStore(tmp_path / "target.db") as store:
        assert len(store) == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["stats", "--store", "bogus://x"], "unknown scheme 'bogus'"),
        (["stats", "--store", "not a url"], "`url` must look like scheme://"),
        (["import", "--store", "{store}", "/no/such/file.jsonl"], "cannot read '/no/such/file.jsonl'"),
        (["export", "--store", "{store}", "--out", "/no/such/dir/x.jsonl"], "cannot write"),
    ],
)
def test_bad_input_is_one_line_and_exit_status_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    SQLiteStore(tmp_path / "s.db").close()  # a store that exists: the error must be the file's
    code, _, err = run([a.format(store=f"sqlite:///{tmp_path}/s.db") for a in argv], capsys)
    assert code == 2
    assert message in err and err.startswith("cachelm: error: ") and err.count("\n") == 1


def test_an_unreadable_binary_file_is_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    binary = tmp_path / "dump.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    code, _, err = run(["import", "--store", f"sqlite:///{tmp_path}/s.db", str(binary)], capsys)
    assert code == 2 and "not UTF-8" in err


def test_a_dead_store_is_exit_status_1(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code, _, err = run(["stats", "--store", f"redis://127.0.0.1:{port}/0?socket_connect_timeout=0.2"], capsys)
    assert code == 1 and err.startswith("cachelm: store error:")


def test_redis_store_by_url(redis_url: str, namespace: str, capsys: pytest.CaptureFixture[str]) -> None:
    store = RedisStore.from_url(redis_url, namespace=namespace)
    try:
        ExactCache(store).store(chat("r"), answer("r"), tenant="acme")
        sep = "&" if "?" in redis_url else "?"
        url = f"{redis_url}{sep}namespace={namespace}"
        code, out, _ = run(["stats", "--store", url, "--json"], capsys)
        assert code == 0 and json.loads(out)["tenants"] == {
            "acme": {"entries": 1, "bytes": json.loads(out)["bytes"], "hits": 0}
        }
        assert run(["purge", "--store", url, "--tenant", "acme"], capsys)[1] == "purged 1 entries\n"
    finally:
        store.clear()
        store.close()


def test_store_from_environment_and_default_location(
    tmp_path: Path, db: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CACHELM_STORE", db)
    code, out, _ = run(["stats", "--json"], capsys)
    assert code == 0 and json.loads(out)["entries"] == 4
    monkeypatch.delenv("CACHELM_STORE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    code, out, _ = run(["stats", "--json"], capsys)
    assert code == 0 and json.loads(out)["entries"] == 0
    assert (tmp_path / "xdg" / "cachelm" / "responses.db").exists()


def test_passthrough_runs_the_other_layers_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["models", "--cache-dir", str(tmp_path), "list"], capsys)
    assert code == 0 and "not pulled" in out


def test_passthrough_with_a_missing_extra_names_it(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A module that is not installed stands for an extra that is not installed.
    monkeypatch.setitem(cli.PASSTHROUGH, "serve", ("absent_dep_for_tests", "main", "server", ""))
    code, _, err = run(["serve", "--port", "1"], capsys)
    assert code == 2 and "pip install 'cachelm[server]'" in err and err.count("\n") == 1
    monkeypatch.setitem(cli.PASSTHROUGH, "c2c", ("cachelm.no_such_module", "main", "engine", ""))
    code, _, err = run(["c2c"], capsys)
    assert code == 2 and "`cachelm c2c` is not available" in err


def test_bench_lists_scripts(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["bench"], capsys)
    assert code == 0
    scripts = sorted(p.name for p in (Path(cli.__file__).parents[2] / "benchmarks").glob("[!_]*.py"))
    for name in scripts:
        assert name in out


def test_console_entry_point(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cachelm.cli", "stats", "--store", "bogus://"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith("cachelm: error:") and result.stderr.count("\n") == 1


def test_the_demo_runs_offline_and_passes_its_own_checks(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cachelm.demo", "--keep", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all checks passed" in result.stdout and "FAIL" not in result.stdout
    assert (tmp_path / "cache.db").exists() and (tmp_path / "export.jsonl").exists()


def test_the_server_keyring_seals_imports_and_opens_exports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    key = base64.b64encode(b"k" * 32).decode()
    monkeypatch.setenv("CACHELM_KEYRING", f"k1:{key}")
    seed = tmp_path / "seed.jsonl"
    seed.write_text(json.dumps({"request": chat("secret?"), "response": answer("secret?")}) + "\n")
    url = f"sqlite:///{tmp_path / 'sealed.db'}"
    assert run(["import", "--store", url, str(seed)], capsys)[0] == 0
    on_disk = b"".join(p.read_bytes() for p in tmp_path.glob("sealed.db*"))  # the file and its WAL
    assert b"secret?" not in on_disk  # sealed at rest (keys are digests, answers are encrypted)
    monkeypatch.delenv("CACHELM_KEYRING")
    assert run(["import", "--store", f"sqlite:///{tmp_path / 'clear.db'}", str(seed)], capsys)[0] == 0
    assert b"secret?" in b"".join(p.read_bytes() for p in tmp_path.glob("clear.db*"))  # the check can fail
    monkeypatch.setenv("CACHELM_KEYRING", f"k1:{key}")
    code, out, _ = run(["export", "--store", url], capsys)
    assert code == 0 and json.loads(out)["response"] == answer("secret?")
    with EncryptedStore(SQLiteStore(tmp_path / "sealed.db"), Keyring.parse(f"k1:{key}")) as store:
        assert ExactCache(store).lookup(chat("secret?")) is not None  # what the server would serve
    monkeypatch.setenv("CACHELM_KEYRING", "k1:not-base64!")
    code, _, err = run(["stats", "--store", url], capsys)
    assert code == 2 and "not valid base64" in err


# -- governance: feedback bad, refresh ---------------------------------------------------------------
GOV_TEXTS = [  # the bad question first; paraphrases and unrelated questions in the same context
    "What is the capital of France?",
    "what is the capital of france",
    "What is the capital city of France?",
    "What is the population of France?",
    "How do I bake sourdough bread?",
]


def _governed(path: Path, tenant: str = "acme", user: str = "") -> dict[str, str]:
    """A SQLite store with GOV_TEXTS answered, logged and indexed in the persisted HNSW index beside it
    (as `cachelm serve --semantic --semantic-embedder hashing` keeps it); returns text → response key."""
    from cachelm.governance import Governance
    from cachelm.semantic import EmbeddingCache, HashingEmbedder, HNSWIndex, SemanticCache

    keys = {}
    with SQLiteStore(path) as store:
        embedder = HashingEmbedder()
        index = HNSWIndex(embedder.dim, path=path)
        semantic = SemanticCache(embedder=EmbeddingCache(store, embedder), index=index)
        gov = Governance(ExactCache(store), semantic=semantic)
        for text in GOV_TEXTS:
            key = gov.store(chat(text), answer(text), tenant=tenant, user=user)
            assert key is not None
            keys[text] = key
        semantic.close()
    return keys


def _index_size(path: Path) -> int:
    from cachelm.semantic import HNSWIndex

    index = HNSWIndex(256, path=path)
    try:
        return len(index)
    finally:
        index.close()


def test_purge_takes_the_purged_answers_vectors_out_of_the_index(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cachelm.semantic import HashingEmbedder

    path = tmp_path / "cache.db"
    alice = _governed(path, user="alice")  # one user's questions in one tenant ...
    _governed(path, tenant="other", user="bob")  # ... the same questions in another tenant
    base = ["purge", "--store", f"sqlite:///{path}", "--embedder", "hashing"]
    needles = [np.asarray(v, dtype="<f4").tobytes() for v in HashingEmbedder().embed(GOV_TEXTS)]
    assert all(n in raw_bytes(tmp_path) for n in needles)  # the scan below can fail

    code, out, _ = run([*base, "--tenant", "acme", "--user", "alice"], capsys)
    # each answer with its logged request and its question's cached embedding; each answer's vector
    assert code == 0 and out == f"purged {3 * len(alice)} entries and {len(alice)} semantic-index vectors\n"
    assert _index_size(path) == len(GOV_TEXTS)  # the other tenant's stay
    code, out, _ = run([*base, "--tenant", "other"], capsys)
    assert code == 0 and out.endswith(f"and {len(GOV_TEXTS)} semantic-index vectors\n")
    assert _index_size(path) == 0
    # no vector left in the store's or the index's files
    assert not any(n in raw_bytes(tmp_path) for n in needles)
    _governed(path)
    code, out, _ = run([*base, "--all"], capsys)
    assert code == 0 and out.endswith(f"and {len(GOV_TEXTS)} semantic-index vectors\n")
    assert _index_size(path) == 0


def test_purge_with_the_index_held_deletes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cachelm.semantic import HNSWIndex

    path = tmp_path / "cache.db"
    keys = _governed(path, user="alice")
    argv = ["purge", "--store", f"sqlite:///{path}", "--embedder", "hashing", "--user", "alice"]
    held = HNSWIndex(256, path=path)  # the running proxy's index: erase through its /admin/erase
    try:
        code, _, err = run(argv, capsys)
        assert code == 1 and "open in another process" in err
        with SQLiteStore(path) as store:
            assert store.peek(keys[GOV_TEXTS[0]]) is not None
    finally:
        held.close()


def test_feedback_bad_removes_the_answer_and_its_neighbours(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cachelm.semantic import HashingEmbedder

    path = tmp_path / "cache.db"
    keys = _governed(path)
    vectors = HashingEmbedder().embed(GOV_TEXTS)
    sims = {t: float(vectors[0] @ v) for t, v in zip(GOV_TEXTS, vectors, strict=True)}
    above = {t for t, s in sims.items() if s >= 0.8}
    assert 2 <= len(above) <= len(GOV_TEXTS) - 2  # the data straddles the bar
    argv = ["feedback", "bad", "--store", f"sqlite:///{path}", "--embedder", "hashing"]
    argv += ["--key", keys[GOV_TEXTS[0]], "--tenant", "acme", "--similarity", "0.8", "--json"]

    code, out, _ = run(argv, capsys)

    assert code == 0
    report = json.loads(out)
    assert set(report["response_keys"]) == {keys[t] for t in above} and report["neighbours_searched"]
    with SQLiteStore(path) as store:
        for text in GOV_TEXTS:
            assert (store.peek(keys[text]) is None) == (text in above), text
    assert _index_size(path) == len(GOV_TEXTS) - len(above)  # the removal reached the persisted index
    code, out, _ = run(argv[:-1], capsys)  # again, as text: nothing left to remove
    assert code == 0 and out.startswith("removed 0 answers") and "no answer of tenant acme" in out


def test_feedback_with_the_index_held_by_a_running_proxy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cachelm.semantic import HNSWIndex

    path = tmp_path / "cache.db"
    keys = _governed(path)
    argv = ["feedback", "bad", "--store", f"sqlite:///{path}", "--embedder", "hashing"]
    argv += ["--key", keys[GOV_TEXTS[0]], "--tenant", "acme"]
    held = HNSWIndex(256, path=path)  # the proxy's open index: one owner at a time
    try:
        code, _, err = run(argv, capsys)
        assert code == 1 and "open in another process" in err and err.count("\n") == 1
        with SQLiteStore(path) as store:
            assert store.peek(keys[GOV_TEXTS[0]]) is not None  # nothing was removed
        code, out, _ = run([*argv, "--no-semantic"], capsys)
        assert code == 0 and out.startswith("removed 1 answer and 0 semantic entries")
        with SQLiteStore(path) as store:
            assert store.peek(keys[GOV_TEXTS[0]]) is None and store.peek(keys[GOV_TEXTS[1]]) is not None
    finally:
        held.close()


def test_refresh_recomputes_through_a_real_upstream(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import dataclasses

    import httpx

    from cachelm.governance import Governance
    from tests.upstream import OpenAIUpstream

    path = tmp_path / "cache.db"
    hits = {"q one": 100, "q two": 50, "q three": 20, "q four": 5, "q five": 0}
    with SQLiteStore(path) as store:
        gov = Governance(ExactCache(store))
        for text, count in hits.items():
            key = gov.store(chat(text), answer(text), tenant="acme")
            assert key is not None
            record = store.peek(key)
            assert record is not None
            store.put(dataclasses.replace(record, hits=count))
    with OpenAIUpstream() as base_url:
        argv = ["refresh", "--store", f"sqlite:///{path}", "--model", "gpt-4o-mini", "--revision", "r2"]
        argv += ["--upstream", base_url, "--budget", "3", "--json"]
        httpx.post(base_url.replace("/v1", "/_control/fault"), json={"fault": "status=503", "times": 1})
        code, out, err = run(argv, capsys)
        expected = {t: httpx.post(f"{base_url}/chat/completions", json=chat(t)).json() for t in hits}
    final = json.loads(out)
    assert code == 1  # one entry failed: scripts notice
    assert (final["refreshed"], final["failed"], final["dropped"], final["state"]) == (2, 1, 2, "done")
    assert "3 of 5 old entries" in err
    with SQLiteStore(path) as store:
        reader = ExactCache(store, model_revisions={"gpt-4o-mini": "r2"})
        found = {t: reader.lookup(chat(t), tenant="acme") for t in hits}
        assert len(store) == 2 * 2  # two refreshed answers and their logged requests, nothing else
    # The most valuable entry's call met the 503: nothing cached; the next two hold the upstream's answer.
    assert found["q one"] is None and found["q four"] is None and found["q five"] is None
    for text in ("q two", "q three"):
        hit = found[text]
        assert hit is not None and hit.response == expected[text]


def test_refresh_bad_input_changes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "cache.db"
    keys = _governed(path)
    base = ["refresh", "--store", f"sqlite:///{path}", "--model", "gpt-4o-mini", "--revision", "r2"]
    code, _, err = run([*base, "--upstream", "ftp://nowhere", "--budget", "1", "--no-semantic"], capsys)
    assert code == 2 and "`base_url`" in err
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*base, "--upstream", "http://127.0.0.1:9/v1", "--budget", "-1"])
    assert exit_info.value.code == 2 and "`--budget` must be a whole number >= 0" in capsys.readouterr().err
    with SQLiteStore(path) as store:
        assert all(store.peek(k) is not None for k in keys.values())
