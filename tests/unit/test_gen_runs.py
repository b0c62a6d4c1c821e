"""The generation protocol in benchmark runs: tags on every stored number, resuming runs from before it,
rescoring from the kept texts, the LLM judge against a local stub server, and capability drift."""

from __future__ import annotations

import json
import logging
import math
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch
import torch.nn.functional as F
from test_benchmark import ToyEditor, _cases, _lines

from lmedit.bench import BenchmarkError, run_benchmark
from lmedit.bench.rescore import rescore_run
from lmedit.metrics.drift import DriftSettings, ngram_entropy, perplexity
from lmedit.metrics.evaluate import TEACHER_FORCED
from lmedit.metrics.gen_protocol import GEN_TAGS, split_key
from lmedit.metrics.generate import GenSettings
from lmedit.metrics.judge import Judge, parse_verdict
from lmedit.metrics.records import TOKEN_ACC, CaseResult, ProtocolMixError, Score, summarize

KNOWN_TAGS = {"token_acc", "prob_compare", *GEN_TAGS, "gen_judge"}


def _tags_ok(scores: dict) -> None:
    for key, s in scores.items():
        assert s["protocol"] in KNOWN_TAGS, (key, s)
        tag = split_key(key)[1]
        assert tag is None or tag == s["protocol"], (key, s)
        assert tag is not None or not s["protocol"].startswith("gen"), (key, s)


def test_every_stored_number_carries_its_protocol(tiny_llama, tmp_path):
    run_benchmark(ToyEditor(), tiny_llama, _cases(3), out_dir=tmp_path)
    for line in _lines(tmp_path):
        assert line["protocols"] == ["token_acc", "prob_compare", "gen"]
        _tags_ok(line["post"])
        _tags_ok(line["pre"])
        assert any(k.endswith("@gen_em") for k in line["post"]) and "reliability" in line["post"]
        kinds = [r["metric"] for r in line["texts"]["post"]]
        assert kinds == ["reliability", "generalization", "locality"] == [r["metric"] for r in line["texts"]["pre"]]
    summary = json.loads((tmp_path / "summary.json").read_text())
    for which in ("post", "pre"):
        _tags_ok(summary[which])
    table = (tmp_path / "table.md").read_text()
    assert "| reliability@gen_em | gen_em |" in table and "| reliability | token_acc |" in table
    assert json.loads((tmp_path / "run.json").read_text())["generation"] == {"context": "question",
                                                                             "max_new_tokens": 32}


def test_a_summary_never_averages_two_protocols():
    a = CaseResult(0, post={"reliability": Score(1.0, TOKEN_ACC)})
    b = CaseResult(1, post={"reliability": Score(0.0, "gen_em")})
    with pytest.raises(ProtocolMixError, match="mixes protocols"):
        summarize([a, b])
    ok = summarize([a, CaseResult(1, post={"reliability@gen_em": Score(0.0, "gen_em")})])
    assert ok["reliability"]["protocol"] == "token_acc" and ok["reliability@gen_em"]["protocol"] == "gen_em"


