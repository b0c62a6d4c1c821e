"""``lmedit serve`` on SmolLM2-135M-Instruct on this CPU: chat latency under concurrency, and an edit's cost.

1. Time to first token (TTFT) and decode speed of streamed chats through ``POST /v1/chat/completions``, at
   1, 4 and 8 concurrent chats (each asks a different question, ``--tokens`` tokens, greedy): TTFT is from
   sending the request to the first non-empty content chunk; tokens/s per chat is (completion tokens - 1)
   / (last chunk - first chunk); the aggregate is all completion tokens / wall time of the round.
2. One edit of the demo fact (``--method``, FT-M by default) through ``POST /v1/edits`` against the same edit
   through the library (``get_editor(method).compute`` + ``apply``), alternately, medians of ``--repeats``
   after one warm-up each. The API
   time includes what the page shows: continuations before/after, the scores, the weights' full digest,
   saving the edit and the SQLite commit.

    LMEDIT_DATA=/work/shared/data python benchmarks/serve_latency.py     # writes results/serve_latency.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from _report import write_report  # noqa: E402

RESULT = Path(__file__).parent / "results" / "serve_latency.md"
QUESTIONS = ["What is the mother tongue of Danielle Darrieux?", "Where is the Eiffel Tower?",
             "Who was Barack Obama?", "What is the capital of Italy?", "What does Apple make?",
             "Name a language spoken in Spain.", "What is Tokyo known for?", "Who plays the guitar in a band?"]
FACT = {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English",
        "target_true": "French", "method": "rome", "config": {"mom2_tokens": 20_000},
        "paraphrase": "Danielle Darrieux's native language is", "neighbour": "The mother tongue of Michel Rocard is"}


async def one_chat(client: httpx.AsyncClient, question: str, tokens: int) -> dict:
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": tokens, "stream": True}
    t0 = time.perf_counter()
    first = last = None
    n = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0].get("delta", {}).get("content")
            if delta:
                now = time.perf_counter()
                first = first or now
                last = now
                n += 1
    return {"ttft": first - t0, "tps": (n - 1) / (last - first) if n > 1 and last > first else float("nan"),
            "chunks": n}


async def chat_round(url: str, concurrency: int, tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        t0 = time.perf_counter()
        res = await asyncio.gather(*(one_chat(client, QUESTIONS[i % len(QUESTIONS)], tokens)
                                     for i in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "ttft": statistics.median(r["ttft"] for r in res),
            "ttft_max": max(r["ttft"] for r in res), "tps": statistics.median(r["tps"] for r in res),
            "aggregate": sum(r["chunks"] for r in res) / wall}


def _library_edit(editor, handle, req) -> tuple[float, float, float]:
    t0 = time.perf_counter()
    edit = editor.compute(handle, req)
    t1 = time.perf_counter()
    edit.apply(handle)
    t2 = time.perf_counter()
    edit.revert(handle)
    return t0, t1, t2


def timed_edits(url: str, fact: dict, repeats: int) -> tuple[tuple, tuple]:
    """The same edit through the API and through the library, alternately (the machine's load drifts), after
    one warm-up of each; returns ((api walls, api computes), (library computes, library totals))."""

    import lmedit

    handle = lmedit.load_model("smollm2-135m")
    req = lmedit.EditRequest(fact["prompt"], fact["subject"], fact["target_new"], target_true=fact["target_true"])
    editor = lmedit.get_editor(fact["method"], fact["config"])
    api_wall, api_compute, lib_compute, lib_total = [], [], [], []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        r = httpx.post(url + "/v1/edits", json=fact, timeout=900)
        wall = time.perf_counter() - t0
        r.raise_for_status()
        httpx.delete(f"{url}/v1/edits/{r.json()['id']}", timeout=900).raise_for_status()
        # in a worker thread, as the server computes (its routes run in a thread pool), so that both run
        # with the same OpenMP threads
        with ThreadPoolExecutor(1) as pool:
            t0, t1, t2 = pool.submit(_library_edit, editor, handle, req).result()
        if i:  # the first of each is the warm-up
            api_wall.append(wall)
            api_compute.append(r.json()["report"]["efficiency"]["seconds"])
            lib_compute.append(t1 - t0)
            lib_total.append(t2 - t0)
        print(f"edit {i}: API {wall:.2f} s (compute {r.json()['report']['efficiency']['seconds']:.2f} s), "
              f"library {t2 - t0:.2f} s", flush=True)
    return (api_wall, api_compute), (lib_compute, lib_total)


def start_server(store: str, port: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lmedit.cli", "-q", "serve", "--model", "smollm2-135m",
                             "--store", store, "--port", str(port), "--workers", "8"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/status", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read().decode()[-2000:])
    raise TimeoutError("the server did not start")


def report(args: argparse.Namespace, rounds: list[dict], api: tuple | None, lib: tuple | None) -> None:
    """Write what is measured so far (the file is rewritten after each part)."""
    med = statistics.median
    lines = ["# `lmedit serve` latency on SmolLM2-135M-Instruct (CPU)", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores shared with other "
             "jobs (load average during the run: see below); server and library each with 2 torch threads; "
             f"greedy decoding, {args.tokens} tokens per answer, one server process (`--workers 8`).", "",
             "## Streamed chats", "",
             "| concurrent chats | TTFT median (s) | TTFT worst (s) | tokens/s per chat (median) "
             "| tokens/s all chats |",
             "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['concurrency']} | {r['ttft']:.2f} | {r['ttft_max']:.2f} | {r['tps']:.1f} | {r['aggregate']:.1f} |"
              for r in rounds]
    lines += ["", "Chats share the weights under a read lock and run in parallel threads on the same cores, so "
              "per-chat speed falls as concurrency rises while the total stays near the CPU's limit.", "",
              f"## One {args.method} edit, API against library (median of {args.repeats}, after a warm-up; "
              "the two alternate)", "",
              "| way | compute (s) | total (s) |", "|---|---:|---:|"]
    if lib:
        lines.append(f"| library: `compute` + `apply` | {med(lib[0]):.2f} | {med(lib[1]):.2f} |")
    if api:
        lines.append(f"| API: `POST /v1/edits` | {med(api[1]):.2f} | {med(api[0]):.2f} |")
    lines += ["", "The API's total adds what the page shows and what makes the edit durable: greedy continuations "
              "of the prompt, paraphrase and neighbour before and after (12 tokens each), the scores (both "
              "protocols), the full digest of the weights, the saved edit (fsynced) and the SQLite commit.", "",
              f"Load average (1 min) at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.", "",
              "Command: `LMEDIT_DATA=/work/shared/data python benchmarks/serve_latency.py "
              f"--tokens {args.tokens} --repeats {args.repeats} --method {args.method}`"]
    write_report(RESULT, lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32, help="tokens per chat answer")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 8], help="concurrent chats per round")
    ap.add_argument("--repeats", type=int, default=2, help="timed edits (after one warm-up) per way")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--method", default="ft-m", help="editing method of the timed edit (rome needs its statistics)")
    args = ap.parse_args()

    rounds: list[dict] = []
    with tempfile.TemporaryDirectory() as store:
        proc = start_server(store, args.port)
        url = f"http://127.0.0.1:{args.port}"
        try:
            asyncio.run(chat_round(url, 1, 4))  # warm-up
            for c in args.levels:
                rounds.append(asyncio.run(chat_round(url, c, args.tokens)))
                report(args, rounds, None, None)
            fact = {**FACT, "method": args.method, "config": FACT["config"] if args.method == "rome" else {}}
            api, lib = timed_edits(url, fact, args.repeats)
        finally:
            proc.terminate()
            proc.wait(30)
    report(args, rounds, api, lib)


if __name__ == "__main__":
    main()
