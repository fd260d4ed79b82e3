"""Transfer to image classification: the recipe behind ``scripts/transfer_classify.py``.

Modes:
    zero-shot      class names only: prompt ensemble in the shared space.
    linear-probe   train the head on frozen image features (text- or randomly initialised).
    finetune       train the image tower, projection and head together.
    lp-ft          a linear probe first, then everything (keeps the features from being distorted early).
    wise-ft        finetune (or lp-ft with method.wise_base=lp-ft), then interpolate between the
                   zero-shot and fine-tuned weights; the best mixing coefficient on validation wins.

Few-shot: ``data.shots=[1, 2, 4]`` and ``method.seeds=[0, 1, 2]`` repeat training on k
labelled images per class and report mean ± std. All training goes through the
one training loop (:mod:`mmtransfer.train`).
"""

from __future__ import annotations

import copy
import json
import logging
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from torch import nn

from ..config import at_least, check_ranges
from ..data.config import DataConfig, cache_root
from ..models.preprocess import AugmentConfig
from ..objectives.labels import ClassificationTask
from ..train import OptimConfig, TrainConfig

logger = logging.getLogger(__name__)

MODES = ("zero-shot", "linear-probe", "finetune", "lp-ft", "wise-ft")


@dataclass
class ClassifyDataSection:
    """Labelled data: train (for the trained modes), validation (WiSE-FT's choice), test."""

    train: DataConfig | None = None
    validation: DataConfig | None = None
    test: DataConfig = field(default_factory=lambda: DataConfig(name="openmoji", split="unseen"))
    # A text file with one class name per line, in label order (None: the dataset's label names).
    class_names_file: str | None = None
    # Candidate classes: "present" = only the labels that occur in the test split (e.g. the
    # 383 unseen emoji names of openmoji's unseen split), "all" = every class name.
    classes: Literal["present", "all"] = "present"
    # Few-shot: labelled images per class drawn from train, one run per value (None: all of train).
    shots: list[int] | None = None
    # Images the model was trained on (e.g. {name: openmoji, split: train}), never the test
    # images: class names close to many of them (hubs) are marked down by method.hub_weight
    # times the mean of their method.hub_k highest cosines to them (CSLS), so that names
    # which no image reaches get their share of predictions. None: plain cosine scores.
    hub_reference: DataConfig | None = None
    # Train-time augmentation for the finetune phases.
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        check_ranges(self, shots=at_least(1))


@dataclass
class TransferMethodConfig:
    """What to do with the class names and the labelled images."""

    # zero-shot, linear-probe, finetune, lp-ft or wise-ft.
    mode: Literal["zero-shot", "linear-probe", "finetune", "lp-ft", "wise-ft"] = "zero-shot"
    # Prompt templates with "{}" for the class name (None: mmtransfer.transfer.DEFAULT_TEMPLATES).
    templates: list[str] | None = None
    # With data.hub_reference: how many nearest reference images measure a class's hubness,
    # and the share of it subtracted from the class's cosine score.
    hub_k: int = 10
    hub_weight: float = 0.25
    # Head initialisation for the trained modes: "text" (class-name embeddings) or "random".
    head_init: Literal["text", "random"] = "text"
    # Also train the same runs with the other head initialisation, to compare them.
    compare_head_init: bool = False
    # LP-FT: steps of the linear-probe phase (the finetune phase takes train.max_steps).
    probe_steps: int = 200
    # WiSE-FT: fine-tune with "finetune" or "lp-ft" before interpolating.
    wise_base: Literal["finetune", "lp-ft"] = "finetune"
    # WiSE-FT: mixing coefficients swept (0 = zero-shot, 1 = fine-tuned).
    wise_alphas: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    # Seeds: each few-shot draw and training run is repeated per seed (mean ± std).
    seeds: list[int] = field(default_factory=lambda: [0])

    def __post_init__(self) -> None:
        check_ranges(self, hub_k=at_least(1), hub_weight=at_least(0), probe_steps=at_least(1), seeds=at_least(0))


