"""Turn cell results into the paper's Table 1 (markdown), a long CSV and a JSON document.

Layout (Yao et al. 2023, Table 1, transposed to one column per method): a block of rows per dataset --
Reliability / Generalization / Locality for ZsRE and CounterFact, Portability (one row per question group)
for the ZsRE portability set, Multi-hop for MQuAKE. Values are x100. In each row the best value among
the method columns is bold (ties: all of them). A cell that could not run, or a metric the dataset cannot
provide, is ``-`` with a footnote that says why. The pre-edit column is the unedited model, not bolded.

Each metric has a row per protocol: the teacher-forced one (``token_acc``), then the generation protocol's
(``gen_em``, ``gen_f1``, ``gen_contains``, and ``gen_judge`` when a judge graded the answers), and for
Locality also its generation rows against the ground truth. Protocols are never averaged together.

A batch or sequential table whose cells measured capability drift ends each dataset's block with a
"Perplexity drift" row: the edited model's WikiText-2 perplexity divided by the unedited model's (1.00 = no
drift), printed as a ratio (not x100); the ratio closest to 1 is bold.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from typing import Any

from ..metrics.gen_protocol import GEN, GEN_CONTAINS, GEN_EM, GEN_F1, GEN_JUDGE, LOCALITY_TRUTH, is_gen_key, split_key
from .cells import CellResult
from .postscore import DRIFT_INFO

DATASET_LABELS = {"zsre": "ZsRE", "counterfact": "CounterFact", "qaedit": "QAEdit",
                  "zsre-portability": "ZsRE (portability)", "mquake": "MQuAKE (multi-hop)"}
METRIC_LABELS = {"reliability": "Reliability", "generalization": "Generalization", "locality": "Locality",
                 "multihop": "Multi-hop", LOCALITY_TRUTH: "Locality (ground truth)"}
DRIFT_ROW, DRIFT_PROTOCOL = "perplexity_drift", "perplexity_ratio"  # the drift row's metric and protocol
METRIC_LABELS[DRIFT_ROW] = "Perplexity drift (ratio edited / unedited)"
GEN_ORDER = (GEN_EM, GEN_F1, GEN_CONTAINS, GEN_JUDGE)
CORE_ROWS = ("reliability", "generalization", "locality")
# Blocks whose rows differ from CORE_ROWS (+ any portability groups the cells report).
BLOCK_ROWS = {"zsre-portability": ("portability",), "mquake": ("multihop",)}
METRIC_FIELDS = {"generalization": "paraphrases", "locality": "locality", "portability": "portability"}
# Protocol of a row when no cell reported it (every cell failed): what the metric would have used.
DEFAULT_PROTOCOL = {"multihop": "greedy_exact"}


@dataclass
class Row:
    """One table row: a metric of a dataset, one value (or a reason) per method."""

    dataset: str
    metric: str
    values: dict[str, float | None] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    cases: dict[str, int] = field(default_factory=dict)
    protocol: str = "token_acc"
    pre: float | None = None
    ratio: bool = False  # a ratio (the drift row), printed as it is: not x100, best = closest to 1

    @property
    def label(self) -> str:
        metric = split_key(self.metric)[0]
        if metric.startswith("portability_"):
            return f"Portability ({metric.removeprefix('portability_').replace('_', '-')})"
        return METRIC_LABELS.get(metric, metric.replace("_", " ").capitalize())

    def best(self) -> set[str]:
        nums = {m: v for m, v in self.values.items() if v is not None}
        if self.ratio:
            nums = {m: -abs(math.log(v)) for m, v in nums.items() if v > 0}
        if len(nums) < 2 or max(nums.values()) == min(nums.values()):
            return set()  # nothing stands out when every method scores the same
        top = max(nums.values())
        return {m for m, v in nums.items() if math.isclose(v, top, abs_tol=1e-12)}


def _mean(stat: dict[str, Any] | None) -> float | None:
    if not stat or stat.get("mean") is None:
        return None
    v = float(stat["mean"])
    return v if math.isfinite(v) else None


def _row_metrics(dataset: str, cells: list[CellResult], protocols: list[str] | None = None) -> list[str]:
    wanted = BLOCK_ROWS.get(dataset, CORE_ROWS + ("portability",))
    keys = {m for c in cells for m in c.post}
    found = sorted({m for m in keys if m.startswith("portability_") and split_key(m)[1] is None})
    rows: list[str] = []
    for m in wanted:
        if m != "portability":
            rows.append(m)
        elif found:
            rows.extend(found)
        elif dataset in BLOCK_ROWS:  # a portability block without portability numbers still shows its row
            rows.append("portability")
    if any(GEN in c.info.get("missing_protocols", []) for c in cells):  # show the rows such a cell lacks
        keys |= {k for m in rows for k in _gen_rows(m, None)}
    out: list[str] = []
    for m in rows:
        if m in DEFAULT_PROTOCOL or protocols is None or "token_acc" in protocols:
            out.append(m)
        if protocols is None or GEN in protocols:
            out += _gen_rows(m, keys)
    return out


def _gen_rows(metric: str, keys: set[str] | None) -> list[str]:
    """The generation protocol's row keys of ``metric`` that the cells report (``keys``; None: those the
    protocol always computes), in tag order (Locality: its agreement with the unedited model, then its
    ground-truth rows)."""
    if keys is None:
        if metric == "locality":
            return [f"locality@{GEN_EM}", f"locality@{GEN_F1}"] + [f"{LOCALITY_TRUTH}@{t}" for t in GEN_ORDER[:3]]
        return [f"{metric}@{t}" for t in GEN_ORDER[:3]] if metric not in DEFAULT_PROTOCOL else []
    bases = (metric, LOCALITY_TRUTH) if metric == "locality" else (metric,)
    return [k for b in bases for tag in GEN_ORDER if (k := f"{b}@{tag}") in keys]


def _missing_reason(cell: CellResult, metric: str) -> str:
    tag = split_key(metric)[1]
    if tag and tag.startswith(GEN) and GEN in cell.info.get("missing_protocols", []):
        return (f"{cell.spec.method}/{cell.spec.dataset} was cached before the generation protocol; run the table "
                "without --cached-only to compute it")
    field_name = METRIC_FIELDS.get(split_key(metric)[0].split("_")[0])
    if field_name and cell.fields.get(field_name, 1) == 0:
        return f"the {cell.spec.dataset} cases have no '{field_name}' field, which {metric} needs"
    return f"{cell.spec.method} reported no {metric} on {cell.spec.dataset}"


def build_rows(cells: list[CellResult], methods: list[str], datasets: list[str],
               protocols: list[str] | None = None) -> list[Row]:
    """The table's rows in display order, from the cells (any order); ``protocols``: only these protocols'
    rows (None: every protocol the cells report)."""
    by = {(c.spec.method, c.spec.dataset): c for c in cells}
    rows: list[Row] = []
    for ds in datasets:
        ds_cells = [c for c in cells if c.spec.dataset == ds]
        for metric in _row_metrics(ds, [c for c in ds_cells if c.status == "ok"], protocols):
            row = Row(ds, metric, protocol=DEFAULT_PROTOCOL.get(metric, split_key(metric)[1] or "token_acc"))
            for m in methods:
                cell = by.get((m, ds))
                stat = cell.post.get(metric) if cell is not None else None
                if cell is None:
                    row.values[m], row.reasons[m] = None, f"{m} was not run on {ds}"
                elif cell.status != "ok":
                    row.values[m], row.reasons[m] = None, cell.reason
                elif _mean(stat) is None:
                    row.values[m], row.reasons[m] = None, _missing_reason(cell, metric)
                else:
                    row.values[m] = _mean(stat)
                    row.protocol = stat.get("protocol", row.protocol)
                    row.cases[m] = int(stat.get("cases", 0))
                    if row.pre is None and _mean(cell.pre.get(metric)) is not None:
                        row.pre = _mean(cell.pre.get(metric))
            rows.append(row)
        if any(DRIFT_INFO in c.info for c in ds_cells if c.status == "ok"):
            rows.append(_drift_row(ds, ds_cells, methods))
    return rows


def _drift_row(dataset: str, cells: list[CellResult], methods: list[str]) -> Row:
    """The dataset's perplexity drift per method (see the module docstring)."""
    by = {c.spec.method: c for c in cells}
    row = Row(dataset, DRIFT_ROW, protocol=DRIFT_PROTOCOL, ratio=True)
    for m in methods:
        cell = by.get(m)
        drift = cell.info.get(DRIFT_INFO) if cell is not None else None
        if drift:
            row.values[m], row.cases[m] = drift["perplexity_ratio"], int(cell.info.get("cases", 0))
        elif cell is None or cell.status != "ok":
            row.values[m], row.reasons[m] = None, cell.reason if cell is not None else f"{m} was not run on {dataset}"
        else:
            row.values[m], row.reasons[m] = None, (
                f"{m}/{dataset} measured no drift (cached before drift was measured, or a multi-hop cell); delete "
                f"its cell folder to compute it")
    return row


