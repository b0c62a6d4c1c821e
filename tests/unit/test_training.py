"""The training pipeline without a language model: data checks, the loop, checkpoints, resume, early stop."""

from __future__ import annotations

import json

import pytest
import torch

from lmedit.training import checkpoint as ckpt
from lmedit.training.data import batch_for_step, examples_from_cases, split
from lmedit.training.trainer import Trainer, TrainSettings
from lmedit.types import QA, EditCase, EditInputError, EditRequest

LOC = QA("loc q", "a")


def case(i: int, paraphrase: str | None = "rephrased", loc: QA | None = LOC) -> EditCase:
    req = EditRequest(prompt=f"Subject{i} lives in", subject=f"Subject{i}", target_new=f"City{i}", case_id=i)
    return EditCase(req, paraphrases=(paraphrase,) if paraphrase else (), locality=(loc,) if loc else (),
                    source=f"toy#{i}")


def test_examples_need_rephrase_and_locality():
    assert [ex.rephrase for ex in examples_from_cases([case(0), case(1)])] == ["rephrased", "rephrased"]
    with pytest.raises(EditInputError, match="toy#1.*paraphrase"):
        examples_from_cases([case(0), case(1, paraphrase=None)])
    with pytest.raises(EditInputError, match="toy#2.*locality"):
        examples_from_cases([case(0), case(2, loc=None)])
    with pytest.raises(EditInputError, match="locality"):
        examples_from_cases([case(3, loc=QA("q", " "))])
    with pytest.raises(EditInputError, match="no training cases"):
        examples_from_cases([])


def test_split_holds_back_the_tail_and_batches_are_reproducible():
    ex = examples_from_cases([case(i) for i in range(10)])
    train, val = split(ex, 3)
    assert [e.request.case_id for e in val] == [7, 8, 9] and len(train) == 7
    assert len(split(ex, 100)[1]) == 5  # at most half
    assert batch_for_step(train, 5, 3, seed=1) == batch_for_step(train, 5, 3, seed=1)
    assert batch_for_step(train, 5, 3, seed=1) != batch_for_step(train, 6, 3, seed=1)


class Toy:
    """Linear regression toward a target vector: a stand-in objective with a known optimum."""

    def __init__(self, plateau: bool = False) -> None:
        torch.manual_seed(0)
        self.w = torch.nn.Parameter(torch.zeros(4))
        self.goal = torch.tensor([1.0, -2.0, 0.5, 3.0])
        self.plateau = plateau

    def param_groups(self):
        return [{"params": [self.w], "lr": 0.0 if self.plateau else 0.05}]

    def _loss(self, batch):
        scale = sum(int(ex.request.case_id) for ex in batch) / (10 * len(batch)) + 0.5
        return ((self.w - self.goal) ** 2).sum() * scale

    def train_step(self, batch):
        loss = self._loss(batch)
        return loss, {"edit_acc": 0.0, "loc_kl": 0.0}

    @torch.no_grad()
    def val_step(self, batch):
        return {"loss": float(self._loss(batch))}

    def state_tensors(self):
        return {"w": self.w.detach().clone()}

    def load_state_tensors(self, t):
        with torch.no_grad():
            self.w.copy_(t["w"])


INFO = {"method": "toy", "model_name": "m", "model_fingerprint": "abc", "config": {"lr": 1}}
SETTINGS = TrainSettings(steps=40, batch_size=2, val_every=10, val_batches=0, patience=0, seed=3)


def run_toy(out=None, on_step=None, resume=False, settings=SETTINGS, plateau=False):
    obj = Toy(plateau)
    tr = Trainer(obj, settings, INFO, out=out, on_step=on_step)
    if resume:
        tr.resume()
    ex = examples_from_cases([case(i) for i in range(8)])
    train, val = split(ex, 2)
    return obj, tr, tr.run(train, val)


