"""Label-free selection: DEV and IWV risks, the held-out source split, and the run that logs them."""

from __future__ import annotations

import json

import pytest
import torch

from mmtransfer.selection import dev_risk, label_free_risk, rank_agreement, select


def _shifted_problem(n: int = 2000, seed: int = 0):
    """1-D features: source N(0, 1), target N(1.5, 1). Returns holdout features, target features."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, generator=g), torch.randn(n, 1, generator=g) + 1.5


def _losses(x: torch.Tensor, good_side: str) -> torch.Tensor:
    """A checkpoint's per-example losses: low on one side of x = 0.75, high on the other."""
    right = x[:, 0] > 0.75
    low, high = torch.full_like(x[:, 0], 0.1), torch.full_like(x[:, 0], 1.5)
    return torch.where(right, low, high) if good_side == "right" else torch.where(right, high, low)


def test_dev_picks_the_checkpoint_that_is_better_on_the_target():
    """Source loss prefers the checkpoint that is good where the source lives; DEV the one good where the target lives."""
    xs, xt = _shifted_problem()
    candidates = {"fits_source": _losses(xs, "left"), "fits_target": _losses(xs, "right")}
    true_target_loss = {k: float(_losses(xt, side).mean()) for k, side in (("fits_source", "left"), ("fits_target", "right"))}
    assert min(true_target_loss, key=true_target_loss.get) == "fits_target"
    risks = {k: label_free_risk(xs, losses, xt, seed=0) for k, losses in candidates.items()}
    assert select(risks, by="source") == "fits_source"  # the naive choice is wrong here
    assert select(risks, by="dev") == "fits_target"
    assert select(risks, by="iwv") == "fits_target"
    # And the estimates land near the true target losses (within 0.25 of about 1.0 and 0.5).
    for k, risk in risks.items():
        assert abs(risk.dev - true_target_loss[k]) < 0.25, (k, risk, true_target_loss)


def test_dev_control_variate_corrects_weights_whose_mean_is_off():
    """Weights all scaled by 2 double IWV; DEV's control variate pulls the estimate back to the weighted mean's level."""
    g = torch.Generator().manual_seed(1)
    losses = torch.rand(5000, generator=g)
    weights = torch.rand(5000, generator=g) * 2  # mean about 1, independent of the losses
    plain = dev_risk(losses, weights)
    doubled = dev_risk(losses, 2 * weights)
    assert doubled.iwv == pytest.approx(2 * plain.iwv, rel=1e-9)
    assert abs(doubled.dev - float(losses.mean())) < 0.05 and abs(plain.dev - float(losses.mean())) < 0.05
    assert 0 < plain.ess <= 1


def test_dev_risk_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match="two \\(N,\\) tensors"):
        dev_risk(torch.ones(3), torch.ones(4))


def test_select_and_rank_agreement():
    assert select({"a": {"dev": 0.5}, "b": {"dev": 0.2}}) == "b"
    with pytest.raises(ValueError, match="Unknown risk"):
        select({"a": {"dev": 0.5}}, by="accuracy")
    assert rank_agreement([0.1, 0.2, 0.3], [90.0, 80.0, 70.0]) == pytest.approx(1.0)
    assert rank_agreement([0.1, 0.2, 0.3], [70.0, 80.0, 90.0]) == pytest.approx(-1.0)


def test_hold_out_is_stratified_disjoint_and_seeded():
    from datasets import ClassLabel, Dataset, Features, Value

    from mmtransfer.assemble.selection_run import hold_out

    features = Features({"label": ClassLabel(names=["a", "b"]), "image_id": Value("int64")})
    ds = Dataset.from_dict({"label": [0] * 80 + [1] * 20, "image_id": list(range(100))}, features=features)
    kept, held = hold_out(ds, 0.1, seed=3)
    assert len(held) == 10 and len(kept) == 90
    assert sorted(held["label"]).count(1) == 2  # 10% of each class
    assert not set(kept["image_id"]) & set(held["image_id"])
    assert hold_out(ds, 0.1, seed=3)[1]["image_id"] == held["image_id"]
    with pytest.raises(ValueError, match="selection.holdout"):
        hold_out(ds, 0.001, seed=0)


def test_lowest_risk_step_reads_the_metrics_log():
    from mmtransfer.assemble.selection_run import lowest_risk_step

    rows = [{"step": 10, "train/loss": 1.0}, {"step": 500, "eval/dev_risk": 0.4, "eval/iwv_risk": 0.5},
            {"step": 1000, "eval/dev_risk": 0.3, "eval/iwv_risk": 0.6}, {"step": 1500, "eval/dev_risk": 0.35, "eval/iwv_risk": 0.2}]
    chosen = lowest_risk_step(rows)
    assert chosen["best_step"] == 1000 and set(chosen["risks"]) == {500, 1000, 1500}
    assert lowest_risk_step([{"step": 1}]) is None


@pytest.mark.slow
def test_domain_run_logs_label_free_risks_and_the_benchmark_recomputes_them(tmp_path, run_script):
    run = tmp_path / "dann_holdout"
    run_script("scripts/domain_adapt.py", "--config", "configs/digits_mnist_usps_dann.yaml", "--fast-dev-run",
               "selection.holdout=0.25", f"train.output_dir={run}")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["selection"]["best_step"] == 2 and summary["selection"]["by"] == "dev"
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "eval/dev_risk" in line]
    assert evals and {"eval/iwv_risk", "eval/holdout_loss", "eval/holdout_acc"} <= set(evals[-1])
    # benchmarks/domain_selection.py scores the saved model on the same held-out rows: the same DEV risk.
    out = run_script("benchmarks/domain_selection.py", str(run), "--clip", "10").stdout
    row = next(line for line in out.splitlines() if line.startswith("| run |"))
    assert "DEV clip 10" in row and "**picks**" in out
    values = next(line for line in out.splitlines() if line.startswith(f"| {run.name} |")).split("|")
    assert float(values[5]) == pytest.approx(evals[-1]["eval/dev_risk"], rel=1e-3)


def test_selection_needs_a_classifier_and_a_target(tmp_path, run_script):
    proc = run_script("scripts/domain_adapt.py", "--config", "configs/digits_mnist_usps_source_only.yaml", "selection.holdout=0.1",
                      "data.target=null", f"train.output_dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2 and "selection.holdout needs" in proc.stderr