def _fmt(v: float | None, ratio: bool = False) -> str:
    return "" if v is None else f"{v:.3f}" if ratio else f"{100 * v:.1f}"


def _n_text(meta: dict[str, Any]) -> str:
    other = {ds: k for ds, k in (meta.get("n_by_dataset") or {}).items() if k != meta["n"]}
    extra = "".join(f"; {DATASET_LABELS.get(ds, ds)}: {k}" for ds, k in other.items())
    return f"{meta['n']} cases per dataset{extra}"


def markdown(rows: list[Row], methods: list[str], meta: dict[str, Any]) -> str:
    """Table 1 as GitHub markdown, with a provenance header and footnotes for every '-'."""
    notes: dict[str, int] = {}
    lines = [f"# Table 1: knowledge editing on {meta['model']}", "",
             f"Model `{meta['model']}` (fingerprint `{meta['model_fingerprint']}`), lmedit {meta['lmedit_version']}"
             f" (commit `{meta.get('commit') or 'unknown'}`). Setting: {meta['setting_label']}. "
             f"N = {_n_text(meta)} (per-cell N in table1.csv). Values x100; "
             "best per row in **bold**." + _generation_text(meta, rows) + _drift_text(meta, rows), "",
             "| Dataset | Metric | Protocol | Pre-edit | " + " | ".join(methods) + " |",
             "|---|---|---|---:|" + "---:|" * len(methods)]
    last = None
    for row in rows:
        best = row.best()
        cells = []
        for m in methods:
            v = row.values.get(m)
            if v is None:
                k = notes.setdefault(row.reasons.get(m, "not run"), len(notes) + 1)
                cells.append(f"-[^{k}]")
            else:
                cells.append(f"**{_fmt(v, row.ratio)}**" if m in best else _fmt(v, row.ratio))
        ds = DATASET_LABELS.get(row.dataset, row.dataset) if row.dataset != last else ""
        last = row.dataset
        lines.append(f"| {ds} | {row.label} | {row.protocol} | {_fmt(row.pre)} | " + " | ".join(cells) + " |")
    lines += ["", "Protocols: " + "; ".join(f"`{p}`: {PROTOCOL_TEXT.get(p, p)}"
                                            for p in dict.fromkeys(r.protocol for r in rows)) + "."]
    if meta.get("reused"):
        lines += ["", "Cases taken from earlier `lmedit bench` runs (`--reuse`; the same method, config, model and "
                      "cases): " + "; ".join(f"{name} {r['cases']} from `{r['from']}`"
                                             for name, r in meta["reused"].items()) + "."]
    if notes:
        lines.append("")
        lines += [f"[^{k}]: {reason}" for reason, k in notes.items()]
    return "\n".join(lines) + "\n"


