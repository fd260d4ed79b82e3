"""mmtransfer against skada on MNIST-5k -> USPS: the same network, pixels, steps, optimizer and seeds.

Trains mmtransfer's DANN, CDAN, CORAL, MMD and MCC (``mmtransfer.recipes.adapt`` on a
recipe, ``method.name`` switched) and skada's DANN, CDAN, DeepCORAL, DAN and MCC
(skorch nets around the recipe's ``BackboneClassifier``), each over the same
seeds, and prints one table: target accuracy (mean ± std over the seeds) and
minutes per run for each side. Writes it as markdown and JSON to ``--out``.

Setting (the transductive digits protocol): source ``mnist5k:train`` (5,000
labelled), target ``usps:train`` (9,298 unlabelled), accuracy on ``usps:test``
(the same images with their labels) after the last step. Matched on both sides:

- the network: ``BackboneClassifier(recipe.classifier)``; skada's hooks read its
  bottleneck (the features mmtransfer's domain losses act on);
- the pixels: the recipe's data sections, preprocessed by the model's preprocessor;
- batch: ``train.batch_size`` source + as many target images per step;
- steps: ``train.max_steps`` optimizer steps (skorch: one epoch of exactly that
  many balanced batches; both counts are asserted);
- optimizer, weight decay groups, learning-rate schedule (a LambdaLR stepped per
  batch), gradient clipping: the recipe's ``optim`` section, as the trainer uses it;
- the discriminator (DANN, CDAN): ``method.discriminator``'s width and depth;
- the seeds: ``set_seed(seed)`` before the model is built, as the trainer does.

What differs (skada has no setting for it) is listed under the table (NOTES).

Examples:
  python benchmarks/skada_digits.py --threads 1                                # 5 methods x seeds 0 1 2
  python benchmarks/skada_digits.py --methods dann coral --seeds 0
  python benchmarks/skada_digits.py --steps 50 --seeds 0 --max-samples 1000   # a smoke run
  python benchmarks/skada_digits.py --methods coral mmd -- method.weight=10     # recipe overrides, both sides
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = ROOT / "configs" / "digits_mnist_usps_dann.yaml"
INSTALL_HINT = "benchmarks/skada_digits.py compares with skada, which needs skada and skorch: pip install -e '.[bench]'"

# mmtransfer method -> (its row name, skada's estimator function in skada.deep)
METHODS: dict[str, tuple[str, str]] = {
    "dann": ("DANN", "DANN"),
    "cdan": ("CDAN", "CDAN"),
    "coral": ("CORAL", "DeepCoral"),
    "mmd": ("MMD", "DAN"),
    "mcc": ("MCC", "MCC"),
}
ADVERSARIAL = ("dann", "cdan")
# The MCC row: Minimum Class Confusion alone, at this weight and temperature (those of the paper) on both sides.
MCC_WEIGHT, MCC_TEMPERATURE = 1.0, 2.5


def require_skada() -> None:
    """Exit 2 with the install command when skada or skorch is missing."""
    try:
        import skada.deep  # noqa: F401
        import skorch  # noqa: F401
    except ImportError:
        print(INSTALL_HINT, file=sys.stderr)
        raise SystemExit(2) from None


# ----------------------------------------------------------------------------- the shared setting


def run_config(args: argparse.Namespace, method: str, seed: int) -> Any:
    """The recipe with ``method.name``, seed, run folder and benchmark settings applied (an AdaptConfig)."""
    from mmtransfer.assemble.domains import AdaptConfig
    from mmtransfer.config import ConfigError, load_config

    run_dir = Path(args.out) / "mmtransfer" / method / f"seed{seed}"
    # Each row is one method on both sides: the recipe's Minimum Class Confusion only in the MCC row (skada's MCC).
    mcc = [f"method.mcc_weight={MCC_WEIGHT}"] if method == "mcc" else ["method.mcc_weight=0"]
    overrides = [*args.overrides, f"method.name={'none' if method == 'mcc' else method}", *mcc, f"train.seed={seed}",
                 "train.trackers=[]", "train.progress_bar=false",
                 "train.eval_every=0", "train.resume=null", "plot.enabled=false"]
    if args.steps is not None:
        overrides.append(f"train.max_steps={args.steps}")
    if args.max_samples is not None:
        overrides += [f"data.{s}.{k}" for s in ("source", "target", "target_test")
                      for k in (f"max_samples={args.max_samples}", "sample=balanced")]
    cfg = load_config(AdaptConfig, args.recipe, overrides)
    cfg.train.output_dir = str(run_dir)  # set here, not as an override: YAML would read some paths as other things
    if cfg.task != "classify" or cfg.data.target is None or cfg.data.target_test is None or cfg.data.extra_sources:
        raise ConfigError(f"{args.recipe} must be a classify recipe with one source, data.target and data.target_test "
                          "(e.g. configs/digits_mnist_usps_dann.yaml).")
    if method == "cdan" and cfg.method.randomized is None:
        # The full 500 x 10 map, as configs/digits_mnist_usps_cdan.yaml: skada's randomized map re-seeds torch's
        # global generator at every step (NOTES), which would fix the dropout masks of its runs.
        cfg.method.randomized = False
    return cfg


class DigitTensors(NamedTuple):
    """The recipe's data sections through the model's preprocessor, once for every run.

    Shapes:
        source_x: (Ns, 3, S, S), source_y: (Ns,), target_x: (Nt, 3, S, S), test_x: (Nq, 3, S, S), test_y: (Nq,).
    """

    source_x: Any
    source_y: Any
    target_x: Any
    test_x: Any
    test_y: Any
    class_names: list[str]
    seconds: float


def load_tensors(cfg: Any) -> DigitTensors:
    """Load source, target and target test as the recipe names them and preprocess them as its model does."""
    from mmtransfer import data as mmdata
    from mmtransfer.assemble.domain_data import _labels, class_names_of, preprocess_all
    from mmtransfer.models.classifier import BackboneClassifier

    started = time.perf_counter()
    source, target, test = (mmdata.load(s) for s in (cfg.data.source, cfg.data.target, cfg.data.target_test))
    names = class_names_of(source, "source")
    pre = BackboneClassifier(cfg.classifier, len(names), names).preprocessor
    return DigitTensors(preprocess_all(source, pre), _labels(source), preprocess_all(target, pre), preprocess_all(test, pre),
                        _labels(test), names, time.perf_counter() - started)


# ----------------------------------------------------------------------------- skada's side


def skada_parts() -> dict[str, Any]:
    """The skada and skorch classes the skada side is made of (imported once skada is known to be there)."""
    import torch
    from skada.deep import CDAN, DAN, DANN, MCC, DeepCoral
    from skada.deep.base import DomainBalancedSampler
    from skada.deep.modules import GradientReversalLayer
    from skorch.callbacks import Callback
    from torch import nn

    from mmtransfer.losses.domain import DomainDiscriminator

    class SkadaClassifier(nn.Module):
        """A BackboneClassifier as skada takes a module: pixels in, logits out; its bottleneck is the hooked layer."""

        def __init__(self, classifier: nn.Module) -> None:
            super().__init__()
            self.classifier = classifier

        def forward(self, X: torch.Tensor, sample_weight: torch.Tensor | None = None) -> torch.Tensor:
            return self.classifier(X).logits  # (B, C)

    class SkadaDiscriminator(nn.Module):
        """mmtransfer's discriminator behind skada's GradientReversalLayer, returning P(target) for skada's BCELoss.

        With the same batch and weights, skada's DANN loss and every gradient equal mmtransfer's (constant lambda).
        """

        def __init__(self, in_dim: int, d: Any, alpha: float) -> None:
            super().__init__()
            self.net = DomainDiscriminator(in_dim, d.hidden_dim, d.num_layers, d.batch_norm, d.dropout)
            self.alpha = alpha

        def forward(self, x: torch.Tensor, sample_weight: torch.Tensor | None = None) -> torch.Tensor:
            # mmtransfer's logit says "source" above 0; skada's BCELoss labels the target 1: the same function.
            return torch.sigmoid(-self.net(GradientReversalLayer.apply(x, self.alpha)))  # (N,) P(target)

    class StepsLoader(torch.utils.data.DataLoader):
        """skada's domain-balanced batches (B source + B target), exactly ``steps`` of them; each domain reshuffles when used up."""

        def __init__(self, dataset: Any, batch_size: int, steps: int, **_skorch_defaults: Any) -> None:
            sampler = DomainBalancedSampler(dataset, batch_size, max_samples="max")
            sampler.num_samples = steps * batch_size  # pairs (source, target) drawn in the epoch
            super().__init__(dataset, batch_size=2 * batch_size, sampler=sampler)

    class StepRecorder(Callback):
        """The learning rates each training batch ran with, as (lr, base_lr) of every group: one entry per optimizer step."""

        def initialize(self) -> "StepRecorder":
            self.steps: list[list[tuple[float, float]]] = []
            return self

        def on_batch_begin(self, net: Any, batch: Any = None, training: bool = False, **kwargs: Any) -> None:
            if training:
                self.steps.append([(float(g["lr"]), float(g["base_lr"])) for g in net.optimizer_.param_groups])

    return {"estimators": {"DANN": DANN, "CDAN": CDAN, "DeepCoral": DeepCoral, "DAN": DAN, "MCC": MCC}, "classifier": SkadaClassifier,
            "discriminator": SkadaDiscriminator, "loader": StepsLoader, "recorder": StepRecorder}


