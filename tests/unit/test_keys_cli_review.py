"""Review tests: cache keys (``extra_body``, int subclasses, tenant text), the `cachelm` command's error
contract (a missing store, a closed pipe, Ctrl-C, ``--all`` by abbreviation), the demo, metrics, the clock.

The command runs as users run it: the installed ``cachelm`` entry point in a subprocess, on real SQLite files.
"""

from __future__ import annotations

import enum
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from cachelm import cli, metrics
from cachelm.clock import ManualClock
from cachelm.errors import ConfigError
from cachelm.keys import request_key, semantic_query, tenant_salt
from cachelm.metrics import CacheMetrics
from cachelm.response.exact import ExactCache
from cachelm.store.memory import MemoryStore
from cachelm.store.sqlite import SQLiteStore

CACHELM = str(Path(sys.executable).with_name("cachelm"))
SALT = tenant_salt("acme")


def chat(text: str, **params: Any) -> dict[str, Any]:
    return {"model": "m", "temperature": 0, "messages": [{"role": "user", "content": text}], **params}


def answer(text: str) -> dict[str, Any]:
    message = {"role": "assistant", "content": text}
    return {
        "object": "chat.completion",
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
    }


def key(request: dict[str, Any]) -> str:
    return request_key(request, tenant_salt=SALT)


# -- keys ------------------------------------------------------------------------------------------------


def test_extra_body_parameters_change_the_answer_and_so_the_key() -> None:
    # SDK keyword arguments as a library caller passes them: the SDK sends extra_body's fields in the body,
    # where they change the answer (vLLM's top_k, guided_choice…). They were ignored: a wrong answer served.
    cache = ExactCache(MemoryStore())
    base = chat("pick a colour")
    greedy, hit = cache.get_or_compute({**base, "extra_body": {"top_k": 1}}, lambda: answer("red"))
    assert (greedy, hit) == (answer("red"), False)
    guided = {**base, "extra_body": {"guided_choice": ["blue", "green"]}}
    got, hit = cache.get_or_compute(guided, lambda: answer("blue"))
    assert (got, hit) == (answer("blue"), False)
    assert semantic_query(guided, tenant_salt=SALT) != semantic_query(base, tenant_salt=SALT)
    # An empty extra_body sends nothing: it keys as no extra_body at all.
    assert key({**base, "extra_body": {}}) == key({**base, "extra_body": None}) == key(base)


class Seed(enum.IntEnum):
    BIG = 2**53 + 1
    HUGE = 10**400


def test_an_int_subclass_keys_as_its_exact_value() -> None:
    # Int subclasses went through float(): 2**53 + 1 became 2**53 (another seed, same key), 10**400 crashed.
    base = chat("roll")
    assert key({**base, "seed": Seed.BIG}) == key({**base, "seed": 2**53 + 1})
    assert key({**base, "seed": Seed.BIG}) != key({**base, "seed": 2**53})
    assert key({**base, "seed": Seed.HUGE}) == key({**base, "seed": 10**400})


def test_a_tenant_without_a_utf8_form_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="`tenant_id`"):
        tenant_salt("acme\ud800")  # a lone surrogate, as json.loads('"\\ud800"') gives
    with pytest.raises(ConfigError, match="`tenant_id`"):
        ExactCache(MemoryStore()).lookup(chat("x"), tenant="\ud800")


def test_a_field_name_that_is_not_a_string_is_a_config_error() -> None:
    # Was a bare TypeError beside string fields, and alone the same key as its string form ("1").
    with pytest.raises(ConfigError, match="`request` keys must be strings"):
        key({**chat("x"), 1: "a"})
    with pytest.raises(ConfigError, match="`request` keys must be strings"):
        key({1: "a"})


# -- the cachelm command -------------------------------------------------------------------------------


def cachelm(*argv: str, env: dict[str, str] | None = None, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CACHELM, *argv], capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}, **kw
    )


def seeded(path: Path, count: int) -> str:
    with SQLiteStore(path) as store:
        cache = ExactCache(store)
        for i in range(count):
            cache.store(chat(f"question {i}"), answer(f"answer {i} " + "x" * 100), tenant="acme")
    return f"sqlite:///{path}"


@pytest.mark.parametrize(
    "argv",
    [
        ["stats"],
        ["export"],
        ["purge", "--all"],
        ["purge", "--tenant", "acme"],
        ["feedback", "bad", "--key", "k", "--tenant", "acme", "--no-semantic"],
    ],
)
def test_a_missing_store_file_is_bad_input_and_nothing_is_created(tmp_path: Path, argv: list[str]) -> None:
    # A typo in the path used to create an empty store (folders too) and report it: "entries 0",
    # "purged 0 entries", exit 0.
    missing = tmp_path / "typo" / "cache.db"
    for result in (
        cachelm(*argv, "--store", f"sqlite:///{missing}"),
        cachelm(*argv, env={"CACHELM_STORE": f"sqlite:///{missing}"}),
    ):
        assert result.returncode == 2, result.stdout + result.stderr
        assert result.stderr.startswith("cachelm: error: no store at ") and result.stderr.count("\n") == 1
        assert not missing.parent.exists()


def test_import_still_creates_its_store(tmp_path: Path) -> None:
    source = seeded(tmp_path / "a.db", 2)
    dump = tmp_path / "dump.jsonl"
    assert cachelm("export", "--store", source, "--out", str(dump)).returncode == 0
    target = tmp_path / "new" / "b.db"
    result = cachelm("import", "--store", f"sqlite:///{target}", str(dump))
    assert (result.returncode, result.stdout) == (0, "imported 2 entries\n")


