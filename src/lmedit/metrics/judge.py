"""An optional LLM judge of generated answers (tag ``gen_judge``), over any OpenAI-compatible chat endpoint.

The rubric is SimpleQA's: given a question, the gold answer and the model's answer, the judge says CORRECT
(the answer states the gold, possibly with more that does not contradict it), INCORRECT (it contradicts
the gold or names something else) or NOT_ATTEMPTED (no answer, or a refusal). ``<metric>@gen_judge`` is
the fraction judged CORRECT; answers the judge could not grade are left out of it and counted.

Verdicts are cached per (question, gold, answer) in a JSON-lines file, so a rescoring asks only about new
answers. The API key is read from an environment variable (``LMEDIT_JUDGE_KEY`` by default; none is sent
when it is unset). A judge that is unreachable or answers something that is no verdict gives a warning and
no verdict: the exact-match scores are never touched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

VERDICTS = ("CORRECT", "INCORRECT", "NOT_ATTEMPTED")
DEFAULT_KEY_ENV = "LMEDIT_JUDGE_KEY"
DEFAULT_MODEL = "gpt-4o-mini"
_VERDICT = re.compile(r"\b(NOT_ATTEMPTED|INCORRECT|CORRECT)\b")

RUBRIC = """You grade an answer to a question against the gold answer.
Reply with exactly one word:
CORRECT - the answer states the gold answer (extra detail is fine if it does not contradict the gold answer);
INCORRECT - the answer contradicts the gold answer or names something else;
NOT_ATTEMPTED - there is no answer, or the answer does not commit to one.

Question: {question}
Gold answer: {gold}
Answer: {answer}

Grade:"""


class JudgeUnavailable(RuntimeError):
    """The judge endpoint cannot be reached (the run goes on without its verdicts)."""


def endpoint(url: str) -> str:
    """``url`` as a chat-completions endpoint: a base URL (``http://host/v1``) gets ``/chat/completions``."""
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


def parse_verdict(text: str) -> str | None:
    """The first verdict word in the judge's reply, or None."""
    m = _VERDICT.search(text.upper())
    return m.group(1) if m else None


class Judge:
    """A chat-completions client with a verdict cache (see the module docstring).

    Args:
        url: the endpoint or its base URL.
        model: the model name sent to the endpoint.
        key_env: the environment variable holding the API key.
        cache: a JSON-lines file of earlier verdicts (read, then appended to).
        timeout: seconds per request.
    """

    def __init__(self, url: str, *, model: str = DEFAULT_MODEL, key_env: str = DEFAULT_KEY_ENV,
                 cache: str | Path | None = None, timeout: float = 30.0) -> None:
        if not re.match(r"^https?://", url):
            raise ValueError(f"judge URL {url!r} must start with http:// or https://")
        self.url, self.model, self.timeout = endpoint(url), model, timeout
        self.key = os.environ.get(key_env) or None
        self.cache_path = Path(cache) if cache is not None else None
        self.verdicts: dict[str, str] = {}
        self.down: str | None = None  # why the endpoint is considered down (set on the first failure)
        self.unparsed = 0
        if self.cache_path is not None and self.cache_path.exists():
            for line in self.cache_path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                    self.verdicts[rec["key"]] = rec["verdict"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue

    @staticmethod
    def key_of(question: str, gold: str, answer: str) -> str:
        return hashlib.sha256(json.dumps([question, gold, answer]).encode()).hexdigest()[:24]

    def _ask(self, prompt: str) -> str:
        body = json.dumps({"model": self.model, "temperature": 0, "max_tokens": 8,
                           "messages": [{"role": "user", "content": prompt}]}).encode()
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310 (the user's URL)
                doc = json.loads(resp.read().decode("utf-8", "replace"))
        except (urllib.error.URLError, OSError) as e:
            raise JudgeUnavailable(f"{self.url}: {e}") from None
        except json.JSONDecodeError:
            return ""  # a reply that is not JSON: no verdict
        try:
            return str(doc["choices"][0]["message"]["content"])
        except (KeyError, IndexError, TypeError):
            return ""

    def grade(self, question: str, gold: str, answer: str) -> str | None:
        """CORRECT / INCORRECT / NOT_ATTEMPTED, or None when the judge is down or gave no verdict."""
        key = self.key_of(question, gold, answer)
        if key in self.verdicts:
            return self.verdicts[key]
        if self.down is not None:
            return None
        try:
            reply = self._ask(RUBRIC.format(question=question, gold=gold, answer=answer))
        except JudgeUnavailable as e:
            self.down = str(e)
            log.warning("the LLM judge is unreachable (%s); no judge scores, the exact-match scores stand", e)
            return None
        verdict = parse_verdict(reply)
        if verdict is None:
            self.unparsed += 1
            log.warning("the LLM judge gave no verdict for %r (reply %r); that answer is not judged",
                        question, reply[:80])
            return None
        self.verdicts[key] = verdict
        if self.cache_path is not None:
            with open(self.cache_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "verdict": verdict, "question": question, "gold": gold,
                                    "answer": answer}) + "\n")
        return verdict

    def stats(self) -> dict[str, Any]:
        return {"url": self.url, "model": self.model, "down": self.down, "unparsed": self.unparsed}