def test_loop_learns_and_writes_checkpoints(tmp_path):
    obj, _, res = run_toy(tmp_path)
    assert res.steps_done == 40 and len(res.history) == 4
    assert res.history[-1]["val_loss"] < res.history[0]["val_loss"]
    info, tensors = ckpt.read(tmp_path, ckpt.TRAIN, method="toy", fingerprint="abc")
    assert info["step"] == 40 and "optim.0.exp_avg" in tensors


def test_interrupted_run_resumes_exactly(tmp_path):
    full, _, _ = run_toy(tmp_path / "full")

    def boom(step, _metrics):
        if step == 27:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_toy(tmp_path / "cut", on_step=boom)
    assert json.loads((tmp_path / "cut" / "train.json").read_text())["step"] == 20  # lost 7 < val_every steps
    resumed, tr, res = run_toy(tmp_path / "cut", resume=True)
    assert res.steps_done == 40 and [h["step"] for h in res.history] == [10, 20, 30, 40]
    assert torch.equal(resumed.w, full.w)  # the same batches and optimiser state: bit-identical


def test_early_stop_on_plateau(tmp_path):
    s = TrainSettings(steps=100, batch_size=2, val_every=5, val_batches=0, patience=2)
    _, _, res = run_toy(None, settings=s, plateau=True)
    assert res.stopped_early and res.steps_done == 15  # best at 5, no improvement at 10 and 15


class Constrained(Toy):
    """The toy with a constraint (KL <= 0.1, as KE's m_KL) that only the 2nd and 3rd validations keep."""

    def __init__(self) -> None:
        super().__init__()
        self.kls = iter([0.5, 0.05, 0.0, 0.3])

    @torch.no_grad()
    def val_step(self, batch):
        return {"loss": float(self._loss(batch)), "loc_kl": self.kl}

    def constraint_violation(self, metrics):
        return metrics["loc_kl"] - 0.1


def test_best_checkpoint_keeps_the_constraint(tmp_path):
    obj = Constrained()
    s = TrainSettings(steps=40, batch_size=2, val_every=10, val_batches=1, patience=0, seed=3)
    tr = Trainer(obj, s, INFO, out=tmp_path)
    saved = {}
    real_validate = tr.validate

    def validate(val):  # one KL per validation, and remember the weights each validation saw
        obj.kl = next(obj.kls)
        saved[tr.step] = obj.w.detach().clone()
        return real_validate(val)

    tr.validate = validate
    train, val = split(examples_from_cases([case(i) for i in range(8)]), 2)
    res = tr.run(train, val)
    losses = [h["val_loss"] for h in res.history]
    assert losses == sorted(losses, reverse=True)  # the loss alone would pick the last, infeasible, step
    assert [h["violation"] for h in res.history] == pytest.approx([0.4, 0.0, 0.0, 0.2])
    assert res.best_val == pytest.approx(losses[2])  # the better of the two feasible validations
    assert torch.equal(obj.w, saved[30])
    assert json.loads((tmp_path / "best.json").read_text())["step"] == 30


def test_resumed_old_checkpoint_recovers_the_best_violation(tmp_path):
    obj = Constrained()
    s = TrainSettings(steps=10, batch_size=2, val_every=10, val_batches=1, patience=0, seed=3)
    tr = Trainer(obj, s, INFO, out=tmp_path)
    obj.kl = 0.5  # the only validation breaks the constraint
    train, val = split(examples_from_cases([case(i) for i in range(8)]), 2)
    tr.run(train, val)
    info = json.loads((tmp_path / "train.json").read_text())
    del info["best_violation"]  # as written before constraints decided the best checkpoint
    (tmp_path / "train.json").write_text(json.dumps(info))
    again = Trainer(Constrained(), s, INFO, out=tmp_path)
    again.resume()
    assert again.best_violation == pytest.approx(0.4)