def _make_old(handle, tmp_path, cases, setting="single", batch_size=1):
    """A run as lmedit wrote it before the generation protocol: teacher-forced only, no protocols per case."""
    run_benchmark(ToyEditor(), handle, cases, out_dir=tmp_path, protocols=TEACHER_FORCED,
                  setting=setting, batch_size=batch_size)
    run = json.loads((tmp_path / "run.json").read_text())
    assert "generation" not in run
    lines = _lines(tmp_path)
    for line in lines:
        line.pop("protocols")
        line.pop("texts", None)
    (tmp_path / "cases.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return lines


@pytest.mark.parametrize("setting,batch_size", [("single", 1), ("sequential", 2)])
def test_a_run_from_before_resumes_and_computes_the_missing_protocol(tiny_llama, tmp_path, setting, batch_size):
    cases = _cases(4)
    old = _make_old(tiny_llama, tmp_path, cases, setting, batch_size)
    editor = ToyEditor()
    res = run_benchmark(editor, tiny_llama, cases, out_dir=tmp_path, resume=True, setting=setting,
                        batch_size=batch_size)
    assert editor.calls == (4 if setting == "single" else 0), "single: edited again; sequential: saved edits re-applied"
    lines = _lines(tmp_path)
    assert len(lines) == 4
    for before, now in zip(old, lines, strict=True):
        for k, v in before["post"].items():
            assert now["post"][k] == v, "the teacher-forced numbers are kept as they were"
        assert "reliability@gen_em" in now["post"] and now["info"]["protocols_added"] == ["gen"]
        assert now["texts"]["post"]
    assert "missing_protocols" not in res.summary
    again = ToyEditor()
    run_benchmark(again, tiny_llama, cases, out_dir=tmp_path, resume=True, setting=setting, batch_size=batch_size)
    assert again.calls == 0, "nothing left to compute"


def test_a_run_from_before_can_mark_the_protocol_missing(tiny_llama, tmp_path):
    cases = _cases(3)
    _make_old(tiny_llama, tmp_path, cases)
    editor = ToyEditor()
    res = run_benchmark(editor, tiny_llama, cases, out_dir=tmp_path, resume=True, fill_missing=False)
    assert editor.calls == 0
    assert res.summary["missing_protocols"] == {"gen": 3}
    assert "reliability@gen_em" not in res.summary["post"], "missing, never a zero"
    assert "not scored with a protocol" in (tmp_path / "table.md").read_text()


def test_other_generation_settings_do_not_resume(tiny_llama, tmp_path):
    cases = _cases(2)
    run_benchmark(ToyEditor(), tiny_llama, cases, out_dir=tmp_path)
    with pytest.raises(BenchmarkError, match="generation"):
        run_benchmark(ToyEditor(), tiny_llama, cases, out_dir=tmp_path, resume=True,
                      generation=GenSettings(context="qa"))


def test_rescoring_from_texts_reproduces_and_follows_the_texts(tiny_llama, tmp_path):
    run = run_benchmark(ToyEditor(), tiny_llama, _cases(3), out_dir=tmp_path)
    before = (tmp_path / "cases.jsonl").read_text()
    summary = rescore_run(tmp_path)
    assert summary["post"] == run.summary["post"] and summary["rescored"]["from_texts"] == 3
    assert [x["post"] for x in _lines(tmp_path)] == [json.loads(x)["post"] for x in before.splitlines()]
    lines = _lines(tmp_path)
    lines[0]["texts"]["post"][0]["text"] = "\nA: English.\nmore"  # as if the model had answered the target
    (tmp_path / "cases.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    rescore_run(tmp_path)
    assert _lines(tmp_path)[0]["post"]["reliability@gen_em"]["value"] == 1.0
    assert _lines(tmp_path)[0]["post"]["reliability"] == lines[0]["post"]["reliability"]
    with pytest.raises(FileNotFoundError, match="holds no run"):
        rescore_run(tmp_path / "nothing")


# --- the judge -------------------------------------------------------------------------------------------

class _Stub(BaseHTTPRequestHandler):
    mode = "ok"
    seen: list = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Stub.seen.append((self.path, self.headers.get("Authorization"), body))
        prompt = body["messages"][0]["content"]
        answer = prompt.split("Answer: ")[-1].split("\n")[0].strip()
        gold = prompt.split("Gold answer: ")[-1].split("\n")[0].strip()
        if _Stub.mode == "garbage":
            reply = b"<html>not json</html>"
        else:
            verdict = "NOT_ATTEMPTED" if not answer else ("CORRECT" if gold.lower() in answer.lower() else "INCORRECT")
            reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": verdict}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *a):
        pass


@pytest.fixture
def stub():
    server = HTTPServer(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Stub.mode, _Stub.seen = "ok", []
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_judge_grades_caches_and_sends_the_key(stub, tmp_path, monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", "sekret")
    judge = Judge(stub, key_env="MY_JUDGE_KEY", cache=tmp_path / "cache.jsonl")
    assert judge.grade("Capital of France?", "Paris", "It is Paris.") == "CORRECT"
    assert judge.grade("Capital of France?", "Paris", "Rome") == "INCORRECT"
    assert judge.grade("Capital of France?", "Paris", "") == "NOT_ATTEMPTED"
    path, auth, body = _Stub.seen[0]
    assert path == "/v1/chat/completions" and auth == "Bearer sekret" and body["temperature"] == 0
    again = Judge(stub, key_env="MY_JUDGE_KEY", cache=tmp_path / "cache.jsonl")
    assert again.grade("Capital of France?", "Paris", "Rome") == "INCORRECT"
    assert len(_Stub.seen) == 3, "a cached verdict is not asked again"
    assert parse_verdict("The grade: not_attempted.") == "NOT_ATTEMPTED" and parse_verdict("B") is None
    with pytest.raises(ValueError, match="http"):
        Judge("127.0.0.1:9/v1")


def test_judge_in_a_rescored_run_and_when_it_fails(stub, tiny_llama, tmp_path, caplog):
    run_benchmark(ToyEditor(), tiny_llama, _cases(2), out_dir=tmp_path)
    em = {k: v for k, v in json.loads((tmp_path / "summary.json").read_text())["post"].items()}
    summary = rescore_run(tmp_path, judge=Judge(stub, cache=tmp_path / "judge.jsonl"))
    assert summary["post"]["reliability@gen_judge"]["protocol"] == "gen_judge"
    assert all(summary["post"][k] == v for k, v in em.items()), "the exact-match scores stand"

    _Stub.mode = "garbage"
    with caplog.at_level(logging.WARNING):
        out = tmp_path / "g"
        run_benchmark(ToyEditor(), tiny_llama, _cases(1), out_dir=out)
        s = rescore_run(out, judge=Judge(stub))
    assert "no verdict" in caplog.text and "reliability@gen_judge" not in s["post"]
    assert "reliability@gen_em" in s["post"]

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        s = rescore_run(out, judge=Judge("http://127.0.0.1:9/v1", timeout=2))  # nothing listens there
    assert "unreachable" in caplog.text and s["rescored"]["judge"]["down"]
    assert "reliability@gen_em" in s["post"] and "reliability@gen_judge" not in s["post"]


# --- capability drift --------------------------------------------------------------------------------

def test_ngram_entropy_by_hand():
    # "a b a b": 2-grams ab, ba, ab -> p = 2/3, 1/3: H2 = 0.9183; 3-grams aba, bab -> H3 = 1
    # weighted: (2/3 * 0.9183 + 4/3 * 1) / 2 = 0.9728
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert ngram_entropy(["a b a b"]) == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert ngram_entropy(["x x x x x"]) == 0.0, "repetition has no entropy"


@torch.no_grad()
def test_perplexity_matches_a_plain_forward(tiny_decoder):
    h = tiny_decoder
    ids = h.tokens.encode("The capital of France is Paris. The capital of Italy is Rome. " * 4)
    row = h.tokens.bos + ids[:20]
    logits = h.model(torch.tensor([row])).logits[0, :-1].float()
    nll = F.cross_entropy(logits, torch.tensor(row[1:]), reduction="sum")
    row2 = h.tokens.bos + ids[20:40]
    logits2 = h.model(torch.tensor([row2])).logits[0, :-1].float()
    nll2 = F.cross_entropy(logits2, torch.tensor(row2[1:]), reduction="sum")
    expected = math.exp(float(nll + nll2) / (len(row) - 1 + len(row2) - 1))
    assert perplexity(h, ids[:40], window=20, slice_len=7) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("setting,every,points", [
    ("sequential", 0, ["before", "after chunk 2"]),
    ("sequential", 1, ["before", "after chunk 0", "after chunk 1", "after chunk 2"]),
    ("batch", 0, ["before", "after chunk 0"]),
])
def test_drift_points_of_batch_and_sequential_runs(tiny_llama, tmp_path, setting, every, points):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" The capital of France is Paris @-@ city . Tokyo is in Japan @,@ Asia .\n" * 40)
    drift = DriftSettings(tokens=200, window=64, every=every, prompts=("The capital of", "Tokyo is"),
                          max_new_tokens=6, corpus=str(corpus))
    out = tmp_path / "run"
    res = run_benchmark(ToyEditor(scale=2.0), tiny_llama, _cases(6), setting=setting, batch_size=2, out_dir=out,
                        drift=drift, protocols=("token_acc",))
    got = res.summary["drift"]
    assert [p["point"] for p in got["points"]] == points
    assert got["points"][-1]["edits_applied"] == (6 if setting == "sequential" else 2)
    for p in got["points"]:
        assert p["perplexity"]["protocol"] == "perplexity" and p["perplexity"]["value"] > 1
        assert p["ngram_entropy"]["protocol"] == "ngram_entropy"
    assert got["change"]["perplexity"]["before"] != got["change"]["perplexity"]["after"], "the edits changed it"
    assert "Capability drift" in (out / "table.md").read_text()
    lines = (out / "drift.jsonl").read_text().splitlines()
    assert len(lines) == len(points)
    run_benchmark(ToyEditor(scale=2.0), tiny_llama, _cases(6), setting=setting, batch_size=2, out_dir=out,
                  drift=drift, protocols=("token_acc",), resume=True)
    assert len((out / "drift.jsonl").read_text().splitlines()) == len(points), "a resumed run measures nothing again"


def test_cli_bench_qaedit_both_protocols_then_rescore(tiny_dir, tmp_path, capsys):
    from lmedit.cli import main

    out = tmp_path / "run"
    args = ["bench", "--method", "ft-m", "--dataset", "qaedit", "--n", "1", "--model", str(tiny_dir),
            "--set", "steps=1", "--out", str(out)]
    assert main(args + ["--context", "chat"]) == 1
    assert "no chat template; use --context question or qa" in capsys.readouterr().err
    assert not out.exists(), "a bad option writes nothing"
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| reliability | token_acc |" in printed and "| reliability@gen_em | gen_em |" in printed
    line = _lines(out)[0]
    assert line["case_id"] == "NQ:1104" and line["texts"]["post"]
    assert main(["rescore", str(out)]) == 0 and "reliability@gen_em" in capsys.readouterr().out
    assert main(["bench", *args[1:], "--protocols", "token_acc,bogus"]) == 1
    assert "unknown scoring protocol" in capsys.readouterr().err
