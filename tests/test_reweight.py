"""Importance re-weighting: density ratios on toy problems with a known ratio, weights in the losses, save/restore."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from mmtransfer.assemble.domains import AdaptConfig, check_config
from mmtransfer.config import ConfigError
from mmtransfer.losses.contrastive import ContrastiveLoss
from mmtransfer.losses.reweight import (
    classifier_density_ratio,
    clip_and_normalise,
    effective_sample_size,
    estimate_importance_weights,
    kmm_density_ratio,
    plot_weights,
    weight_stats,
)
from mmtransfer.models.classifier import BackboneClassifier, ClassifierConfig
from mmtransfer.models.lenet import LeNetConfig
from mmtransfer.objectives.base import StepInfo
from mmtransfer.objectives.domain import ClassifyAdaptTask, MethodConfig, weighted_mean

# Each test starts with no Accelerate state left by the one before (conftest.py).
pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")


def _gaussians(n: int = 2000, seed: int = 0):
    """Source N(0, I), target N(mu, I) in 2-D: the true ratio is exp(x . mu - |mu|^2 / 2)."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.tensor([0.7, -0.4])
    xs = torch.randn(n, 2, generator=g)
    xt = torch.randn(n, 2, generator=g) + mu
    true = torch.exp(xs @ mu - 0.5 * mu.dot(mu))  # (n,)
    bulk = (xs - 0.5 * mu).norm(dim=1) < 2.0  # where both densities have mass
    return xs, xt, true, bulk


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1])


# ----------------------------------------------------------------------------- the estimators


def test_classifier_ratio_matches_the_known_ratio_of_two_gaussians():
    xs, xt, true, bulk = _gaussians()
    ratio, info = classifier_density_ratio(xs, xt, folds=5)
    assert _corr(ratio, true) > 0.95
    rel = ((ratio - true).abs() / true)[bulk]
    assert float(rel.median()) < 0.1 and float(rel.quantile(0.9)) < 0.25
    assert abs(float(ratio.mean()) - 1.0) < 0.1  # E_source[p_t / p_s] = 1
    assert info["l2"] in (1e-4, 1e-3, 1e-2, 1e-1, 1.0) and 0.5 < info["platt_a"] < 2.0


def test_classifier_ratio_corrects_for_unequal_sample_sizes():
    """The (n_s / n_t) factor removes the classifier's prior: 4x more target rows must not change the ratio."""
    xs, _, true, bulk = _gaussians(1000, seed=1)
    _, xt, _, _ = _gaussians(4000, seed=2)
    ratio, _ = classifier_density_ratio(xs, xt)
    assert _corr(ratio, true) > 0.95
    assert float(((ratio - true).abs() / true)[bulk].median()) < 0.15


def test_kmm_ratio_matches_the_known_ratio():
    xs, xt, true, bulk = _gaussians(1500)
    ratio, info = kmm_density_ratio(xs, xt)
    assert _corr(ratio, true) > 0.9
    assert float(((ratio - true).abs() / true)[bulk].median()) < 0.2
    assert float(ratio.mean()) == pytest.approx(1.0, abs=1e-3) and float(ratio.min()) >= 0.0
    assert info["bandwidth"] > 0


def test_equal_domains_give_flat_weights():
    g = torch.Generator().manual_seed(0)
    iw = estimate_importance_weights(torch.randn(1000, 3, generator=g), torch.randn(1000, 3, generator=g))
    s = iw.stats()
    assert s["ess_fraction"] > 0.95 and 0.5 < s["min"] and s["max"] < 1.6


def test_clip_and_normalise_mean_one_and_bounded():
    ratio = torch.tensor([0.0, 0.5, 1.0, 2.0, 500.0, 1000.0])
    w = clip_and_normalise(ratio, clip_max=3.0)
    assert float(w.mean()) == pytest.approx(1.0, abs=1e-6) and float(w.max()) <= 3.0 + 1e-6
    assert torch.all(w[1:].diff() >= -1e-7)  # the order is kept
    torch.testing.assert_close(clip_and_normalise(torch.tensor([2.0, 4.0]), None), torch.tensor([2 / 3, 4 / 3]))
    with pytest.raises(ValueError, match="above 1"):
        clip_and_normalise(ratio, clip_max=1.0)
    with pytest.raises(ValueError, match="negative or non-finite"):
        clip_and_normalise(torch.tensor([1.0, float("nan")]))


def test_flattening_power_interpolates_between_no_weights_and_the_ratio():
    xs, xt, _, _ = _gaussians(500)
    flat = estimate_importance_weights(xs, xt, power=0.0).weights
    torch.testing.assert_close(flat, torch.ones(500))
    half, full = (estimate_importance_weights(xs, xt, power=p, clip_max=None).weights for p in (0.5, 1.0))
    assert effective_sample_size(full) < effective_sample_size(half) < 500