class WithMultiplier(Toy):
    """Toy plus a Lagrange-multiplier-like parameter whose gradient is huge and kept out of the clip."""

    def __init__(self) -> None:
        super().__init__()
        self.lam = torch.nn.Parameter(torch.ones(()))
        self.seen: list[float] = []

    def param_groups(self):
        return [{"params": [self.w], "lr": 0.05}, {"params": [self.lam], "lr": 0.5, "clip": False}]

    def train_step(self, batch):
        loss, metrics = super().train_step(batch)
        return loss + 1e6 * self.lam, metrics

    def after_step(self):
        self.seen.append((float(self.w.grad.norm()), float(self.lam.grad)))
        with torch.no_grad():
            self.lam.clamp_(min=0.0)


def test_groups_marked_clip_false_stay_out_of_the_clipped_norm_and_after_step_runs():
    obj = WithMultiplier()
    s = TrainSettings(steps=3, batch_size=2, val_every=10, val_batches=0, patience=0, grad_clip=1.0)
    tr = Trainer(obj, s, INFO)
    ex = examples_from_cases([case(i) for i in range(8)])
    train, val = split(ex, 2)
    tr.run(train, val)
    assert len(obj.seen) == 3, "after_step runs once per step"
    w_norm, lam_grad = obj.seen[0]
    assert lam_grad == pytest.approx(1e6), "the multiplier's gradient is not clipped"
    assert w_norm == pytest.approx(1.0, rel=1e-4), "the editor's gradient is clipped on its own norm"
    assert float(obj.lam) == 0.0, "after_step's clamp holds the multiplier at 0"


def test_constraint_ranking_feasible_then_violation_then_loss():
    tr = Trainer(Toy(), SETTINGS, INFO)
    assert tr._improves(0.5, 9.0)  # anything beats nothing
    tr.best_val, tr.best_violation = 9.0, 0.5
    assert tr._improves(0.2, 10.0) and not tr._improves(0.7, 1.0)  # closer to feasible wins over loss
    assert tr._improves(0.0, 50.0)  # feasible beats infeasible
    tr.best_val, tr.best_violation = 5.0, 0.0
    assert not tr._improves(0.01, 0.1) and tr._improves(0.0, 4.0) and not tr._improves(0.0, 6.0)


def test_checkpoint_refuses_other_method_model_and_corruption(tmp_path):
    run_toy(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="method 'toy', not 'mend'"):
        ckpt.read(tmp_path, ckpt.TRAIN, method="mend", fingerprint="abc")
    with pytest.raises(ckpt.CheckpointError, match="trained on model 'm'"):
        ckpt.read(tmp_path, ckpt.TRAIN, method="toy", fingerprint="other", model_name="x")
    path = ckpt.tensor_file(tmp_path, ckpt.TRAIN)
    assert sorted(p.name for p in tmp_path.glob("train.*.safetensors")) == [path.name]  # older ones removed
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="corrupted"):
        ckpt.read(tmp_path, ckpt.TRAIN, method="toy", fingerprint="abc")
    (tmp_path / "best.json").write_text("{not json")
    with pytest.raises(ckpt.CheckpointError, match="corrupted"):
        ckpt.read(tmp_path, ckpt.BEST, method="toy", fingerprint="abc")
    with pytest.raises(FileNotFoundError):
        ckpt.read(tmp_path / "nowhere", ckpt.TRAIN, method="toy", fingerprint="abc")


def test_resume_refuses_a_changed_config(tmp_path):
    run_toy(tmp_path)
    tr = Trainer(Toy(), SETTINGS, {**INFO, "config": {"lr": 2}}, out=tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="differs in \\['lr'\\]"):
        tr.resume()


def test_untrained_editor_says_which_command_to_run(tiny_llama):
    from lmedit.cli._hints import hint
    from lmedit.methods.trained import NotTrainedError
    from lmedit.registry import get_editor

    for name in ("mend", "ke", "serac"):
        with pytest.raises(NotTrainedError, match="editor.fit") as info:
            get_editor(name).compute(tiny_llama, [case(0).request])
        assert "--" not in str(info.value)  # the library speaks Python; the CLI adds its flags
        assert info.value.data["train"] == {"method": name, "model": "tiny-llama", "dataset": "zsre"}
        assert f"lmedit train --method {name} --model tiny-llama" in hint(info.value)


