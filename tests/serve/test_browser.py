"""A real browser (Debian's headless Chromium, driven by Playwright) uses the page of a live server: it asks,
teaches a fact, sees the answer change, undoes it and sees the old answer back."""

from __future__ import annotations

from servekit import PROMPT, ask_in_page, browser_page, live_server, teach_in_page, undo_in_page


def test_ask_teach_see_the_change_undo_see_the_old_answer(tiny_dir, tmp_path):
    with live_server(tiny_dir, tmp_path / "store") as (url, _), browser_page(url) as page:
        assert "tiny" in page.inner_text("#status") and "0 edits" in page.inner_text("#status")
        before = ask_in_page(page, PROMPT)
        assert not before.lstrip().startswith("English")
        taught = teach_in_page(page, "The mother tongue of [Danielle Darrieux] is", "English", "ft-m",
                               {"lr": 0.05, "steps": 40})
        assert taught["after"].startswith("English") and not taught["before"].startswith("English")
        page.wait_for_function("document.getElementById('n-edits').textContent === '1'")
        assert page.inner_text("#edits li").count("English") == 1
        assert ask_in_page(page, PROMPT).lstrip().startswith("English")
        undo_in_page(page, taught["id"])
        assert ask_in_page(page, PROMPT) == before
        # the page reports errors from the server in place
        page.fill("#teach-prompt", "no brackets here")
        page.click("#teach-submit")
        assert "square brackets" in page.inner_text("#teach-result .err")