@dataclass
class ClassifyConfig:
    """A transfer-to-classification run; YAML recipes map onto it one-to-one."""

    # A saved model folder (e.g. runs/openmoji_contrastive/model) or a preset name.
    model: str = "runs/openmoji_contrastive/model"
    data: ClassifyDataSection = field(default_factory=ClassifyDataSection)
    method: TransferMethodConfig = field(default_factory=TransferMethodConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="runs/transfer_classify", max_steps=300,
                                                                   batch_size=32, trackers=[], save_every=0))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, tower_lr=1e-5, warmup_steps=20))


# ----------------------------------------------------------------------------- the task


class _Features(torch.utils.data.Dataset):
    """Cached pooled image-tower features with labels."""

    def __init__(self, pooled: torch.Tensor, labels: torch.Tensor) -> None:
        self.pooled, self.labels = pooled, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image_pooled": self.pooled[i], "labels": self.labels[i]}


# ----------------------------------------------------------------------------- helpers


def read_class_names(path: str | Path) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data.class_names_file '{p}' does not exist; give a text file with one class name per line.")
    names = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if not names:
        raise ValueError(f"data.class_names_file '{p}' holds no class names.")
    return names


def few_shot_indices(labels: Sequence[int], shots: int, seed: int) -> list[int]:
    """``shots`` rows per class (all of a class that has fewer), drawn with ``seed``; sorted.

    Example:
        >>> few_shot_indices([0, 0, 1, 1, 1], 1, seed=0)
        [1, 3]
    """
    g = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    out: list[int] = []
    for y in sorted(by_class):
        rows = by_class[y]
        pick = torch.randperm(len(rows), generator=g)[:shots].tolist()
        out += [rows[j] for j in pick]
    return sorted(out)