def test_library_errors_carry_the_option_and_the_cli_names_its_flag(capsys):
    from lmedit.cli import main
    from lmedit.table import resolve_methods

    with pytest.raises(ValueError, match="no methods given") as info:
        resolve_methods(",")
    assert info.value.data == {"option": "methods"} and "--" not in str(info.value)
    assert main(["table", "--methods", ",", "--out", "unused"]) == 1
    assert "--methods" in capsys.readouterr().err


def test_train_cli_parses_and_refuses_untrained_methods(capsys):
    from lmedit.cli import main

    assert main(["train", "--method", "rome", "--model", "nowhere"]) == 1
    assert "needs no training" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["gpt2", "gptj", "gpt_neox", "llama"])
def test_prefix_cache_gives_the_same_losses_and_restores_the_model(family, tokenizer):
    from conftest import make_handle
    from lmedit.training.functional import answer_logprobs, capture_grads
    from lmedit.training.prefix import PrefixCache

    handle = make_handle(family, tokenizer)
    modules = [(n, type(m)) for n, m in handle.model.named_modules()]
    prompts, answers = ["The capital of France is", "Tokyo is in"], ["Paris", "Japan"]
    prefix = PrefixCache(handle, first_layer=2)
    want, _, _ = answer_logprobs(handle, prompts, answers)
    for _ in range(2):  # filled on the first call, read from the store on the second
        got, _, _ = answer_logprobs(handle, prompts, answers, prefix)
        assert prefix.enabled and len(prefix.store) == 2
        assert torch.allclose(got, want, atol=1e-5)
    path = handle.adapter.mlp_out.format(3)
    slow, *_ = capture_grads(handle, [path], prompts, answers)
    fast, *_ = capture_grads(handle, [path], prompts, answers, prefix)
    assert torch.allclose(slow[path][1], fast[path][1], atol=1e-6)
    assert [(n, type(m)) for n, m in handle.model.named_modules()] == modules


def test_prefix_cache_is_off_for_encoder_decoder(tokenizer):
    from conftest import make_handle
    from lmedit.training.prefix import PrefixCache

    assert not PrefixCache(make_handle("t5", tokenizer), first_layer=1).enabled


def test_time_budget_ends_with_a_checkpoint(tmp_path):
    s = TrainSettings(steps=100, batch_size=2, val_every=50, val_batches=0, patience=0, max_seconds=1e-9)
    _, _, res = run_toy(tmp_path, settings=s)
    assert res.steps_done == 1 and [h["step"] for h in res.history] == [1]
    assert json.loads((tmp_path / "train.json").read_text())["step"] == 1


def test_train_cli_end_to_end_on_a_saved_tiny_model(tmp_path, tokenizer, capsys):
    from conftest import make_model
    from lmedit.cli import main
    from lmedit.registry import get_editor

    model_dir = tmp_path / "tiny"
    make_model("llama").save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "run"
    args = ["train", "--method", "mend", "--model", str(model_dir), "--dataset", "zsre", "--n", "6", "--quick",
            "--out", str(out), "--device", "cpu", "--plot", str(tmp_path / "curve.png")]
    assert main(args) == 0
    assert json.loads((out / "editor.json").read_text())["steps_done"] == 8
    assert (tmp_path / "curve.png").stat().st_size > 0
    assert main(args) == 1 and "--resume" in capsys.readouterr().err  # never overwrites a run silently
    assert main([*args, "--resume", "--steps", "12"]) == 0
    info = json.loads((out / "editor.json").read_text())
    assert info["steps_done"] == 12 and [h["step"] for h in info["history"]] == [4, 8, 12]
    from lmedit.models.loading import load_model

    handle = load_model(str(model_dir), device="cpu")
    get_editor("mend", checkpoint=str(out)).compute(handle, [case(0).request])
