"""Every ``*ForCausalLM`` class of the installed transformers, built from a tiny config: can lmedit edit it?

Each class is built with random weights (``lmedit.models.tiny``), gets its adapter (registered or discovered),
and must let ROME and FT-M (tiny settings) compute an edit without touching the model, raise the target's
probability when applied, and revert bit-exactly (``lmedit.survey.check``). A class that cannot be
built from a generated config is skipped with the reason; one that discovery refuses must be refused with a
``DiscoveryError`` naming what it could not find. The last test reports editable / built and checks the share.
``python -m lmedit.survey --out docs/architectures.md`` writes the same sweep as a page.
"""

from __future__ import annotations

import pytest

from lmedit.models.tiny import causal_lm_classes
from lmedit.survey import EDITABLE, NO_BUILD, REFUSED, check, counts, memory_limit, tiny_corpus

NAMES = causal_lm_classes()
RESULTS: dict = {}

# Discovered, but an edit of the tiny random model fails; each stays in the survey page with its reason. A class
# that starts passing fails its test (strict): remove it from here.
KNOWN_EDIT_FAILURES = {
    # the configs' weight std 0.02 at width 64 keeps every FFN pre-activation near zero, where GELU is almost
    # linear: Bloom's 256 keys (4·d, a plain FFN) span about d dimensions and the key second moment is singular
    # to 1e-9 (the same model with std 0.1 is editable)
    "BloomForCausalLM": "ROME refuses a degenerate rank-one update (division factor ~1e-5) on the tiny model",
}
# the share of built architectures that must stay editable (measured: see docs/architectures.md)
FLOOR = 0.90


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    with memory_limit(14.0):  # a config that still allocates gigabytes fails alone instead of the machine
        yield tiny_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.mark.survey
@pytest.mark.parametrize("name", NAMES)
def test_causal_lm_is_editable_or_refused_clearly(name, tokenizer, corpus):
    result = check(name, tokenizer, corpus)
    RESULTS[name] = result
    if result.status == NO_BUILD:
        pytest.skip(f"does not build from a generated tiny config: {result.reason}")
    if result.status == REFUSED:
        assert result.reason.startswith("DiscoveryError: cannot edit"), result.reason
        return
    if name in KNOWN_EDIT_FAILURES:
        assert result.status != EDITABLE, f"{name} is editable now: remove it from KNOWN_EDIT_FAILURES"
        pytest.xfail(f"{KNOWN_EDIT_FAILURES[name]} ({result.reason})")
    assert result.status == EDITABLE, result.reason


@pytest.mark.survey
def test_editable_share():
    if len(RESULTS) < len(NAMES):
        pytest.skip("reports only after the whole sweep above ran")
    editable, built, total = counts(list(RESULTS.values()))
    print(f"\neditable by ROME and FT-M: {editable} / {built} architectures that build ({total} classes)")
    assert editable / built >= FLOOR, f"only {editable} / {built} editable"
