"""Importance weights for covariate shift: the density ratio p_target(x) / p_source(x) on features.

Under covariate shift (p(y|x) the same in both domains, p(x) not), the target
risk is the source risk with every source example weighted by
w(x) = p_target(x) / p_source(x) (Shimodaira 2000). Two estimators, both on
fixed feature vectors and computed once, before training:

- :func:`classifier_density_ratio`: a probabilistic domain classifier. With
  p(t|x) from an L2-regularised logistic regression trained to tell target
  (1) from source (0), Bayes' rule gives

      w(x) = (n_s / n_t) * p(t|x) / p(s|x) = (n_s / n_t) * exp(logit(x)).

  The penalty is chosen by cross-validated log loss, every source row gets the
  prediction of the fold that did not train on it (cross-fitting, so a row's
  own label does not inflate its weight), and the out-of-fold logits are
  calibrated by Platt scaling (a, b fitted on the same out-of-fold predictions).
- :func:`kmm_density_ratio`: kernel mean matching (Huang et al. 2007): weights
  beta that make the source kernel mean embedding match the target's,

      min_beta 1/2 beta^T K beta - kappa^T beta,  0 <= beta_i <= B,  sum_i beta_i = n_s,
      K_ij = k(x_i^s, x_j^s),  kappa_i = (n_s / n_t) sum_j k(x_i^s, x_j^t),

  solved by accelerated projected gradient in torch (no scipy).

:func:`clip_and_normalise` turns a ratio into training weights (mean 1, at
most ``clip_max``), and :func:`weight_stats` reports what they look like
(min, max, effective sample size). Nothing here keeps state between calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------- outputs


@dataclass
class ImportanceWeights:
    """Per-source-row importance weights and how they were made.

    Shapes:
        weights: (N_s,) clipped and normalised to mean 1: what the losses use.
        ratio: (N_s,) the estimated density ratio p_t(x) / p_s(x) before clipping and normalising.
        info: what the estimator chose (penalty, calibration, bandwidth, ...).
    """

    weights: torch.Tensor
    ratio: torch.Tensor
    method: str
    info: dict[str, Any] = field(default_factory=dict)

    def stats(self, clip_max: float | None = None) -> dict[str, float]:
        """Summary of the weights: see :func:`weight_stats`."""
        return weight_stats(self.weights, clip_max)


def effective_sample_size(weights: torch.Tensor) -> float:
    """Kish's effective sample size (sum w)^2 / sum w^2: N for equal weights, 1 for one non-zero weight.

    Example:
        >>> effective_sample_size(torch.ones(10)), effective_sample_size(torch.tensor([1.0, 0.0, 0.0]))
        (10.0, 1.0)
    """
    w = weights.double()
    return float(w.sum() ** 2 / w.pow(2).sum().clamp_min(1e-300))


def weight_stats(weights: torch.Tensor, clip_max: float | None = None) -> dict[str, float]:
    """min, max, mean, quantiles, effective sample size (absolute and as a fraction of N), share at the clip.

    Example:
        >>> weight_stats(torch.ones(4))["ess_fraction"]
        1.0
    """
    w = weights.double()
    q = torch.quantile(w, torch.tensor([0.05, 0.5, 0.95], dtype=w.dtype))
    ess = effective_sample_size(w)
    out = {"n": float(w.numel()), "min": float(w.min()), "max": float(w.max()), "mean": float(w.mean()),
           "p05": float(q[0]), "median": float(q[1]), "p95": float(q[2]), "ess": ess, "ess_fraction": ess / w.numel()}
    if clip_max is not None:
        out["clipped_fraction"] = float((w >= clip_max * (1 - 1e-6)).double().mean())
    return out


def clip_and_normalise(ratio: torch.Tensor, clip_max: float | None = 10.0, iterations: int = 100) -> torch.Tensor:
    """Weights of mean 1 and at most ``clip_max``: normalise, clip, renormalise until both hold.

    Args:
        ratio: (N,) non-negative density-ratio estimates (any scale).
        clip_max: the largest weight allowed, > 1 (None: normalise only).

    Example:
        >>> w = clip_and_normalise(torch.tensor([1.0, 1.0, 1.0, 97.0]), clip_max=2.0)
        >>> round(float(w.mean()), 6), round(float(w.max()), 6)
        (1.0, 2.0)
    """
    if ratio.ndim != 1 or ratio.numel() == 0:
        raise ValueError(f"The density ratio must be a non-empty vector (N,), got shape {tuple(ratio.shape)}.")
    if not torch.isfinite(ratio).all() or (ratio < 0).any():
        raise ValueError("The density ratio has negative or non-finite values; check the features it was estimated on.")
    if clip_max is not None and clip_max <= 1.0:
        raise ValueError(f"clip_max must be above 1 (the weights' mean), got {clip_max}.")
    w = ratio.double()
    if float(w.sum()) <= 0:
        raise ValueError("Every density-ratio estimate is zero: the target looks unlike every source example.")
    w = w / w.mean()
    if clip_max is None:
        return w.float()
    for _ in range(iterations):
        w = w.clamp_max(clip_max)
        w = w / w.mean()
        if float(w.max()) <= clip_max * (1 + 1e-9):
            break
    return w.clamp_max(clip_max).float()


# ----------------------------------------------------------------------------- features


def standardise(f_s: torch.Tensor, f_t: torch.Tensor, pca_dim: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre and scale features by the pooled mean and std, then (optionally) keep the top principal components.

    Shapes:
        f_s: (N_s, D), f_t: (N_t, D) -> (N_s, D'), (N_t, D') float64, D' = min(D, pca_dim).
    """
    if f_s.ndim != 2 or f_t.ndim != 2 or f_s.shape[1] != f_t.shape[1]:
        raise ValueError(f"Source and target features must be (N, D) with the same D, got {tuple(f_s.shape)} and {tuple(f_t.shape)}.")
    x = torch.cat([f_s, f_t]).double()  # (N_s + N_t, D)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    if pca_dim is not None and pca_dim < x.shape[1]:
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        _, _, v = torch.pca_lowrank(x, q=pca_dim, center=False, niter=4)  # v: (D, q)
        torch.random.set_rng_state(gen_state)
        x = x @ v  # (N, D) @ (D, q) -> (N, q)
        x = x / x.std(0).clamp_min(1e-6)
    return x[: f_s.shape[0]], x[f_s.shape[0]:]