class MatchedOptimizer:
    """skorch's optimizer factory: the trainer's parameter groups (decay rules, tower rate) and optimizer.

    skorch hands over plain parameter lists; the groups are rebuilt over the
    classifier (so its pretrained towers, if any, are found) plus the rest (the discriminator).
    """

    def __init__(self, optim: Any, classifier: Any) -> None:
        self.optim, self.classifier = optim, classifier

    def __call__(self, groups: list[dict[str, Any]], **_skorch_kwargs: Any) -> Any:
        from torch import nn

        from mmtransfer.train import parameter_groups

        mine = {id(p) for p in self.classifier.parameters()}
        holder = nn.Module()
        holder.classifier = self.classifier
        holder.rest = nn.ParameterList([p for g in groups for p in g["params"] if id(p) not in mine])
        return self.optim.make_optimizer(parameter_groups(holder, self.optim))


def skada_estimator(cfg: Any, method: str, num_classes: int, parts: dict[str, Any], device: str) -> tuple[Any, Any]:
    """skada's net for ``method`` around a new classifier (seed it first) with the recipe's settings, and its step recorder."""
    import torch
    from skorch.callbacks import GradientNormClipping, LRScheduler

    from mmtransfer.models.classifier import BackboneClassifier

    m, t, o = cfg.method, cfg.train, cfg.optim
    classifier = BackboneClassifier(cfg.classifier, num_classes)
    pooled = m.features == "pooled"
    dim = int(classifier.backbone.width) if pooled else classifier.features_dim
    recorder = parts["recorder"]()
    callbacks = [LRScheduler(policy=torch.optim.lr_scheduler.LambdaLR, step_every="batch",
                             lr_lambda=lambda step: o.lr_multiplier(step, t.max_steps)), ("steps", recorder)]
    if o.grad_clip > 0:
        callbacks.append(GradientNormClipping(gradient_clip_value=o.grad_clip))
    common = dict(module=parts["classifier"](classifier), layer_name="classifier.backbone" if pooled else "classifier.bottleneck",
                  batch_size=t.batch_size, max_epochs=1, train_split=None, lr=o.lr, optimizer=MatchedOptimizer(o, classifier),
                  iterator_train__steps=t.max_steps, iterator_valid__batch_size=t.eval_batch_size,
                  callbacks=callbacks, device=device, verbose=0)
    estimator = parts["estimators"][METHODS[method][1]]
    if method in ADVERSARIAL:
        in_dim = dim
        extra: dict[str, Any] = {}
        if method == "cdan":
            randomized = m.randomized if m.randomized is not None else dim * num_classes > 4096
            in_dim = m.randomized_dim if randomized else dim * num_classes
            extra["max_features"] = in_dim  # skada randomizes exactly when D * C exceeds it, to this width
        disc = parts["discriminator"](in_dim, m.discriminator, m.lambda_max)
        # skada adds the source and target BCE means; mmtransfer averages them: half the weight is the same objective.
        net = estimator(reg=m.weight / 2, domain_classifier=disc, **extra, **common)
    elif method == "mcc":
        net = estimator(reg=MCC_WEIGHT, T=MCC_TEMPERATURE, **common)
    else:
        net = estimator(reg=m.weight, **common)
    # skada's functions fix iterator_train to their DomainBalancedDataLoader; the same batches, a fixed number of them.
    return net.set_params(iterator_train=parts["loader"]), recorder


