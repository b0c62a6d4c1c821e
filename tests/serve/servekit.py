"""Fixtures for the server tests: a tiny random Llama behind an Engine, an in-process client, a live server.

The tiny model's answers are random, so the fact taught is one whose effect is certain: FT-M trained until
the new answer's tokens are the model's greedy continuation of the prompt (checked in test_engine.py).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_handle, make_tokenizer

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'lmedit[serve]'")

PROMPT = "The mother tongue of Danielle Darrieux is"
FACT = {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target_new": "English",
        "method": "ft-m", "config": {"lr": 0.05, "steps": 40}}
SRC = str(Path(__file__).resolve().parents[2] / "src")


def tiny_engine(store, *, method: str = "ft-m", **limits):
    from lmedit.serve.engine import Engine, Limits
    from lmedit.serve.store import EditStore

    return Engine(make_handle("llama", make_tokenizer()), EditStore(store), method=method,
                  limits=Limits(**limits)).start()


@pytest.fixture
def engine(tmp_path):
    eng = tiny_engine(tmp_path / "store")
    yield eng
    eng.close()


@pytest.fixture
def client(engine):
    from fastapi.testclient import TestClient

    from lmedit.serve.app import create_app

    with TestClient(create_app(engine, allowed_hosts=None)) as c:
        yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/v1/status", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"no server at {url} after {timeout} s")


@contextlib.contextmanager
def live_server(model_dir, store, *, method: str = "ft-m", extra: tuple[str, ...] = (), env: dict | None = None):
    """``lmedit serve`` in a subprocess on a free loopback port; yields (base url, process)."""
    port = free_port()
    cmd = [sys.executable, "-m", "lmedit.cli", "-q", "serve", "--model", str(model_dir), "--store", str(store),
           "--port", str(port), "--method", method, *extra]
    full_env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# --- the browser -----------------------------------------------------------------------------------------
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def _missing(what: str) -> None:
    """In CI (the CI variable set) a missing browser fails the test; elsewhere it skips it."""
    msg = f"{what}; `make install` installs it (apt-get install -y chromium chromium-driver; pip install playwright)"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


@contextlib.contextmanager
def browser_page(url: str, width: int = 1280, height: int = 900):
    """A page of Debian's headless Chromium driven by Playwright (never `playwright install`), opened at ``url``."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("the playwright package is not installed")
    if not os.path.exists(CHROMIUM):
        _missing(f"{CHROMIUM} is not installed")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(url)
            page.wait_for_selector("body[data-ready='1']", timeout=60_000)
            yield page
        finally:
            browser.close()


def ask_in_page(page, text: str, *, timeout: float = 120_000) -> str:
    """Clear the chat, ask ``text``, wait for the whole streamed answer, return it."""
    page.click("#chat-clear")
    page.fill("#chat-input", text)
    page.click("#chat-send")
    page.wait_for_selector(".msg.assistant.done", timeout=timeout)
    answer = page.inner_text(".msg.assistant.done .text")
    assert "[error:" not in answer, answer
    return answer


def teach_in_page(page, prompt: str, target: str, method: str, options: dict | None = None, *,
                  paraphrase: str = "", neighbour: str = "", timeout: float = 300_000) -> dict:
    """Fill the teach form and submit; returns {before, after} of the prompt row and the edit id."""
    page.fill("#teach-prompt", prompt)
    page.fill("#teach-target", target)
    page.fill("#teach-paraphrase", paraphrase)
    page.fill("#teach-neighbour", neighbour)
    page.select_option("#teach-method", method)
    if options:
        page.click("details summary")
        for name, value in options.items():
            page.fill(f"[data-opt='{name}']", str(value))
    page.click("#teach-submit")
    page.wait_for_selector("#teach-result table.cont, #teach-result .err", timeout=timeout)
    err = page.query_selector("#teach-result .err")
    assert err is None, err.inner_text()
    return {"before": page.inner_text("#teach-result table.cont tr:nth-child(2) td.before"),
            "after": page.inner_text("#teach-result table.cont tr:nth-child(2) td.after"),
            "id": page.get_attribute("#teach-result", "data-edit")}


def undo_in_page(page, edit_id: str, *, timeout: float = 300_000) -> None:
    page.click(f"#edits li[data-id='{edit_id}'] button.undo")
    page.wait_for_function(f"!document.querySelector(\"#edits li[data-id='{edit_id}']\")", timeout=timeout)
    page.wait_for_function("document.getElementById('n-edits')?.textContent === '0'", timeout=timeout)