def test_export_into_a_pipe_its_reader_closed_ends_quietly(tmp_path: Path) -> None:
    # `cachelm export | head`: was a BrokenPipeError traceback and exit status 1.
    url = seeded(tmp_path / "big.db", 1500)  # ~300 KB of JSONL: more than a pipe holds
    proc = subprocess.Popen(
        [CACHELM, "export", "--store", url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.read(10)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141
    assert err == ""


def test_ctrl_c_is_one_line_and_exit_status_130(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    seeded(db, 1)
    proc = subprocess.Popen(
        [CACHELM, "import", "--store", f"sqlite:///{db}", "-"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        # The store is opened after stdin: once the process holds the file it is (about to be) reading stdin.
        while not _holds(proc.pid, db):
            assert proc.poll() is None and time.monotonic() < deadline, "cachelm never opened the store"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (proc.returncode, err) == (130, "cachelm: interrupted\n")


def _holds(pid: int, path: Path) -> bool:
    fds = Path(f"/proc/{pid}/fd")
    try:
        return any(os.readlink(fd) == str(path) for fd in fds.iterdir())
    except OSError:  # a descriptor closed while listing
        return False


def test_export_onto_the_store_s_own_file_is_refused_and_the_store_kept(tmp_path: Path) -> None:
    # `--out cache.db` for `--out cache.jsonl`: the file was truncated under the open store, 3 entries → 0.
    db = tmp_path / "cache.db"
    url = seeded(db, 3)
    for out in (db, tmp_path / "." / "cache.db", Path(f"{db}-wal"), Path(f"{db}.semantic.sqlite")):
        result = cachelm("export", "--store", url, "--out", str(out))
        assert result.returncode == 2 and result.stderr.count("\n") == 1
        assert result.stderr.startswith("cachelm: error: `--out`")
    with SQLiteStore(db) as store:
        assert len(store) == 3
    assert cachelm("export", "--store", url, "--out", str(tmp_path / "cache.db.jsonl")).returncode == 0


def test_purge_all_is_not_reachable_by_an_abbreviation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = seeded(tmp_path / "d.db", 3)
    for flag in ("--a", "--al"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["purge", "--store", url, flag])
        assert exit_info.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err
    with SQLiteStore(tmp_path / "d.db") as store:
        assert len(store) == 3


@pytest.mark.parametrize("flag", ["--user", "--tenant", "--tag", "--model"])
def test_purge_with_an_empty_filter_is_refused(
    tmp_path: Path, flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # `cachelm purge --user "$USER_ID"` with the variable unset purged every entry stored without a user.
    url = seeded(tmp_path / "e.db", 3)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["purge", "--store", url, flag, ""])
    assert exit_info.value.code == 2 and f"`{flag}` must not be empty" in capsys.readouterr().err
    with SQLiteStore(tmp_path / "e.db") as store:
        assert len(store) == 3


# -- demo, metrics, clock ------------------------------------------------------------------------------


def demo(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cachelm.demo", *argv], capture_output=True, text=True, timeout=180
    )


def test_the_demo_passes_its_checks_again_in_the_same_kept_folder(tmp_path: Path) -> None:
    # The second run found the first run's answers and failed three of its own checks.
    for _ in range(2):
        result = demo("--keep", str(tmp_path))
        assert result.returncode == 0 and "all checks passed" in result.stdout, result.stdout


def test_the_demo_given_a_file_as_its_folder_is_bad_input(tmp_path: Path) -> None:
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    result = demo("--keep", str(file))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith("python -m cachelm.demo: error: `--keep`")
    assert file.read_text() == "mine"


def test_the_price_memo_stays_bounded_under_client_chosen_model_ids() -> None:
    # Model ids come from requests; each new one was remembered forever.
    bound = getattr(metrics, "MAX_PRICED_MODELS", 4096)
    table = CacheMetrics()
    for i in range(bound + 1000):
        table.price(f"gpt-4o-mini-{i}")
    assert len(table._price_of) <= bound
    assert table.price("gpt-4o-mini-x") == table.prices["gpt-4o-mini"]


def test_a_manual_clock_refuses_a_non_finite_step() -> None:
    clock = ManualClock(5.0)
    for bad in (math.nan, math.inf, -1.0):
        with pytest.raises(ConfigError, match="`seconds`"):
            clock.advance(bad)
    assert clock() == 5.0  # nan stuck: every later time was nan


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--port", "99999"], "`--port` must be in [0, 65535]"),
        (["--port", "-1"], "`--port` must be in [0, 65535]"),
        (["--log-level", "LOUD"], "invalid choice: 'loud'"),
        (["--hash-key", ""], "`--hash-key` must not be empty"),
    ],
    ids=["port-too-large", "port-negative", "log-level", "empty-hash-key"],
)
def test_serve_refuses_bad_options_before_starting(argv: list[str], needle: str) -> None:
    """Each once started the server (loading the model) or failed after it with a traceback."""
    done = cachelm("serve", "--upstream", "http://127.0.0.1:9/v1", *argv)
    assert done.returncode == 2 and needle in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("command", [["import", "-"], ["stats"], ["purge", "--tenant", "acme"]])
def test_a_memory_store_is_refused_by_every_command(command: list[str]) -> None:
    """`import --store memory://` reported "imported N" and kept nothing."""
    done = cachelm(*command, "--store", "memory://", input='{"x": 1}\n')
    assert done.returncode == 2 and "memory:// store lasts only as long as this command" in done.stderr