def run_skada(cfg: Any, method: str, tensors: DigitTensors, parts: dict[str, Any]) -> dict[str, Any]:
    """Train skada's counterpart of ``method`` with ``cfg``'s seed and steps; its target accuracy and minutes."""
    import numpy as np
    import torch
    from accelerate.utils import set_seed

    started = time.perf_counter()
    set_seed(cfg.train.seed, device_specific=False)  # as the trainer, before the model's weights are drawn
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net, recorder = skada_estimator(cfg, method, len(tensors.class_names), parts, device)
    ns, nt = len(tensors.source_x), len(tensors.target_x)
    X = {"X": torch.cat([tensors.source_x, tensors.target_x]),  # (Ns + Nt, 3, S, S)
         "sample_domain": np.array([1] * ns + [-2] * nt)}  # skada: sources > 0, targets < 0
    y = torch.cat([tensors.source_y, torch.full((nt,), -1, dtype=torch.long)])  # -1: no label
    fit_started = time.perf_counter()
    net.fit(X, y)
    train_seconds = time.perf_counter() - fit_started
    check_skada_steps(cfg, recorder.steps)
    pred = net.predict({"X": tensors.test_x, "sample_domain": np.full(len(tensors.test_x), -2)})
    acc = 100.0 * float((torch.as_tensor(pred) == tensors.test_y).float().mean())
    return {"target_acc": acc, "steps": len(recorder.steps), "minutes": (time.perf_counter() - started) / 60,
            "train_minutes": train_seconds / 60}