def test_effective_sample_size_and_stats():
    assert effective_sample_size(torch.ones(8)) == pytest.approx(8.0)
    assert effective_sample_size(torch.tensor([4.0, 0.0, 0.0, 0.0])) == pytest.approx(1.0)
    s = weight_stats(torch.tensor([0.5, 0.5, 2.0, 1.0]), clip_max=2.0)
    assert s["max"] == 2.0 and s["clipped_fraction"] == 0.25 and s["ess"] == pytest.approx(16 / 5.5)


def test_weight_plot_is_written(tmp_path):
    xs, xt, _, _ = _gaussians(300)
    iw = estimate_importance_weights(xs, xt)
    path = plot_weights(iw, tmp_path / "w.png", torch.arange(300) % 3, ["a", "b", "c"], clip_max=10.0)
    assert path.is_file() and path.stat().st_size > 1000


# ----------------------------------------------------------------------------- weights in the losses


def test_weighted_cross_entropy_in_the_classify_task():
    torch.manual_seed(0)
    model = BackboneClassifier(ClassifierConfig(lenet=LeNetConfig(channels=[4, 8], image_size=16), bottleneck_dim=16, dropout=0.0), 3).eval()
    task = ClassifyAdaptTask(model, MethodConfig(name="none"))
    x, y = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    w = torch.tensor([0.0, 1.0, 2.0, 0.5, 0.5, 2.0])
    out = task({"source": {"pixel_values": x, "labels": y, "weight": w}}, StepInfo(0, 1))
    ce = F.cross_entropy(model(x).logits, y, reduction="none")
    torch.testing.assert_close(out.metrics["cls_loss"], (w * ce).sum() / w.sum())
    plain = task({"source": {"pixel_values": x, "labels": y}}, StepInfo(0, 1))
    ones = task({"source": {"pixel_values": x, "labels": y, "weight": torch.ones(6)}}, StepInfo(0, 1))
    torch.testing.assert_close(plain.loss, ones.loss)
    assert float(weighted_mean(torch.tensor([1.0, 3.0]), torch.tensor([3.0, 1.0]))) == 1.5


def test_weighted_contrastive_loss_on_one_process():
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(6, 8), dim=-1), F.normalize(torch.randn(6, 8), dim=-1)
    loss = ContrastiveLoss()
    torch.testing.assert_close(loss(img, txt, torch.tensor(10.0), weights=torch.ones(6) * 3).loss, loss(img, txt, torch.tensor(10.0)).loss)
    # A zero weight removes the pair's rows from both directions' means (it stays a negative for the others).
    w = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    ref = ContrastiveLoss()
    logits = 10.0 * img @ txt.T
    rows = (F.cross_entropy(logits, torch.arange(6), reduction="none") + F.cross_entropy(logits.T, torch.arange(6), reduction="none")) / 2
    torch.testing.assert_close(ref(img, txt, torch.tensor(10.0), weights=w).loss, rows[:5].mean())


