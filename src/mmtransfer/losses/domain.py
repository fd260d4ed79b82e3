"""Domain adaptation losses over features: gradient reversal, DANN, CDAN(+E), MK-MMD, CORAL.

For more than two domains (several labelled sources, with or without a
target): :class:`MultiDomainAdversarialLoss` (a K-way discriminator behind
gradient reversal) and :class:`PairwiseDomainLoss` (CORAL or MMD averaged over
every pair of domains).

Every loss is a module mapping source and target features (and, for CDAN, the
classifier's logits) to one :class:`DomainLossOutput`. None keeps a step
counter: the gradient-reversal strength ``lambda_`` is an argument of every
call, computed by the caller as a pure function of training progress
(:func:`mmtransfer.schedules.dann_lambda`), so a resumed run needs nothing but
its step to continue the schedule.

The adversarial losses train the discriminator and the feature extractor in
the same backward pass: the discriminator minimises the domain cross-entropy,
and the gradient-reversal layer in front of it hands the feature extractor
``-lambda_`` times that gradient. One optimizer, one backward, every parameter
used every step, so DistributedDataParallel needs no ``find_unused_parameters``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------- gradient reversal


class GradientReversalFunction(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by ``-lambda_``.

    Ganin & Lempitsky (2015): R(x) = x and dR/dx = -lambda I.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lambda_: float) -> torch.Tensor:
        ctx.lambda_ = float(lambda_)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad_output.neg() * ctx.lambda_, None


def grad_reverse(x: torch.Tensor, lambda_: float = 1.0) -> torch.Tensor:
    """Gradient reversal: returns ``x``; gradients flowing back through it are scaled by ``-lambda_``.

    Shapes:
        any -> the same.

    Example:
        >>> x = torch.ones(3, requires_grad=True)
        >>> grad_reverse(x, 0.5).sum().backward()
        >>> x.grad
        tensor([-0.5000, -0.5000, -0.5000])
    """
    return GradientReversalFunction.apply(x, lambda_)


class GradientReversal(nn.Module):
    """Module form of :func:`grad_reverse`; ``lambda_`` is passed in every call (no state)."""

    def forward(self, x: torch.Tensor, lambda_: float) -> torch.Tensor:
        return grad_reverse(x, lambda_)


# ----------------------------------------------------------------------------- outputs


@dataclass
class DomainLossOutput:
    """Loss and diagnostics of one domain-adaptation step.

    Shapes (all scalars):
        loss: () the quantity to add (times a trade-off weight) to the task loss.
        lambda_: the gradient-reversal strength used (None for non-adversarial losses).
        domain_accuracy: () share of source and target features the discriminator
            put on the right side (None for non-adversarial losses). Near 0.5 means
            the features no longer tell the domains apart.
        source_accuracy, target_accuracy: () the discriminator's accuracy per domain.
        discrepancy: () the statistic itself for MMD / CORAL (None otherwise).
    """

    loss: torch.Tensor
    lambda_: float | None = None
    domain_accuracy: torch.Tensor | None = None
    source_accuracy: torch.Tensor | None = None
    target_accuracy: torch.Tensor | None = None
    discrepancy: torch.Tensor | None = None

    def metrics(self) -> dict[str, torch.Tensor | float]:
        """The diagnostics that are set, as ``{name: scalar}`` for logging."""
        out: dict[str, torch.Tensor | float] = {}
        if self.lambda_ is not None:
            out["lambda"] = self.lambda_
        names = {"domain_accuracy": "domain_acc", "source_accuracy": "domain_acc_source",
                 "target_accuracy": "domain_acc_target", "discrepancy": "discrepancy"}
        for field_name, key in names.items():
            value = getattr(self, field_name)
            if value is not None:
                out[key] = value.detach()
        return out


# ----------------------------------------------------------------------------- discriminator


class DomainDiscriminator(nn.Module):
    """An MLP from features to one domain logit (source = 1, target = 0), or K logits for K domains.

    It returns logits, never probabilities: the losses use
    ``binary_cross_entropy_with_logits``, which autocast runs in float32, so the
    discriminator is safe under bf16/fp16 mixed precision.

    Args:
        in_dim: feature width D.
        hidden_dim: width of each hidden layer.
        num_layers: hidden layers (Linear -> [BatchNorm] -> ReLU -> [Dropout]); 0 is a linear probe.
        batch_norm: batch norm in the hidden layers (tllib's default); source and
            target are normalised together, as they are concatenated.
        dropout: dropout after each hidden layer (the DANN paper uses 0.5).
        num_outputs: 1 (binary source/target) or K (one logit per domain).

    Shapes:
        (N, D) -> (N,) logits, or (N, K) with ``num_outputs=K``.

    Example:
        >>> DomainDiscriminator(16, 32)(torch.randn(4, 16)).shape
        torch.Size([4])
    """

    def __init__(self, in_dim: int, hidden_dim: int = 1024, num_layers: int = 2, batch_norm: bool = True, dropout: float = 0.0,
                 num_outputs: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(num_layers):
            layers.append(nn.Linear(width, hidden_dim))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = hidden_dim
        layers.append(nn.Linear(width, num_outputs))
        self.net = nn.Sequential(*layers)
        self.in_dim = in_dim
        self.num_outputs = num_outputs

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[-1] != self.in_dim:
            raise ValueError(f"The domain discriminator takes {self.in_dim}-d features, got shape {tuple(features.shape)}.")
        out = self.net(features)  # (N, K)
        return out.squeeze(-1) if self.num_outputs == 1 else out  # (N, 1) -> (N,)


def _domain_bce(
    logits: torch.Tensor, n_source: int, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Domain BCE over concatenated [source; target] logits, plus accuracies (total, source, target)."""
    logits = logits.float()  # (N,) the loss and its sigmoid stay in float32 under autocast
    labels = torch.zeros_like(logits)
    labels[:n_source] = 1.0
    loss = F.binary_cross_entropy_with_logits(logits, labels, weight=weights)
    with torch.no_grad():
        hit = ((logits > 0).float() == labels).float()  # (N,)
        acc_s = hit[:n_source].mean()
        acc_t = hit[n_source:].mean()
        acc = (acc_s + acc_t) / 2
    return loss, acc, acc_s, acc_t


class DomainAdversarialLoss(nn.Module):
    """DANN: a discriminator tells source from target features through a gradient-reversal layer.

    Ganin et al., "Domain-Adversarial Training of Neural Networks" (JMLR 2016).
    With features f = G(x) and discriminator D:

        min_D  max_G   L_d = -1/2 [ E_s log sigma(D(f_s)) + E_t log(1 - sigma(D(f_t))) ]

    realised as one minimisation, ``L_d(D(R_lambda(f)))``, where R_lambda is the
    identity forward and multiplies gradients by -lambda backward. Source and
    target terms are weighted equally (their batch means are averaged).

    Args:
        discriminator: maps (N, D) features to (N,) logits, e.g. :class:`DomainDiscriminator`.

    Shapes of ``forward``:
        f_s: (B_s, D) source features; f_t: (B_t, D) target features; lambda_: float;
        w_s, w_t: optional (B_s,), (B_t,) per-sample weights -> :class:`DomainLossOutput`.

    Example:
        >>> dann = DomainAdversarialLoss(DomainDiscriminator(16, 32))
        >>> out = dann(torch.randn(8, 16), torch.randn(8, 16), lambda_=dann_lambda(0.3))
        >>> out.loss.shape, out.lambda_
        (torch.Size([]), 0.9051482536448667)
    """

    def __init__(self, discriminator: nn.Module) -> None:
        super().__init__()
        self.discriminator = discriminator

    def forward(
        self,
        f_s: torch.Tensor,
        f_t: torch.Tensor,
        lambda_: float,
        w_s: torch.Tensor | None = None,
        w_t: torch.Tensor | None = None,
    ) -> DomainLossOutput:
        f = grad_reverse(torch.cat([f_s, f_t], dim=0), lambda_)  # (B_s + B_t, D)
        logits = self.discriminator(f)  # (B_s + B_t,)
        weights = _balanced_weights(f_s.shape[0], f_t.shape[0], w_s, w_t, logits.device)
        loss, acc, acc_s, acc_t = _domain_bce(logits, f_s.shape[0], weights)
        return DomainLossOutput(loss=loss, lambda_=float(lambda_), domain_accuracy=acc, source_accuracy=acc_s, target_accuracy=acc_t)


def _balanced_weights(
    n_s: int, n_t: int, w_s: torch.Tensor | None, w_t: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """Per-sample BCE weights (N,) so each domain's term is a (weighted) mean and the two count equally."""
    w_s = torch.ones(n_s, device=device) if w_s is None else w_s.detach().float()
    w_t = torch.ones(n_t, device=device) if w_t is None else w_t.detach().float()
    n = n_s + n_t
    # mean over N of w_i * bce_i == 1/2 (sum_s w bce / sum_s w) + 1/2 (sum_t w bce / sum_t w)
    return torch.cat([w_s / w_s.sum() * (n / 2), w_t / w_t.sum() * (n / 2)])  # (N,)


# ----------------------------------------------------------------------------- CDAN


class MultilinearMap(nn.Module):
    """The outer product f (x) g, flattened: the joint of features and predictions.

    Shapes:
        f: (N, D), g: (N, C) -> (N, C * D).
    """

    def forward(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        outer = torch.bmm(g.unsqueeze(2), f.unsqueeze(1))  # (N, C, 1) @ (N, 1, D) -> (N, C, D)
        return outer.flatten(1)  # (N, C * D)


class RandomizedMultilinearMap(nn.Module):
    """Random projection of f (x) g for large D * C: (R_f f) * (R_g g) / sqrt(d_out).

    Its inner products approximate those of the full outer product in
    expectation (Long et al. 2018, Theorem 1). ``R_f`` and ``R_g`` are fixed
    Gaussian matrices drawn from ``seed``, held as buffers: identical on every
    process and saved with checkpoints; they never train.

    Shapes:
        f: (N, D), g: (N, C) -> (N, d_out).
    """

    def __init__(self, features_dim: int, num_classes: int, output_dim: int = 1024, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("Rf", torch.randn(features_dim, output_dim, generator=gen))  # (D, d_out)
        self.register_buffer("Rg", torch.randn(num_classes, output_dim, generator=gen))  # (C, d_out)
        self.output_dim = output_dim

    def forward(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        rf = f @ self.Rf.to(f.dtype)  # (N, D) @ (D, d_out) -> (N, d_out)
        rg = g @ self.Rg.to(g.dtype)  # (N, C) @ (C, d_out) -> (N, d_out)
        return rf * rg / math.sqrt(self.output_dim)


def entropy(probs: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Shannon entropy of each row of a probability matrix: (N, C) -> (N,)."""
    return -(probs * torch.log(probs + eps)).sum(dim=1)


def minimum_class_confusion(logits: torch.Tensor, temperature: float = 2.5) -> torch.Tensor:
    """Minimum Class Confusion (Jin et al., ECCV 2020) on unlabelled target logits: (B, C) -> ().

    With temperature-scaled probabilities Y (B, C) and per-example weights
    w = B * (1 + exp(-H(y))) / sum(1 + exp(-H)) (confident rows count more), the
    class confusion matrix C = Y^T diag(w) Y, row-normalised; the loss is its
    off-diagonal mass over the number of classes. It is low when the target
    predictions do not mix classes, so it pulls target images away from class
    boundaries without pseudo-labels.

    Example:
        >>> confident = torch.eye(4) * 20
        >>> float(minimum_class_confusion(confident)) < float(minimum_class_confusion(torch.zeros(4, 4)))
        True
    """
    probs = F.softmax(logits.float() / temperature, dim=1)  # (B, C)
    w = 1.0 + torch.exp(-entropy(probs).detach())  # (B,)
    w = logits.shape[0] * w / w.sum()
    confusion = (probs * w[:, None]).t() @ probs  # (C, B) @ (B, C) -> (C, C)
    confusion = confusion / confusion.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return (confusion.sum() - confusion.trace()) / logits.shape[1]


class ConditionalDomainAdversarialLoss(nn.Module):
    """CDAN and CDAN+E: the discriminator sees features conditioned on the classifier's predictions.

    Long et al., "Conditional Adversarial Domain Adaptation" (NeurIPS 2018).
    With g = softmax(classifier logits) and the multilinear map T(f, g) = f (x) g
    (or its randomized approximation for large D * C):

        min_D max_G  L = -E_s w(x) log sigma(D(T(f_s, g_s))) - E_t w(x) log(1 - sigma(D(T(f_t, g_t))))

    through a gradient-reversal layer, as in DANN. The predictions are detached
    inside the map (as in Transfer-Learning-Library), so the adversarial signal
    reaches the classifier through the features only. CDAN+E
    (``entropy_conditioning``) weights each example by w = 1 + exp(-H(g)),
    normalised per domain, to favour examples the classifier is sure of.

    Args:
        discriminator: maps the conditioned (N, D_map) features to (N,) logits;
            D_map = D * C, or ``randomized_dim`` when randomized.
        features_dim, num_classes: D and C (needed for the randomized map).
        entropy_conditioning: CDAN+E.
        randomized: use :class:`RandomizedMultilinearMap`.
        randomized_dim: its output width.

    Shapes of ``forward``:
        logits_s: (B_s, C), f_s: (B_s, D), logits_t: (B_t, C), f_t: (B_t, D), lambda_: float.

    Example:
        >>> cdan = ConditionalDomainAdversarialLoss(DomainDiscriminator(16 * 10, 64), 16, 10)
        >>> out = cdan(torch.randn(8, 10), torch.randn(8, 16), torch.randn(8, 10), torch.randn(8, 16), lambda_=1.0)
        >>> float(out.domain_accuracy) <= 1.0
        True
    """

    def __init__(
        self,
        discriminator: nn.Module,
        features_dim: int,
        num_classes: int,
        entropy_conditioning: bool = False,
        randomized: bool = False,
        randomized_dim: int = 1024,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.discriminator = discriminator
        self.entropy_conditioning = entropy_conditioning
        self.map: nn.Module = (
            RandomizedMultilinearMap(features_dim, num_classes, randomized_dim, seed) if randomized else MultilinearMap()
        )

    @staticmethod
    def map_dim(features_dim: int, num_classes: int, randomized: bool, randomized_dim: int) -> int:
        """Width of the conditioned features the discriminator sees."""
        return randomized_dim if randomized else features_dim * num_classes

    def forward(
        self,
        logits_s: torch.Tensor,
        f_s: torch.Tensor,
        logits_t: torch.Tensor,
        f_t: torch.Tensor,
        lambda_: float,
    ) -> DomainLossOutput:
        f = torch.cat([f_s, f_t], dim=0)  # (N, D), N = B_s + B_t
        g = torch.cat([logits_s, logits_t], dim=0).float().softmax(dim=1).detach()  # (N, C)
        h = self.map(f, g.to(f.dtype))  # (N, D_map)
        logits = self.discriminator(grad_reverse(h, lambda_))  # (N,)
        w_s = w_t = None
        if self.entropy_conditioning:
            w = 1.0 + torch.exp(-entropy(g))  # (N,)
            w_s, w_t = w[: f_s.shape[0]], w[f_s.shape[0]:]
        weights = _balanced_weights(f_s.shape[0], f_t.shape[0], w_s, w_t, logits.device)
        loss, acc, acc_s, acc_t = _domain_bce(logits, f_s.shape[0], weights)
        return DomainLossOutput(loss=loss, lambda_=float(lambda_), domain_accuracy=acc, source_accuracy=acc_s, target_accuracy=acc_t)


# ----------------------------------------------------------------------------- statistic matching


class MultipleKernelMMD(nn.Module):
    """Multi-kernel maximum mean discrepancy with Gaussian kernels at several bandwidths.

    Long et al., "Learning Transferable Features with Deep Adaptation Networks" (ICML 2015);
    Gretton et al. (2012). With k(x, y) = sum_k exp(-||x - y||^2 / (2 sigma_k^2)),

        MMD^2 = E_ss k(x_s, x_s') + E_tt k(x_t, x_t') - 2 E_st k(x_s, x_t)

    (the biased V-statistic). Bandwidths are ``bandwidth_multipliers`` times the
    mean squared pairwise distance of the batch (detached), so the kernels
    follow the scale of the features as they change; the kernel weights are
    equal (fixed, not learnt).

    Args:
        bandwidth_multipliers: sigma_k^2 / mean squared distance, for each kernel.

    Shapes of ``forward``:
        f_s: (B_s, D), f_t: (B_t, D) -> :class:`DomainLossOutput` (``discrepancy`` = MMD^2).

    Example:
        >>> mmd = MultipleKernelMMD()
        >>> float(mmd(torch.randn(16, 8), torch.randn(16, 8) + 3).loss) > float(mmd(torch.randn(16, 8), torch.randn(16, 8)).loss)
        True
    """

    def __init__(self, bandwidth_multipliers: Sequence[float] = (0.125, 0.25, 0.5, 1.0, 2.0)) -> None:
        super().__init__()
        if not bandwidth_multipliers or min(bandwidth_multipliers) <= 0:
            raise ValueError(f"MMD bandwidth multipliers must be positive numbers, got {list(bandwidth_multipliers)}.")
        self.bandwidth_multipliers = tuple(float(b) for b in bandwidth_multipliers)

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor, lambda_: float | None = None) -> DomainLossOutput:
        n_s = f_s.shape[0]
        f = torch.cat([f_s, f_t], dim=0).float()  # (N, D)
        norms = f.pow(2).sum(dim=1)  # (N,)
        sq = (norms[:, None] + norms[None, :] - 2.0 * f @ f.T).clamp_min(0.0)  # (N, D) @ (D, N) -> (N, N) squared distances
        base = sq.detach().sum() / max(1, sq.numel() - sq.shape[0])  # mean over off-diagonal pairs
        kernel = sum(torch.exp(-sq / (2.0 * m * base + 1e-12)) for m in self.bandwidth_multipliers)  # (N, N)
        k_ss = kernel[:n_s, :n_s].mean()
        k_tt = kernel[n_s:, n_s:].mean()
        k_st = kernel[:n_s, n_s:].mean()
        mmd = k_ss + k_tt - 2.0 * k_st
        return DomainLossOutput(loss=mmd, discrepancy=mmd.detach())


class CORALLoss(nn.Module):
    """Deep CORAL: match the second-order statistics of source and target features.

    Sun & Saenko, "Deep CORAL: Correlation Alignment for Deep Domain Adaptation" (ECCV 2016 workshops):

        L = 1 / (4 D^2) || C_s - C_t ||_F^2,  C = covariance of the batch's features.

    Shapes of ``forward``:
        f_s: (B_s, D), f_t: (B_t, D) -> :class:`DomainLossOutput` (``discrepancy`` = L).

    Example:
        >>> float(CORALLoss()(torch.randn(32, 4), torch.randn(32, 4) * 5).loss) > 0
        True
    """

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor, lambda_: float | None = None) -> DomainLossOutput:
        D = f_s.shape[1]
        c_s = _covariance(f_s.float())  # (D, D)
        c_t = _covariance(f_t.float())  # (D, D)
        loss = (c_s - c_t).pow(2).sum() / (4.0 * D * D)
        return DomainLossOutput(loss=loss, discrepancy=loss.detach())


def _covariance(x: torch.Tensor) -> torch.Tensor:
    """Unbiased covariance of the rows: (N, D) -> (D, D)."""
    centred = x - x.mean(dim=0, keepdim=True)  # (N, D)
    return centred.T @ centred / max(1, x.shape[0] - 1)  # (D, N) @ (N, D) -> (D, D)


# ----------------------------------------------------------------------------- several domains


class MultiDomainAdversarialLoss(nn.Module):
    """Adversarial invariance across K domains: a K-way discriminator behind gradient reversal.

    The multi-source form of DANN (as in domain generalisation with an
    adversarial multi-domain discriminator, e.g. Li et al. 2018, MMD-AAE's
    adversarial part; Zhao et al. 2018, MDAN with one discriminator): with
    domain labels d in 0..K-1,

        min_D max_G  L_d = 1/K sum_k E_{x ~ domain k} CE(D(R_lambda(G(x))), k)

    Each domain's term is its batch mean, and the K terms count equally, so a
    domain that fills more of the batch does not dominate. Domains absent from
    a batch are left out of the average. With K = 2 this is DANN with a softmax
    discriminator.

    Args:
        discriminator: maps (N, D) features to (N, K) logits (``DomainDiscriminator(..., num_outputs=K)``).
        num_domains: K.

    Shapes of ``forward``:
        features: (N, D); domains: (N,) int in 0..K-1; lambda_: float -> :class:`DomainLossOutput`
        (``domain_accuracy`` = the discriminator's balanced accuracy over the domains present; 1/K is chance).

    Example:
        >>> loss = MultiDomainAdversarialLoss(DomainDiscriminator(8, 16, num_outputs=3), 3)
        >>> out = loss(torch.randn(12, 8), torch.arange(12) % 3, lambda_=1.0)
        >>> out.loss.shape
        torch.Size([])
    """

    def __init__(self, discriminator: nn.Module, num_domains: int) -> None:
        super().__init__()
        if num_domains < 2:
            raise ValueError(f"A multi-domain discriminator needs at least 2 domains, got {num_domains}.")
        self.discriminator = discriminator
        self.num_domains = num_domains

    def forward(self, features: torch.Tensor, domains: torch.Tensor, lambda_: float) -> DomainLossOutput:
        logits = self.discriminator(grad_reverse(features, lambda_)).float()  # (N, K) float32 under autocast
        if logits.ndim != 2 or logits.shape[1] != self.num_domains:
            raise ValueError(f"The discriminator must return (N, {self.num_domains}) logits, got {tuple(logits.shape)}.")
        weights = _domain_balance(domains, self.num_domains)  # (N,)
        per_row = F.cross_entropy(logits, domains, reduction="none")  # (N,)
        loss = (weights * per_row).sum()
        with torch.no_grad():
            hit = (logits.argmax(1) == domains).float()  # (N,)
            acc = (weights * hit).sum()
        return DomainLossOutput(loss=loss, lambda_=float(lambda_), domain_accuracy=acc)


def _domain_balance(domains: torch.Tensor, num_domains: int) -> torch.Tensor:
    """Row weights (N,) that average each present domain's rows, then the domains equally."""
    counts = torch.bincount(domains, minlength=num_domains).float()  # (K,)
    present = int((counts > 0).sum())
    return (1.0 / (counts[domains] * present)).detach()  # (N,)


class PairwiseDomainLoss(nn.Module):
    """A two-domain statistic (CORAL or MMD) averaged over every pair of domains in the batch.

    Domain generalisation by moment matching across sources (e.g. Deep CORAL
    between every pair of source domains):

        L = 2 / (K (K - 1)) sum_{a < b} L_pair(f_a, f_b)

    Pairs where either domain has fewer than ``min_rows`` rows in the batch are
    skipped (a covariance needs two rows).

    Args:
        pair_loss: a module mapping (f_a, f_b) to a :class:`DomainLossOutput`: :class:`CORALLoss`
            or :class:`MultipleKernelMMD`.
        num_domains: K.
        min_rows: fewest rows of a domain for its pairs to count.

    Shapes of ``forward``:
        features: (N, D); domains: (N,) int in 0..K-1 -> :class:`DomainLossOutput` (``discrepancy`` = L).

    Example:
        >>> loss = PairwiseDomainLoss(CORALLoss(), 3)
        >>> float(loss(torch.randn(30, 4), torch.arange(30) % 3).loss) >= 0
        True
    """

    def __init__(self, pair_loss: nn.Module, num_domains: int, min_rows: int = 2) -> None:
        super().__init__()
        if num_domains < 2:
            raise ValueError(f"Pairwise domain losses need at least 2 domains, got {num_domains}.")
        self.pair_loss = pair_loss
        self.num_domains = num_domains
        self.min_rows = min_rows

    def forward(self, features: torch.Tensor, domains: torch.Tensor, lambda_: float | None = None) -> DomainLossOutput:
        groups = [features[domains == k] for k in range(self.num_domains)]  # each (N_k, D)
        terms = [self.pair_loss(groups[a], groups[b]).loss
                 for a in range(self.num_domains) for b in range(a + 1, self.num_domains)
                 if groups[a].shape[0] >= self.min_rows and groups[b].shape[0] >= self.min_rows]
        loss = torch.stack(terms).mean() if terms else features.sum() * 0.0  # keeps every parameter in the graph
        return DomainLossOutput(loss=loss, discrepancy=loss.detach())