def check_skada_steps(cfg: Any, steps: list[list[tuple[float, float]]]) -> None:
    """Fail unless skorch made exactly ``train.max_steps`` steps, each group at the trainer's learning rate of that step."""
    total, o = cfg.train.max_steps, cfg.optim
    if len(steps) != total:
        raise RuntimeError(f"skada made {len(steps)} optimizer steps, mmtransfer makes {total}: the step counts must match.")
    for step, groups in enumerate(steps):
        mult = o.lr_multiplier(step, total)
        for lr, base in groups:
            if abs(lr - base * mult) > 1e-9 * max(base, 1e-12):
                raise RuntimeError(f"skada's learning rate at step {step} is {lr:.3g}, the trainer's {base * mult:.3g}: "
                                   "the schedules must match.")


# ----------------------------------------------------------------------------- mmtransfer's side


def run_mmtransfer(cfg: Any) -> dict[str, Any]:
    """Run the recipe through ``mmtransfer.recipes.adapt`` in a fresh run folder; its target accuracy and minutes."""
    from mmtransfer.recipes import adapt

    run_dir = Path(cfg.train.output_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    started = time.perf_counter()
    summary = adapt.run(cfg)
    minutes = (time.perf_counter() - started) / 60
    if summary["steps"] != cfg.train.max_steps:
        raise RuntimeError(f"mmtransfer made {summary['steps']} optimizer steps, not train.max_steps={cfg.train.max_steps}.")
    saved = json.loads((run_dir / "summary.json").read_text())
    return {"target_acc": float(summary["metrics"]["target_acc"]), "steps": summary["steps"], "minutes": minutes,
            "train_minutes": saved["train_seconds_this_session"] / 60, "run_dir": str(run_dir)}


# ----------------------------------------------------------------------------- the table


def _stat(values: list[float], digits: int = 1) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {std:.{digits}f}"


def make_table(results: dict[str, dict[str, list[dict[str, Any]]]]) -> str:
    """One row per method: target accuracy mean ± std of each side, minutes per run (whole run and training loop)."""
    lines = ["| method (mmtransfer / skada) | mmtransfer target acc (%) | skada target acc (%) "
             "| minutes per run, mmtransfer / skada | training-loop minutes, mmtransfer / skada |",
             "|---|---:|---:|---|---|"]
    for method, sides in results.items():
        ours, theirs = sides["mmtransfer"], sides["skada"]
        mean = lambda runs, k: statistics.fmean(r[k] for r in runs)  # noqa: E731
        lines.append(f"| {METHODS[method][0]} / {METHODS[method][1]} | {_stat([r['target_acc'] for r in ours])} "
                     f"| {_stat([r['target_acc'] for r in theirs])} | {mean(ours, 'minutes'):.2f} / {mean(theirs, 'minutes'):.2f} "
                     f"| {mean(ours, 'train_minutes'):.2f} / {mean(theirs, 'train_minutes'):.2f} |")
    return "\n".join(lines)


def notes(cfg: Any, methods: list[str]) -> list[str]:
    """What the two sides share and where they differ, from the resolved recipe."""
    m, t, o, d = cfg.method, cfg.train, cfg.optim, cfg.method.discriminator
    name = getattr(o, "name", "adamw")
    opt = {"adamw": "AdamW", "sgd": "SGD (Nesterov)"}.get(name, name)
    out = [f"Both sides: BackboneClassifier({cfg.classifier.backbone}, bottleneck {cfg.classifier.bottleneck_dim}) with the "
           "same initial weights (set_seed(seed) just before it is built, as the trainer does), the same preprocessed "
           f"pixels, {t.batch_size} source + {t.batch_size} target images per step, {t.max_steps} optimizer steps (counted "
           f"on both), {opt} lr {o.lr:g}, weight decay {o.weight_decay:g} (not on biases and norms), {o.schedule} schedule "
           f"with {o.warmup_steps} warm-up steps (set per batch, checked on skada's side), "
           + (f"gradient norm clipped at {o.grad_clip:g}" if o.grad_clip > 0 else "no gradient clipping")
           + "; target accuracy after the last step."]
    if any(x in ADVERSARIAL for x in methods):
        out.append("DANN, CDAN: skada's default DomainClassifier (100 hidden units) ends in a Softmax over its single "
                   "output, a constant 1 with zero gradient (skada 0.6.0), so it would train source-only; skada's nets get "
                   f"mmtransfer's discriminator ({d.num_layers} x {d.hidden_dim}, batch norm {str(d.batch_norm).lower()}, "
                   "the same initial weights) behind skada's GradientReversalLayer, its logit turned into P(target) for "
                   "skada's BCELoss.")
        scale = "" if m.lambda_max == 1 else f"{m.lambda_max:g} x "
        ramp = (f"ramps it as {scale}(2 / (1 + exp(-{m.gamma:g} p)) - 1) over training progress p" if m.schedule == "dann"
                else "keeps it constant too")
        out.append(f"Gradient reversal: skada's strength is constant (alpha = {m.lambda_max:g}; it has no schedule); "
                   f"mmtransfer {ramp}. skada adds the source and target BCE means where mmtransfer averages them: "
                   f"skada's reg = {m.weight / 2:g} (half of method.weight = {m.weight:g}) gives the same objective.")
    if "cdan" in methods:
        out.append("CDAN: skada conditions on the raw logits (gradients flow into them), mmtransfer on detached softmax "
                   "probabilities. The full features x classes map on both sides unless the recipe sets method.randomized "
                   "(skada's randomized map re-seeds torch's global generator with 42 at every step).")
    if "mmd" in methods:
        out.append("DAN vs MMD: skada's DAN sums 33 kernels exp(-|x - y| / sigma), sigmas from the median source distance; "
                   f"mmtransfer's MMD {len(m.mmd_bandwidths)} Gaussian kernels on squared distances scaled by the batch's "
                   f"mean squared distance. reg = method.weight = {m.weight:g}.")
    if "mcc" in methods:
        out.append(f"MCC: Minimum Class Confusion alone (mmtransfer: method.name=none, method.mcc_weight={MCC_WEIGHT:g}; skada: "
                   f"MCC reg={MCC_WEIGHT:g}, T={MCC_TEMPERATURE:g}). The other rows run without it (method.mcc_weight=0).")
    if "coral" in methods:
        out.append(f"DeepCORAL and CORAL compute the same loss, ||C_s - C_t||_F^2 / (4 d^2); reg = method.weight = {m.weight:g}.")
    out.append("Minutes: the whole run (mmtransfer: loading and preprocessing its data, evaluating source and target, "
               "saving; skada: its tensors are prepared once for every run) and the training loop alone.")
    return out


def save(out: Path, title: str, table: str, note_lines: list[str], payload: dict[str, Any]) -> None:
    """Write results.md (title, table, notes) and results.json (every run's numbers) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    md = f"{title}:\n\n{table}\n\n" + "\n".join(f"- {n}" for n in note_lines) + "\n"
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps({**payload, "table": table, "notes": note_lines}, indent=2))


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS), help="mmtransfer method names")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps on both sides (default: the recipe's train.max_steps)")
    parser.add_argument("--max-samples", type=int, default=None,
                        help="at most N images of source, target and target test each (a balanced sample)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--recipe", default=str(DEFAULT_RECIPE), help="an mmtransfer classify recipe (YAML)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench_skada"), help="folder of the runs and results.{md,json}")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="recipe overrides for both sides, after -- (e.g. -- method.weight=0.5)")
    args = parser.parse_args(argv)
    for name in ("steps", "max_samples", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1.")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every (method, seed) on both sides, print the table and write results.{md,json}; returns what was written."""
    args = parse_args(argv)
    require_skada()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    parts = skada_parts()
    tensors = load_tensors(run_config(args, args.methods[0], args.seeds[0]))
    print(f"{len(tensors.source_x)} source, {len(tensors.target_x)} target, {len(tensors.test_x)} test images "
          f"preprocessed in {tensors.seconds:.1f} s", flush=True)
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for method in args.methods:
        results[method] = {"mmtransfer": [], "skada": []}
        for seed in args.seeds:
            cfg = run_config(args, method, seed)
            ours, theirs = run_mmtransfer(cfg), run_skada(cfg, method, tensors, parts)
            results[method]["mmtransfer"].append({"seed": seed, **ours})
            results[method]["skada"].append({"seed": seed, **theirs})
            print(f"{method} seed {seed}: mmtransfer {ours['target_acc']:.1f}% in {ours['minutes']:.2f} min, skada "
                  f"{METHODS[method][1]} {theirs['target_acc']:.1f}% in {theirs['minutes']:.2f} min", flush=True)
    cfg = run_config(args, args.methods[0], args.seeds[0])
    title = (f"{cfg.data.source.name} -> {cfg.data.target.name}, target accuracy ({cfg.data.target_test.name}:"
             f"{cfg.data.target_test.split}) mean ± std over seeds {args.seeds}, {cfg.train.max_steps} steps")
    table, note_lines = make_table(results), notes(cfg, args.methods)
    print(f"\n{title}:\n\n{table}\n")
    print("\n".join(f"- {n}" for n in note_lines))
    payload = {"title": title, "recipe": str(args.recipe), "seeds": args.seeds, "steps": cfg.train.max_steps,
               "max_samples": args.max_samples, "preprocess_seconds": tensors.seconds, "results": results}
    save(Path(args.out), title, table, note_lines, payload)
    return {**payload, "table": table, "notes": note_lines}


if __name__ == "__main__":
    main()
