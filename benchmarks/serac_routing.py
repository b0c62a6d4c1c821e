"""Does SERAC's scope classifier route the right prompts? Routing rates, apart from the counterfactual model.

For each of the first N cases: make the SERAC edit (one memory entry), then ask the router which prompts it
sends to that entry: the edit prompt and its paraphrases should go there; the locality and neighbourhood
prompts should not (a false positive sends an unrelated prompt to the counterfactual model).

    python benchmarks/serac_routing.py --checkpoint runs/serac-counterfact --dataset counterfact --n 60
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import lmedit
from lmedit.data import load_dataset


def routing(handle, checkpoint: str, dataset: str, n: int) -> dict[str, int]:
    editor = lmedit.get_editor("serac", checkpoint=checkpoint)
    got = {"edit": 0, "paraphrase": 0, "n_paraphrase": 0, "false_positive": 0, "n_unrelated": 0}
    for case in load_dataset(dataset, n=n):
        edit = editor.compute(handle, [case.request])
        (router,) = edit.modules.values()
        router.bind(handle)
        got["edit"] += router.route([case.request.text])[0] == 0
        para = router.route(list(case.paraphrases))
        got["paraphrase"] += sum(i == 0 for i in para)
        got["n_paraphrase"] += len(para)
        unrelated = [q.prompt for q in case.locality] + [getattr(q, "prompt", q) for q in case.neighborhood]
        hits = router.route(unrelated)
        got["false_positive"] += sum(i >= 0 for i in hits)
        got["n_unrelated"] += len(hits)
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="an `lmedit train --method serac` output folder")
    ap.add_argument("--dataset", default="counterfact")
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default="benchmarks/results/serac_routing.md")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    handle = lmedit.load_model(args.model)
    g = routing(handle, args.checkpoint, args.dataset, args.n)
    line = (f"| `{Path(args.checkpoint).name}` | {args.dataset} | {args.n} | {g['edit']}/{args.n} | "
            f"{g['paraphrase']}/{g['n_paraphrase']} | {g['false_positive']}/{g['n_unrelated']} |")
    out = Path(args.out)
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("# SERAC routing (scope classifier only)\n\n"
                       "`python benchmarks/serac_routing.py --checkpoint DIR --dataset D --n N`: where the router "
                       "sends each prompt after a single edit.\n\n"
                       "| checkpoint | dataset | cases | edit prompts routed | paraphrases routed | unrelated prompts "
                       "routed (false positives) |\n|---|---|---:|---:|---:|---:|\n")
    with out.open("a") as f:
        f.write(line + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