# ----------------------------------------------------------------------------- logistic regression


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float, max_iter: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-penalised logistic regression by L-BFGS: minimise mean BCE(x w + b, y) + l2/2 ||w||^2.

    Shapes:
        x: (N, D) float64, y: (N,) in {0, 1} -> w (D,), b ().
    """
    w = torch.zeros(x.shape[1], dtype=x.dtype, requires_grad=True)
    b = torch.zeros((), dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)
    yf = y.to(x.dtype)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ w + b, yf) + 0.5 * l2 * w.pow(2).sum()  # (N, D) @ (D,) -> (N,)
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def _folds(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """A fold id in 0..k-1 for each of n rows, balanced, in a seeded random order."""
    return (torch.randperm(n, generator=gen) % k).long()


def classifier_density_ratio(
    f_s: torch.Tensor,
    f_t: torch.Tensor,
    l2_grid: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0),
    folds: int = 5,
    calibrate: bool = True,
    pca_dim: int | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Density ratio p_t(x)/p_s(x) at the source rows from a cross-fitted, calibrated logistic domain classifier.

    Args:
        f_s: source features; f_t: target features (standardised here, optionally reduced by PCA).
        l2_grid: penalties tried; the one with the lowest out-of-fold log loss is kept.
        folds: cross-fitting folds (>= 2); each row is scored by the model that did not see it.
        calibrate: Platt-scale the out-of-fold logits (sigmoid(a * logit + b)) before taking the ratio.
        pca_dim: keep this many principal components of the standardised features (None: all).
        seed: fold assignment and PCA.

    Shapes:
        f_s: (N_s, D), f_t: (N_t, D) -> ratio (N_s,), with mean about 1 over the source when
        the estimate is right (E_s[p_t/p_s] = 1).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> ratio, info = classifier_density_ratio(torch.randn(500, 1, generator=g), torch.randn(500, 1, generator=g) + 1)
        >>> ratio.shape, 0.5 < float(ratio.mean()) < 1.5
        (torch.Size([500]), True)
    """
    if folds < 2:
        raise ValueError(f"folds must be at least 2 (cross-fitting), got {folds}.")
    if not l2_grid:
        raise ValueError("l2_grid must list at least one penalty.")
    n_s, n_t = f_s.shape[0], f_t.shape[0]
    if n_s < folds or n_t < folds:
        raise ValueError(f"Need at least {folds} source and target rows for {folds}-fold cross-fitting, got {n_s} and {n_t}.")
    xs, xt = standardise(f_s, f_t, pca_dim, seed)
    x = torch.cat([xs, xt])  # (N, D')
    y = torch.cat([torch.zeros(n_s), torch.ones(n_t)]).double()  # (N,) target = 1
    gen = torch.Generator().manual_seed(seed)
    fold = torch.cat([_folds(n_s, folds, gen), _folds(n_t, folds, gen)])  # stratified by domain
    best: tuple[float, float, torch.Tensor] | None = None
    losses: dict[str, float] = {}
    for l2 in l2_grid:
        oof = torch.empty(x.shape[0], dtype=x.dtype)
        for k in range(folds):
            train, test = fold != k, fold == k
            w, b = fit_logistic(x[train], y[train], float(l2))
            oof[test] = x[test] @ w + b  # (N_k, D') @ (D',) -> (N_k,)
        loss = float(F.binary_cross_entropy_with_logits(oof, y))
        losses[f"{l2:g}"] = loss
        if best is None or loss < best[0]:
            best = (loss, float(l2), oof)
    assert best is not None
    cv_loss, l2_best, logits = best
    a, c = 1.0, 0.0
    if calibrate:
        ab, cb = fit_logistic(logits[:, None], y, 0.0, max_iter=100)
        a, c = float(ab[0]), float(cb)
        logits = a * logits + c
    ratio = (n_s / n_t) * torch.exp(logits[:n_s].clamp(-50, 50))  # (N_s,) (n_s/n_t) p(t|x)/p(s|x)
    with torch.no_grad():
        acc = float(((logits > 0).double() == y).double().mean())
    info = {"l2": l2_best, "cv_log_loss": cv_loss, "cv_log_loss_by_l2": losses, "platt_a": a, "platt_b": c,
            "domain_accuracy": acc, "chance_log_loss": _chance_log_loss(n_s, n_t), "features_dim": int(x.shape[1])}
    return ratio.float(), info