@torch.no_grad()
def pooled_features(model: Any, dataset: Any, batch_size: int, progress: bool = True,
                    cache_dir: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Image-tower pooled features (N, Di) and labels (N,) of a dataset (None when it has no labels).

    ``model`` is anything with ``image_encoder`` and ``preprocessor`` (a
    MultimodalModel or an ImageClassifier). With ``cache_dir`` the features are
    kept on disk, keyed by the tower's weights and the data (the same files that
    caption fine-tuning with a frozen tower writes and reads).
    """
    from .. import data as mmdata
    from ..features import image_features, with_row_ids

    ds = with_row_ids(dataset)
    loader = mmdata.make_loader(ds, mmdata.ImageCollator(model.preprocessor), batch_size)
    feats = image_features(model.image_encoder, loader, len(ds), keep_tokens=False, progress=progress,
                           cache_dir=cache_dir, data_key=f"{ds._fingerprint}")
    labels = torch.tensor(ds["label"], dtype=torch.long) if "label" in ds.column_names else None
    return feats.pooled, labels


@torch.no_grad()
def evaluate_classifier(classifier: nn.Module, pooled: torch.Tensor, labels: torch.Tensor, batch_size: int = 1024) -> tuple[torch.Tensor, dict[str, Any]]:
    """Logits (N, C) from cached pooled features and the metrics of :func:`classification_metrics`."""
    from ..evaluate import classification_metrics

    classifier.eval()
    device = classifier.head.weight.device
    logits = torch.cat([classifier.head(classifier.embed(pooled=pooled[i:i + batch_size].to(device))).float().cpu()
                        for i in range(0, len(pooled), batch_size)])
    return logits, classification_metrics(logits, labels, classifier.class_names)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


# ----------------------------------------------------------------------------- the recipe


def _zero_shot(cfg: ClassifyConfig, base: Any, names: list[str], templates: list[str], test_x: torch.Tensor,
               test_y: torch.Tensor, features_dir: Path) -> tuple[Any, Any, torch.Tensor, dict[str, float], dict[str, Any]]:
    """The class-name head (hub-corrected with data.hub_reference), its classifier, test logits, metrics and the results so far."""
    from ..transfer import ImageClassifier, LinearHead

    reference = _hub_reference(base, cfg, features_dir)
    zs_head = LinearHead.from_text(base, names, templates, reference, cfg.method.hub_k, cfg.method.hub_weight)
    zero_shot = ImageClassifier(base, zs_head, names)
    zs_logits, zs_metrics = evaluate_classifier(zero_shot, test_x, test_y)
    results: dict[str, Any] = {"mode": cfg.method.mode, "classes": len(names), "test_images": len(test_y),
                               "chance_top1": 100.0 / len(names), "templates": templates,
                               "zero_shot": _brief(zs_metrics)}
    if reference is not None:
        plain = ImageClassifier(base, LinearHead(zs_head.weight.detach(), scale=float(zs_head.scale)), names)
        results["zero_shot_plain"] = _brief(evaluate_classifier(plain, test_x, test_y)[1])
        results["hub"] = {"reference_images": len(reference), "k": cfg.method.hub_k, "weight": cfg.method.hub_weight}
    logger.info("zero-shot top-1 %.2f%%, top-5 %.2f%% over %d classes (chance %.2f%%)",
                zs_metrics["top1"], zs_metrics.get("top5", float("nan")), len(names), 100.0 / len(names))
    return zs_head, zero_shot, zs_logits, zs_metrics, results


def run(cfg: ClassifyConfig, fast_dev_run: bool = False) -> dict[str, Any]:
    """Run the configured transfer mode; writes results.json, results.md and plots to the run folder."""
    from .. import data as mmdata
    from ..distributed import is_main_process
    from ..models.factory import create_model, load
    from ..transfer import DEFAULT_TEMPLATES, ImageClassifier, LinearHead

    run_dir = _check_and_prepare(cfg, fast_dev_run)
    mode = cfg.method.mode

    path = Path(cfg.model)
    # A preset's new projections are drawn at random: seeded, so every run and every process draws the same.
    torch.manual_seed(cfg.train.seed)
    base = load(str(path)) if path.is_dir() else create_model(cfg.model)
    base.eval()
    templates = cfg.method.templates or list(DEFAULT_TEMPLATES)

    def load_split(section: DataConfig | None) -> Any:
        return None if section is None else mmdata.load(section)

    test_ds = load_split(cfg.data.test)
    names = read_class_names(cfg.data.class_names_file) if cfg.data.class_names_file else list(test_ds.features["label"].names)
    # The frozen base tower's features stay on disk for later evaluations of models that share it.
    features_dir = cache_root(cfg.data.test) / "features"
    test_x, test_y = pooled_features(base, test_ds, cfg.train.eval_batch_size, cache_dir=features_dir)
    if int(test_y.max()) >= len(names):
        raise ValueError(f"The test labels go up to {int(test_y.max())} but there are only {len(names)} class names.")
    # Label remapping (identity for "all"): original label id -> position among the candidates.
    names, remap = _candidates(names, test_y, cfg.data.classes)
    test_y = remap[test_y]
    logger.info("%d candidate classes (%s), e.g. %s", len(names), cfg.data.classes, ", ".join(names[:5]))
    val_ds = _relabel(load_split(cfg.data.validation), remap)
    train_ds = _relabel(load_split(cfg.data.train), remap)
    train_ds, draws = _few_shot_draws(train_ds, cfg)
    train = pooled_features(base, train_ds, cfg.train.eval_batch_size) if train_ds is not None else None

    zs_head, zero_shot, zs_logits, zs_metrics, results = _zero_shot(cfg, base, names, templates, test_x, test_y, features_dir)
    best_logits, best_metrics = zs_logits, zs_metrics

    if mode != "zero-shot":
        tower_trained = mode in ("finetune", "lp-ft", "wise-ft")
        inits = [cfg.method.head_init] + ([{"text": "random", "random": "text"}[cfg.method.head_init]] if cfg.method.compare_head_init else [])
        shots_list = cfg.data.shots or [None]
        runs: dict[str, dict[str, list[float]]] = {}
        for init in inits:
            for shots in shots_list:
                key = f"{init}-init" + (f"/{shots}-shot" if shots else "")
                for seed in cfg.method.seeds:
                    rows = draws[(shots, seed)] if shots else list(range(len(train[1])))
                    head = zs_head if init == "text" else LinearHead.random(len(names), zs_head.weight.shape[1], seed, float(zs_head.scale))
                    clf = ImageClassifier(copy.deepcopy(base), copy.deepcopy(head), names)
                    out_dir = run_dir / key.replace("/", "_") / f"seed{seed}"
                    clf = _train_mode(cfg, mode, clf, train_ds, train, rows, seed, out_dir)
                    if mode == "wise-ft":
                        clf, alpha, sweep = _wise_sweep(cfg, clf, zero_shot, val_ds if val_ds is not None else test_ds)
                        runs.setdefault(key, {}).setdefault("alpha", []).append(alpha)
                        runs[key].setdefault("sweep", []).append(sweep)
                    # A trained tower changes the features: recompute them for the test set.
                    x = pooled_features(clf, test_ds, cfg.train.eval_batch_size)[0] if tower_trained else test_x
                    logits, metrics = evaluate_classifier(clf, x, test_y)
                    for m in ("top1", "top5", "macro_f1"):
                        if m in metrics:
                            runs.setdefault(key, {}).setdefault(m, []).append(metrics[m])
                    logger.info("%s seed %d: test top-1 %.2f%%", key, seed, metrics["top1"])
                    if init == cfg.method.head_init and shots == shots_list[-1] and seed == cfg.method.seeds[0]:
                        best_logits, best_metrics = logits, metrics
        results["runs"] = {k: {m: (mean_std(v) if m != "sweep" else v) for m, v in d.items()} for k, d in runs.items()}

    results["final"] = _brief(best_metrics)
    if is_main_process():  # every process holds the same results; one writes them
        _write_results(run_dir, results, best_logits, best_metrics, test_y, names)
    results["run_dir"] = str(run_dir)
    return results


def _write_results(run_dir: Path, results: dict[str, Any], logits: torch.Tensor, metrics: dict[str, Any],
                   labels: torch.Tensor, names: list[str]) -> None:
    """results.json, results.md (per class) and confusion.png of the final model."""
    from ..evaluate import confusion_matrix, plot_confusion

    conf = confusion_matrix(logits.argmax(1), labels, len(names))
    plot_confusion(conf, names, run_dir / "confusion.png", title=f"{results['mode']}: test confusion (row-normalised)")
    (run_dir / "results.json").write_text(json.dumps({**results, "per_class": metrics["per_class"]}, indent=2))
    (run_dir / "results.md").write_text(_markdown(results, metrics))


def _check_and_prepare(cfg: ClassifyConfig, fast_dev_run: bool) -> Path:
    """Refuse settings that cannot run, shrink a fast dev run, make the run folder; returns it."""
    from ..assemble.fast_dev import fast_dev_slice

    if fast_dev_run:
        fast_dev_slice(cfg.train, (cfg.data.train, cfg.data.validation, cfg.data.test), 96)
        cfg.method.seeds = cfg.method.seeds[:1]
        cfg.data.shots = cfg.data.shots[:1] if cfg.data.shots else None
        cfg.method.probe_steps = 2
        cfg.method.wise_alphas = [0.0, 0.5, 1.0]
    run_dir = Path(cfg.train.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    mode = cfg.method.mode
    if cfg.method.hub_k < 1 or cfg.method.hub_weight < 0:
        raise ValueError(f"method.hub_k must be at least 1 and method.hub_weight at least 0; got {cfg.method.hub_k} and "
                         f"{cfg.method.hub_weight} (data.hub_reference=null turns the hub correction off).")
    if mode != "zero-shot" and cfg.data.train is None:
        raise ValueError(f"method.mode={mode} trains on labelled images: set data.train (e.g. {{name: openmoji, split: train}}).")
    return run_dir


def _few_shot_draws(train_ds: Any, cfg: ClassifyConfig) -> tuple[Any, dict[tuple[int, int], list[int]]]:
    """Few-shot: k per class drawn from the whole split for every (k, seed); the split is cut to the drawn rows."""
    draws: dict[tuple[int, int], list[int]] = {}
    if train_ds is not None and cfg.data.shots:
        # Few-shot: draw k per class from the whole split, then compute features only for the drawn rows.
        labels = train_ds["label"]
        full = {(k, seed): few_shot_indices(labels, k, seed) for k in cfg.data.shots for seed in cfg.method.seeds}
        used = sorted({i for rows in full.values() for i in rows})
        position = {row: j for j, row in enumerate(used)}
        draws = {key: [position[i] for i in rows] for key, rows in full.items()}
        train_ds = train_ds.select(used)
        logger.info("few-shot: %d training images cover every draw of k in %s over %d seeds", len(used), cfg.data.shots, len(cfg.method.seeds))
    return train_ds, draws


def _candidates(names: list[str], test_y: torch.Tensor, classes: str) -> tuple[list[str], torch.Tensor]:
    """The candidate class names and the map from original label ids to their positions (-1: not a candidate)."""
    keep = sorted(set(test_y.tolist())) if classes == "present" else list(range(len(names)))
    remap = torch.full((len(names),), -1, dtype=torch.long)
    remap[torch.tensor(keep)] = torch.arange(len(keep))
    return [names[i] for i in keep], remap


def _hub_reference(base: Any, cfg: ClassifyConfig, features_dir: Path) -> torch.Tensor | None:
    """(N, E) normalised embeddings of the hub-correction images (None: no correction)."""
    from .. import data as mmdata

    if cfg.data.hub_reference is None:
        return None
    ref_x, _ = pooled_features(base, mmdata.load(cfg.data.hub_reference), cfg.train.eval_batch_size, cache_dir=features_dir)
    with torch.no_grad():
        reference = base.project_image(ref_x.to(base.device))  # (N, E) normalised
    logger.info("hub correction: %d reference images (%s), k=%d, weight %.2f",
                len(reference), cfg.data.hub_reference.name, cfg.method.hub_k, cfg.method.hub_weight)
    return reference


def _relabel(dataset: Any, remap: torch.Tensor) -> Any:
    """Map labels onto the candidate classes and drop rows of other classes."""
    if dataset is None:
        return None
    import numpy as np

    mapped = remap[torch.tensor(dataset["label"], dtype=torch.long)].numpy()
    keep = np.flatnonzero(mapped >= 0)
    if len(keep) == 0:
        raise ValueError("No training/validation image belongs to a candidate class; check data.classes and the splits.")
    from datasets import Value

    out = dataset.select(keep.tolist()).cast_column("label", Value("int64"))
    return out.remove_columns("label").add_column("label", mapped[keep].tolist())


def _brief(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k != "per_class"}


def _loader(ds: Any, batch_size: int, shuffle: bool, seed: int) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g)


def _fit(cfg: ClassifyConfig, clf: nn.Module, loader: Any, steps: int, out_dir: Path, seed: int) -> None:
    from ..train import Trainer

    train_cfg = replace(cfg.train, output_dir=str(out_dir), max_steps=steps, seed=seed, trackers=[], eval_every=0,
                        save_every=0, progress_bar=False)
    Trainer(ClassificationTask(clf), loader, train_cfg, cfg.optim).fit()


def _train_mode(cfg: ClassifyConfig, mode: str, clf: nn.Module, train_ds: Any, train: tuple[torch.Tensor, torch.Tensor],
                rows: list[int], seed: int, out_dir: Path) -> nn.Module:
    """Train ``clf`` per ``mode`` on the rows of the training set; returns it (in place)."""
    from .. import data as mmdata

    x, y = train[0][rows], train[1][rows]
    bs = min(cfg.train.batch_size, len(rows))
    probe_loader = _loader(_Features(x, y), bs, True, seed)
    base_mode = cfg.method.wise_base if mode == "wise-ft" else mode
    if base_mode in ("linear-probe", "lp-ft"):
        clf.image_encoder.requires_grad_(False)
        clf.image_projection.requires_grad_(False)
        steps = cfg.train.max_steps if base_mode == "linear-probe" else cfg.method.probe_steps
        _fit(cfg, clf, probe_loader, steps, out_dir / "probe", seed)
    if base_mode in ("finetune", "lp-ft"):
        clf.image_encoder.requires_grad_(True)
        clf.image_projection.requires_grad_(True)
        ds = train_ds.select(rows)
        collate = mmdata.LabelCollator(clf.preprocessor, train=True, augment=cfg.data.augment)
        loader = mmdata.make_loader(ds, collate, bs, shuffle=True, seed=seed, num_workers=cfg.train.num_workers)
        _fit(cfg, clf, loader, cfg.train.max_steps, out_dir / "finetune", seed)
        clf.image_encoder.eval()
    return clf


def _wise_sweep(cfg: ClassifyConfig, clf: nn.Module, zero_shot: nn.Module, select_ds: Any) -> tuple[nn.Module, float, dict[str, float]]:
    """Evaluate every mixing coefficient on ``select_ds`` (validation, else test); keep the best."""
    from ..transfer import interpolated

    zs_state = {k: v.detach().clone() for k, v in zero_shot.state_dict().items()}
    scores: dict[str, float] = {}
    best = (-1.0, 0.0)
    for alpha in cfg.method.wise_alphas:
        mixed = interpolated(clf, zs_state, alpha)
        x, y = pooled_features(mixed, select_ds, cfg.train.eval_batch_size, progress=False)
        top1 = evaluate_classifier(mixed, x, y)[1]["top1"]
        scores[f"{alpha:g}"] = top1
        if top1 > best[0]:
            best = (top1, alpha)
    logger.info("WiSE-FT sweep (top-1 by alpha): %s; best alpha %.2f", ", ".join(f"{a}: {v:.1f}" for a, v in scores.items()), best[1])
    return interpolated(clf, zs_state, best[1]), best[1], scores


def _markdown(results: dict[str, Any], metrics: dict[str, Any]) -> str:
    lines = [f"# Transfer results ({results['mode']})", "",
             f"{results['classes']} classes, {results['test_images']} test images, chance {results['chance_top1']:.2f}% top-1.", "",
             "| model | top-1 | top-5 | macro F1 |", "|---|---:|---:|---:|"]
    zs = results["zero_shot"]
    if "zero_shot_plain" in results:
        p = results["zero_shot_plain"]
        lines.append(f"| zero-shot, plain cosine | {p['top1']:.2f} | {p.get('top5', float('nan')):.2f} | {p['macro_f1']:.2f} |")
    hub = " (hub-corrected)" if "hub" in results else ""
    lines.append(f"| zero-shot{hub} | {zs['top1']:.2f} | {zs.get('top5', float('nan')):.2f} | {zs['macro_f1']:.2f} |")
    for key, d in results.get("runs", {}).items():
        def fmt(m: str) -> str:
            return f"{d[m][0]:.2f} ± {d[m][1]:.2f}" if m in d else "-"
        lines.append(f"| {key} | {fmt('top1')} | {fmt('top5')} | {fmt('macro_f1')} |")
    lines += ["", "## Per-class (final model)", "", "| class | support | precision | recall | F1 |", "|---|---:|---:|---:|---:|"]
    for row in metrics["per_class"]:
        lines.append(f"| {row['class']} | {row['support']} | {row['precision']:.1f} | {row['recall']:.1f} | {row['f1']:.1f} |")
    return "\n".join(lines) + "\n"