def headline_markdown(rows: list[Row], methods: list[str], meta: dict[str, Any]) -> str | None:
    """headline.md: the gap between the protocols on one line per dataset and metric. Each method's cell reads
    "teacher-forced · generated, exact match · generated, answer contained" (Locality: agreement with the
    unedited model · the generated answer unchanged). None when the table has no generation rows."""
    if not any(is_gen_key(r.metric) for r in rows):
        return None
    by = {(r.dataset, r.metric): r for r in rows}
    lines = [f"# Teacher-forced vs generated: {meta['model']}", "",
             f"{meta['setting_label']}; N = {_n_text(meta)}; values x100. Each cell: **teacher-forced** "
             "(`token_acc`) · **generated, exact match** (`gen_em`) · **generated, answer contained** "
             "(`gen_contains`); Locality: teacher-forced agreement with the unedited model · the generated answer "
             "unchanged (`gen_em`). The full table with every protocol's row: table1.md.", "",
             "| Dataset | Metric | Pre-edit | " + " | ".join(methods) + " |",
             "|---|---|---|" + "---|" * len(methods)]
    notes: dict[str, int] = {}
    for ds in dict.fromkeys(r.dataset for r in rows):
        label = DATASET_LABELS.get(ds, ds)
        for metric in CORE_ROWS:
            parts = [by[k] for k in ((ds, metric), (ds, f"{metric}@{GEN_EM}"), (ds, f"{metric}@{GEN_CONTAINS}"))
                     if k in by]
            if (ds, metric) not in by or len(parts) < 2:
                continue
            cells = [" · ".join(_fmt(p.values.get(m)) or "-" for p in parts) + _fewer_cases(parts, m, notes)
                     for m in methods]
            pre = " · ".join(_fmt(p.pre) or "–" for p in parts) if parts[0].pre is not None else ""
            lines.append(f"| {label} | {METRIC_LABELS[metric]} | {pre} | " + " | ".join(cells) + " |")
            label = ""
    if notes:
        lines.append("")
        lines += [f"[^{k}]: {text}" for text, k in notes.items()]
    return "\n".join(lines) + "\n"