def _weighted_worker(rank: int, images: torch.Tensor, texts: torch.Tensor, weights: torch.Tensor, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=2)
    B = images.shape[0] // 2
    a = images[rank * B:(rank + 1) * B].clone().requires_grad_(True)
    b = texts[rank * B:(rank + 1) * B].clone().requires_grad_(True)
    out = ContrastiveLoss()(a, b, torch.tensor(10.0), weights=weights[rank * B:(rank + 1) * B])
    out.loss.backward()
    torch.save({"loss": out.loss.detach(), "ga": a.grad, "gb": b.grad}, os.path.join(out_dir, f"{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_weighted_contrastive_equals_single_process(tmp_path):
    """Weighted means over the global batch: the mean over 2 gloo ranks equals the 1-process loss, and so do gradients."""
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    images, texts = F.normalize(torch.randn(8, 16), dim=-1), F.normalize(torch.randn(8, 16), dim=-1)
    weights = torch.tensor([0.2, 3.0, 1.0, 0.5, 2.0, 0.1, 1.0, 1.2])  # the ranks' weight sums differ
    mp.spawn(_weighted_worker, args=(images, texts, weights, str(tmp_path)), nprocs=2, join=True)
    parts = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    a, b = images.clone().requires_grad_(True), texts.clone().requires_grad_(True)
    ref = ContrastiveLoss()(a, b, torch.tensor(10.0), weights=weights)
    ref.loss.backward()
    torch.testing.assert_close((parts[0]["loss"] + parts[1]["loss"]) / 2, ref.loss.detach())
    torch.testing.assert_close(torch.cat([p["ga"] for p in parts]) / 2, a.grad)
    torch.testing.assert_close(torch.cat([p["gb"] for p in parts]) / 2, b.grad)


# ----------------------------------------------------------------------------- the recipe: estimate once, restore on resume


def _class_folder(root, shift: float, n: int = 12, seed: int = 0):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, name in enumerate(["dark", "light"]):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            base = 60 + 120 * c + shift
            arr = np.clip(rng.normal(base, 30, (16, 16, 3)), 0, 255).astype("uint8")
            Image.fromarray(arr).save(root / name / f"{i}.png")
    return root


def _tiny_cfg(tmp_path, **reweight) -> AdaptConfig:
    from mmtransfer.config import from_dict

    src = _class_folder(tmp_path / "src", 0.0)
    tgt = _class_folder(tmp_path / "tgt", 40.0, seed=1)
    return from_dict(AdaptConfig, {
        "classifier": {"lenet": {"channels": [4, 8], "image_size": 16}, "bottleneck_dim": 8, "dropout": 0.0},
        "data": {"source": {"name": str(src)}, "target": {"name": str(tgt)}, "target_test": {"name": str(tgt)}},
        "method": {"name": "none"},
        "reweight": {"method": "classifier", "pixel_size": 8, "pca_dim": 4, "folds": 3, **reweight},
        "plot": {"enabled": False},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 4, "batch_size": 8, "save_every": 2, "log_every": 1,
                  "trackers": [], "progress_bar": False},
    })


@pytest.mark.slow
def test_weights_are_estimated_once_saved_and_restored_on_resume(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    import mmtransfer.assemble.domain_data as domain_data
    import mmtransfer.assemble.reweighting as domains
    import mmtransfer.recipes.adapt as adapt

    cfg = _tiny_cfg(tmp_path)
    summary = adapt.run(cfg)
    run_dir = tmp_path / "run"
    saved = load_file(str(run_dir / domains.WEIGHTS_FILE))["weights"]
    assert saved.shape == (24,) and float(saved.mean()) == pytest.approx(1.0, abs=1e-5)
    assert (run_dir / "source_weights.png").is_file()
    assert {"ess", "ess_fraction", "min", "max"} <= set(summary["reweight"])

    # A resumed run reads the weights back; it never estimates them again (they cannot change).
    def no_estimate(*args, **kwargs):
        raise AssertionError("the weights were estimated again on resume")

    monkeypatch.setattr(domains, "importance_weights", no_estimate)
    marked = saved.clone()
    marked[0] = 5.0  # a value the estimator would not give: proves the file is what is used
    save_file({"weights": marked, "ratio": marked.clone()}, str(run_dir / domains.WEIGHTS_FILE), metadata={"method": "classifier", "stats": "{}", "info": "{}"})
    seen = {}
    original = domain_data.RowValues.__call__

    def spy(self, items):
        batch = original(self, items)
        seen.update(zip([int(i) for i in items], batch["weight"].tolist()))
        return batch

    monkeypatch.setattr(domain_data.RowValues, "__call__", spy)
    resumed = _tiny_cfg(tmp_path)
    resumed.train.resume = str(run_dir / "checkpoints" / "checkpoint-2")
    resumed.train.max_steps = 6
    adapt.run(resumed)
    assert seen and all(seen[i] == pytest.approx(float(marked[i])) for i in seen)


def test_changed_source_on_resume_is_refused(tmp_path):
    import mmtransfer.recipes.adapt as adapt

    adapt.run(_tiny_cfg(tmp_path))
    cfg = _tiny_cfg(tmp_path)
    cfg.data.source.max_samples = 10
    cfg.train.resume = "latest"
    with pytest.raises(ConfigError, match="cover 24 source rows"):
        adapt.run(cfg)


def test_reweight_config_errors_are_explained():
    cfg = AdaptConfig(method=MethodConfig(name="none"))
    cfg.reweight.method = "classifier"
    cfg.data.target = None
    with pytest.raises(ConfigError, match="needs data.target"):
        check_config(cfg)
    cfg = AdaptConfig()
    cfg.reweight.method = "kmm"
    cfg.reweight.clip_max = 0.5
    with pytest.raises(ConfigError, match="clip_max must be above 1"):
        check_config(cfg)
    cfg = AdaptConfig()
    cfg.reweight.method = "classifier"
    cfg.reweight.features = "model"
    with pytest.raises(ConfigError, match="model_dir"):
        check_config(cfg)


def test_ratio_features_from_pixels_and_from_a_saved_classifier(tmp_path):
    from mmtransfer import data
    from mmtransfer.assemble.reweighting import ratio_features

    ds = data.load(str(_class_folder(tmp_path / "imgs", 0.0, n=3)))
    cfg = AdaptConfig()
    cfg.reweight.pixel_size = 8
    assert ratio_features(cfg, ds).shape == (6, 3 * 8 * 8)
    clf = BackboneClassifier(ClassifierConfig(lenet=LeNetConfig(channels=[4, 8], image_size=16), bottleneck_dim=8), 2)
    clf.save_pretrained(tmp_path / "clf")
    cfg.reweight.features, cfg.reweight.model_dir = "model", str(tmp_path / "clf")
    assert ratio_features(cfg, ds).shape == (6, 8)  # the bottleneck
    cfg.reweight.model_dir = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a saved classifier"):
        ratio_features(cfg, ds)