def _chance_log_loss(n_s: int, n_t: int) -> float:
    p = n_t / (n_s + n_t)
    return float(-(p * math.log(p) + (1 - p) * math.log(1 - p)))


# ----------------------------------------------------------------------------- kernel mean matching


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (N, M) from inner products, clamped at 0."""
    return (a.pow(2).sum(1)[:, None] + b.pow(2).sum(1)[None, :] - 2.0 * a @ b.T).clamp_min(0.0)  # (N, D) @ (D, M) -> (N, M)


def median_bandwidth(x: torch.Tensor, max_points: int = 2000, seed: int = 0) -> float:
    """The median pairwise distance of (a seeded sample of) the rows: the usual Gaussian kernel width."""
    gen = torch.Generator().manual_seed(seed)
    sample = x[torch.randperm(x.shape[0], generator=gen)[:max_points]]
    d = _sq_dists(sample, sample)  # (M, M)
    off = d[~torch.eye(d.shape[0], dtype=torch.bool)]
    return float(off.median().sqrt().clamp_min(1e-6))


def _project_box_sum(v: torch.Tensor, upper: float, total: float, iterations: int = 60) -> torch.Tensor:
    """Euclidean projection onto {0 <= beta <= upper, sum beta = total}: clip(v - tau, 0, upper) with tau by bisection."""
    lo, hi = float(v.min()) - upper, float(v.max())
    for _ in range(iterations):
        tau = (lo + hi) / 2
        if float((v - tau).clamp(0.0, upper).sum()) > total:
            lo = tau
        else:
            hi = tau
    return (v - (lo + hi) / 2).clamp(0.0, upper)


def kmm_density_ratio(
    f_s: torch.Tensor,
    f_t: torch.Tensor,
    bandwidth: float | None = None,
    bandwidth_scale: float = 1.0,
    bound: float = 1000.0,
    iterations: int = 300,
    pca_dim: int | None = None,
    seed: int = 0,
    chunk: int = 4096,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Kernel mean matching weights (the density ratio at the source rows) by accelerated projected gradient.

    Args:
        f_s, f_t: source and target features (standardised here, optionally reduced by PCA).
        bandwidth: Gaussian kernel width sigma in k(x, y) = exp(-||x - y||^2 / (2 sigma^2));
            None: ``bandwidth_scale`` times the median pairwise distance.
        bound: B, the largest weight allowed while solving.
        iterations: FISTA steps (step 1 / the largest eigenvalue of K). Stopping early smooths
            the weights: on a toy problem 300 steps were closer to the true ratio than 1,000.

    Shapes:
        f_s: (N_s, D), f_t: (N_t, D) -> ratio (N_s,) with mean 1. K is (N_s, N_s): keep N_s to
        about 10,000 on a CPU (400 MB in float32).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> ratio, _ = kmm_density_ratio(torch.randn(300, 1, generator=g), torch.randn(300, 1, generator=g) + 1, iterations=200)
        >>> ratio.shape, round(float(ratio.mean()), 4)
        (torch.Size([300]), 1.0)
    """
    n_s, n_t = f_s.shape[0], f_t.shape[0]
    xs, xt = standardise(f_s, f_t, pca_dim, seed)
    xs, xt = xs.float(), xt.float()
    sigma = bandwidth if bandwidth is not None else bandwidth_scale * median_bandwidth(torch.cat([xs, xt]), seed=seed)
    gamma = 1.0 / (2.0 * sigma * sigma)
    K = torch.exp(-gamma * _sq_dists(xs, xs))  # (N_s, N_s)
    kappa = torch.zeros(n_s)
    for start in range(0, n_t, chunk):
        kappa += torch.exp(-gamma * _sq_dists(xs, xt[start:start + chunk])).sum(1)  # (N_s, M) -> (N_s,)
    kappa *= n_s / n_t
    # Largest eigenvalue of K by power iteration: the gradient's Lipschitz constant.
    v = torch.ones(n_s) / math.sqrt(n_s)
    for _ in range(50):
        v = K @ v  # (N_s, N_s) @ (N_s,)
        v = v / v.norm().clamp_min(1e-12)
    lipschitz = float(v @ (K @ v)) * 1.01
    beta = torch.ones(n_s)
    z, t = beta.clone(), 1.0
    for _ in range(iterations):
        grad = K @ z - kappa  # (N_s,)
        nxt = _project_box_sum(z - grad / lipschitz, bound, float(n_s))
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        z = nxt + ((t - 1) / t_next) * (nxt - beta)
        beta, t = nxt, t_next
    objective = float(0.5 * beta @ (K @ beta) - kappa @ beta)
    info = {"bandwidth": float(sigma), "bound": bound, "iterations": iterations, "objective": objective,
            "features_dim": int(xs.shape[1])}
    return beta, info