def _fewer_cases(parts: list[Row], method: str, notes: dict[str, int]) -> str:
    """A footnote marker when the generation protocol scored fewer of a cell's cases than teacher forcing did
    (a gold answer that normalisation leaves empty, such as ')', cannot score a generated answer), so that
    no one reads its percentage as out of the full N."""
    tf, gen = parts[0].cases.get(method, 0), parts[1].cases.get(method, 0)
    if not tf or not gen or gen >= tf:
        return ""
    text = (f"generated: scored on {gen} of the {tf} cases (a gold answer with no words after normalisation, "
            "e.g. ')', cannot be matched; the run's log names each case left out)")
    return f"[^{notes.setdefault(text, len(notes) + 1)}]"


def gap_entries(rows: list[Row], methods: list[str]) -> list[dict[str, Any]]:
    """One entry per (dataset, method) with its core metrics under every protocol (``plots.gap``'s input)."""
    out = []
    for ds in dict.fromkeys(r.dataset for r in rows):
        for m in methods:
            scores = {r.metric: r.values.get(m) for r in rows
                      if r.dataset == ds and split_key(r.metric)[0] in CORE_ROWS}
            if any(v is not None for v in scores.values()):
                out.append({"method": m, "dataset": DATASET_LABELS.get(ds, ds), **scores})
    return out


def _drift_text(meta: dict[str, Any], rows: list[Row]) -> str:
    if not any(r.ratio for r in rows):
        return ""
    return (f" Perplexity drift rows: perplexity on {meta.get('drift_tokens') or '?'} WikiText-2 tokens after the "
            "edits divided by the unedited model's (a ratio, not x100; 1.000 = no drift; averaged over sequences).")


def _generation_text(meta: dict[str, Any], rows: list[Row]) -> str:
    gen = meta.get("generation")
    if not gen or not any((split_key(r.metric)[1] or "").startswith(GEN) for r in rows):
        return ""
    return (f" Generation rows: context `{gen['context']}`, at most {gen['max_new_tokens']} new tokens, "
            "greedy; never averaged with the teacher-forced rows.")


PROTOCOL_TEXT = {
    "token_acc": "teacher-forced token accuracy of the answer after the prompt (EasyEdit); Locality = agreement "
                 "of the edited model's argmax tokens with the unedited model's",
    "greedy_exact": "a case counts if, after all its edits, the greedy continuation of any of its multi-hop "
                    "questions begins with the new answer or an alias (checked by teacher forcing: every "
                    "answer token is the argmax)",
    "prob_compare": "CounterFact probability comparison P(new) > P(true) (ROME)",
    GEN_EM: "free greedy generation (stops at EOS, the first line break after the answer has begun, or the "
            "token cap), normalised exact match of the answer's first line with the gold; Locality = the "
            "edited model's answer equals the unedited model's; Locality (ground truth) = equals the dataset's answer",
    GEN_F1: "token F1 of the same generated answer against the gold (Locality: against the unedited model's answer)",
    GEN_CONTAINS: "the normalised gold occurs in the same generated answer (lenient)",
    GEN_JUDGE: "an LLM judge grades the same generated answer CORRECT (SimpleQA rubric)",
    DRIFT_PROTOCOL: "capability drift: WikiText-2 perplexity of the edited model / of the unedited model (a ratio; "
                    "above 1 = the edits made the model worse at ordinary text)",
}

CSV_COLUMNS = ("dataset", "metric", "method", "value", "protocol", "n_cases", "status", "reason", "setting",
               "model", "model_fingerprint", "config_hash", "lmedit_version", "commit")


def long_records(rows: list[Row], cells: list[CellResult], meta: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per (row, method): the number with its protocol, N and provenance."""
    by = {(c.spec.method, c.spec.dataset): c for c in cells}
    out = []
    for row in rows:
        for m, v in row.values.items():
            cell = by.get((m, row.dataset))
            out.append({
                "dataset": row.dataset, "metric": row.metric, "method": m, "value": v,
                "protocol": row.protocol if v is not None else None, "n_cases": row.cases.get(m),
                "status": cell.status if cell else "not run", "reason": row.reasons.get(m, ""),
                "setting": meta["setting_label"], "model": meta["model"],
                "model_fingerprint": meta["model_fingerprint"],
                "config_hash": cell.key.get("config_hash") if cell else None,
                "lmedit_version": meta["lmedit_version"], "commit": meta.get("commit"),
            })
    return out


def to_csv(records: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in records:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS})
    return buf.getvalue()
