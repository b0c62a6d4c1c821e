"""The engine and its store on a tiny Llama: the taught fact's effect, undo (also from the middle of the log),
restart replay and its fingerprint check, the lock, and the store's own guarantees."""

from __future__ import annotations

import threading
import time

import pytest
import servekit
from servekit import FACT, PROMPT, tiny_engine

from lmedit.serve.engine import state_fingerprint
from lmedit.serve.errors import BadRequest, Conflict, NotFound
from lmedit.serve.locks import RWLock
from lmedit.serve.store import EditStore, StoreError
from lmedit.serve.teach import TeachSpec, check_config
from lmedit.types import EditRequest

engine = servekit.engine  # fixtures (a conftest.py here would shadow tests/conftest.py)


def spec(subject="Danielle Darrieux", prompt="The mother tongue of {} is", target="English", **kw) -> TeachSpec:
    return TeachSpec(EditRequest(prompt, subject, target), "ft-m", {**FACT["config"], **kw})


def answer(engine, prompt=PROMPT, n=3) -> str:
    return engine.generate(prompt, max_tokens=n).text


def test_the_taught_fact_is_certain_on_the_tiny_model(engine):
    """The premise of every "the answer changes" test: FT-M makes ' English' the greedy continuation."""
    before = answer(engine)
    assert not before.startswith(" English")
    rec = engine.teach(spec())
    assert answer(engine).startswith(" English")
    assert rec.report["scores"]["reliability"] == {"pre": 0.0, "post": 1.0, "protocol": "token_acc"}
    assert rec.report["continuations"][0]["before"].startswith(before)
    engine.undo(rec.id)
    assert answer(engine) == before


def test_undo_restores_the_weights_bit_for_bit_and_the_log_says_so(engine):
    base = engine.state
    rec = engine.teach(spec())
    assert engine.state == rec.state_after == state_fingerprint(engine.handle) != base
    undone = engine.undo(rec.id)
    assert undone.status == "undone" and undone.undone is not None
    assert engine.state == state_fingerprint(engine.handle) == base
    with pytest.raises(Conflict, match="already undone"):
        engine.undo(rec.id)
    with pytest.raises(NotFound):
        engine.undo("0123456789ab")


def test_undo_in_the_middle_equals_a_fresh_replay_of_the_rest(engine, tmp_path):
    a = engine.teach(spec())
    b = engine.teach(spec("France", "The capital of {} is", "Rome"))
    c = engine.teach(spec("Michel Rocard", "{} is a native speaker of", "English"))
    engine.undo(a.id)
    rows = engine.store.records("applied")
    assert [r.id for r in rows] == [b.id, c.id]
    assert rows[0].state_before == engine.base_state and rows[-1].state_after == engine.state
    assert {r.report["rebuilt"] for r in rows} <= {"reapplied", "recomputed"}
    # a fresh engine on a copy of the remaining log: the same weights
    fresh = tiny_engine(tmp_path / "fresh")
    for r in rows:
        fresh.teach(TeachSpec(EditRequest.from_dict(r.requests[0]), r.method, r.config))
    assert fresh.state == engine.state
    fresh.close()


def test_restart_replays_the_log_and_checks_the_fingerprint(tmp_path):
    eng = tiny_engine(tmp_path / "s")
    a = eng.teach(spec())
    eng.teach(spec("France", "The capital of {} is", "Rome"))
    eng.undo(a.id)
    state, edited, ids = eng.state, answer(eng, "The capital of France is"), [r.id for r in eng.applied()]
    eng.close()
    again = tiny_engine(tmp_path / "s")
    assert again.state == state and [r.id for r in again.applied()] == ids
    assert answer(again, "The capital of France is") == edited
    again.close()


def test_a_tampered_log_refuses_to_start_and_leaves_the_model_as_loaded(tmp_path):
    eng = tiny_engine(tmp_path / "s")
    rec = eng.teach(spec())
    eng.close()
    import sqlite3

    db = sqlite3.connect(tmp_path / "s" / "log.sqlite3")
    db.execute("UPDATE edits SET state_after = 'not-the-weights' WHERE id = ?", (rec.id,))
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="re-applying the 1 edit"):
        tiny_engine(tmp_path / "s")


def test_a_store_belongs_to_one_model_and_one_server(tmp_path, engine):
    with pytest.raises(StoreError, match="in use by another"):
        tiny_engine(engine.store.folder)
    other = EditStore(tmp_path / "other").open("m", "fp-a", "w-a")
    other.close()
    with pytest.raises(StoreError, match="holds edits of model 'm'"):
        EditStore(tmp_path / "other").open("m2", "fp-b", "w-b")


def test_a_crash_between_files_and_row_leaves_an_orphan_that_start_removes(tmp_path):
    eng = tiny_engine(tmp_path / "s")
    rec = eng.teach(spec())
    eng.store.write_edit(eng._stack[-1][1], "deadbeef0000")  # files written, no row: a crash here
    (eng.store.edits_dir / "cafe.partial").mkdir()
    eng.close()
    again = tiny_engine(tmp_path / "s")
    assert sorted(p.name for p in again.store.edits_dir.iterdir()) == [rec.folder]
    assert len(again.applied()) == 1
    again.close()


def test_bad_requests_change_nothing(engine):
    state = engine.state
    with pytest.raises(BadRequest, match="needs a trained checkpoint"):
        engine.teach(TeachSpec(EditRequest("The capital of {} is", "France", "Rome"), "mend", {}))
    with pytest.raises(ValueError, match="unknown"):
        engine.teach(spec(no_such_option=1))
    with pytest.raises(BadRequest, match="max_tokens"):
        engine.generate(PROMPT, max_tokens=10_000)
    assert engine.state == state_fingerprint(engine.handle) == state and not engine.applied()
    assert not list(engine.store.edits_dir.iterdir())


def test_config_values_that_name_files_are_refused():
    with pytest.raises(BadRequest, match="names a file"):
        check_config({"checkpoint": "x"})
    with pytest.raises(BadRequest, match="looks like a path"):
        check_config({"pool": "../../etc/passwd"})
    assert check_config({"lr": 0.1, "layers": [1]}) == {"lr": 0.1, "layers": [1]}


def test_the_lock_keeps_answers_and_edits_apart():
    lock, events = RWLock(), []

    def reader(name):
        with lock.shared():
            events.append(f"{name}+")
            time.sleep(0.05)
            events.append(f"{name}-")

    def writer():
        with lock.exclusive():
            events.append("W+")
            time.sleep(0.05)
            events.append("W-")

    threads = [threading.Thread(target=reader, args=("r1",)), threading.Thread(target=writer),
               threading.Thread(target=reader, args=("r2",))]
    for t in threads:
        t.start()
        time.sleep(0.01)
    for t in threads:
        t.join()
    w = events.index("W+")
    assert events[w + 1] == "W-"  # nothing inside the writer's section
    assert events.index("r1-") < w < events.index("r2+")  # r2 came after a waiting writer: it waits