# ----------------------------------------------------------------------------- entry point and plot


def estimate_importance_weights(
    f_s: torch.Tensor,
    f_t: torch.Tensor,
    method: str = "classifier",
    clip_max: float | None = 10.0,
    power: float = 1.0,
    seed: int = 0,
    **options: Any,
) -> ImportanceWeights:
    """Source importance weights from features: the ratio by ``method``, flattened, then clipped and normalised to mean 1.

    Args:
        f_s, f_t: (N_s, D) source and (N_t, D) target features.
        method: "classifier" (:func:`classifier_density_ratio`) or "kmm" (:func:`kmm_density_ratio`).
        clip_max: largest weight after normalising to mean 1 (None: no clipping).
        power: flattening exponent gamma in [0, 1]: the weights are ratio ** gamma (adaptive
            importance weighting, Shimodaira 2000 / Sugiyama et al. 2007): 1 is the full
            ratio, 0 no weighting; in between trades bias for variance.
        **options: passed to the estimator.

    Example:
        >>> iw = estimate_importance_weights(torch.randn(200, 3), torch.randn(100, 3) + 0.5, clip_max=5.0)
        >>> iw.weights.shape, float(iw.weights.max()) <= 5.0
        (torch.Size([200]), True)
    """
    if method == "classifier":
        ratio, info = classifier_density_ratio(f_s, f_t, seed=seed, **options)
    elif method == "kmm":
        ratio, info = kmm_density_ratio(f_s, f_t, seed=seed, **options)
    else:
        raise ValueError(f"Unknown density-ratio method '{method}'; use 'classifier' or 'kmm'.")
    if not 0.0 <= power <= 1.0:
        raise ValueError(f"The flattening power must lie in [0, 1], got {power}.")
    info["power"] = power
    return ImportanceWeights(clip_and_normalise(ratio.double().pow(power), clip_max), ratio, method, info)


def plot_weights(weights: ImportanceWeights, path: str | Path, labels: torch.Tensor | None = None,
                 class_names: Sequence[str] | None = None, clip_max: float | None = None) -> Path:
    """A PNG: the histogram of the weights (with their summary), and the mean weight per class when labels are given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = weight_stats(weights.weights, clip_max)
    panels = 2 if labels is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 3.6), squeeze=False)
    ax = axes[0, 0]
    w = weights.weights.double().numpy()
    ax.hist(w, bins=60, color="tab:blue", alpha=0.85)
    ax.axvline(1.0, color="k", lw=0.8, ls="--")
    if clip_max is not None:
        ax.axvline(clip_max, color="tab:red", lw=0.8, ls=":", label=f"clip {clip_max:g}")
        ax.legend(fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("source importance weight (mean 1)", fontsize=9)
    ax.set_title(f"{weights.method}: min {s['min']:.2f}, max {s['max']:.2f}, ESS {s['ess']:.0f} "
                 f"({100 * s['ess_fraction']:.0f}%)", fontsize=9)
    if labels is not None:
        ax = axes[0, 1]
        k = len(class_names) if class_names is not None else int(labels.max()) + 1
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, labels, weights.weights.double())
        counts = torch.bincount(labels, minlength=k).double().clamp_min(1)
        names = list(class_names) if class_names is not None and len(class_names) == k else [str(i) for i in range(k)]
        if k <= 30:
            ax.bar(range(k), (sums / counts).numpy(), color="tab:orange")
            ax.set_xticks(range(k))
            ax.set_xticklabels(names, rotation=60, fontsize=7)
        else:
            ax.hist((sums / counts).numpy(), bins=40, color="tab:orange")
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_title("mean weight per source class", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
