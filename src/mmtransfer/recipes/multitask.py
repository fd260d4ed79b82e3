"""Multi-task training: several objectives and heads over one shared model, in one run.

One :class:`MultiTask` holds a :class:`~mmtransfer.MultimodalModel` and the
objectives that train it together:

- ``captions``: contrastive alignment (+ image-text matching) on captioned images
  (:class:`~mmtransfer.objectives.CaptionObjective`);
- ``labels``: cross-entropy of a linear head over the shared image embedding,
  initialised from the class names' text embeddings (:class:`LabelObjective`);
- ``domain``: a domain loss (DANN, MMD or CORAL, from :mod:`mmtransfer.losses.domain`)
  between the step's source images and unlabelled target images (:class:`DomainObjective`).

Each returns its loss and metrics; :class:`FixedWeighting` or
:class:`UncertaintyWeighting` adds the losses up. Every step holds a batch of
every enabled task, sized by the tasks' shares of ``train.batch_size``
(:class:`MixedBatchSampler`), so there is one backward per step and every
trainable parameter gets a gradient each step, as DDP wants. The recipe behind
``scripts/finetune_captions.py`` with a ``tasks`` section is :func:`run`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..assemble.captions import MultitaskConfig
from ..config import ConfigError
from ..data.mixed import CachedImageBatches, _LabelRows, batch_shares, mixed_loader
from ..objectives.multitask import TASKS, DomainObjective, LabelObjective, MultiTask
from ..objectives.weighting import FixedWeighting, UncertaintyWeighting
from ..transfer import ClassSet, _labels, classify_split, name_embeddings, save_label_head

logger = logging.getLogger(__name__)

CAPTION_SPLITS = ("train", "validation", "test")
TRAINING_SPLITS = ("train", "labels/train", "domain/target")
EVAL_LABEL_SPLITS = ("labels/validation", "labels/test", "zero_shot")


def _check(cfg: Any) -> Any:
    """Combinations that cannot work, each named in one sentence; returns the domain loss's MethodConfig (None: no domain task)."""
    t = cfg.tasks
    if not (t.captions.enabled or t.labels.enabled):
        raise ConfigError("Enable tasks.captions or tasks.labels: a multi-task run needs at least one of them "
                          "(the domain loss needs their images as its source).")
    bad = [tpl for tpl in t.templates if "{}" not in tpl]
    if not t.templates or bad:
        raise ConfigError(f"tasks.templates needs at least one template, each with '{{}}' where the class name goes; these have none: {bad}.")
    if t.labels.enabled and t.labels.test is None and t.labels.validation is None:
        logger.warning("tasks.labels trains a head but neither tasks.labels.validation nor tasks.labels.test is set: it is never evaluated.")
    if not t.domain.enabled:
        return None
    return t.domain.method.method()


def _fast_dev(cfg: Any) -> None:
    from ..assemble.fast_dev import fast_dev_slice

    t = cfg.tasks
    fast_dev_slice(cfg.train, (cfg.data.train, cfg.data.validation, cfg.data.test, t.labels.train, t.labels.validation,
                               t.labels.test, t.domain.target, t.zero_shot), 64)
    cfg.train.batch_size = min(cfg.train.batch_size, 16)


@dataclass
class _Data:
    """A multi-task run's splits, their load reports, and the class sets of the labels and zero-shot tasks."""

    splits: dict[str, Any]
    reports: dict[str, Any]
    classes: ClassSet | None
    zero_shot: ClassSet | None


def _load_data(cfg: Any, accelerator: Any) -> _Data:
    """Every enabled task's splits (main process first, so built-in sets are rendered once)."""
    from ..assemble.captions import load_split

    t = cfg.tasks
    sections = {
        "train": cfg.data.train if t.captions.enabled else None,
        "validation": cfg.data.validation,
        "test": cfg.data.test,
        "labels/train": t.labels.train if t.labels.enabled else None,
        "labels/validation": t.labels.validation,
        "labels/test": t.labels.test,
        "domain/target": t.domain.target if t.domain.enabled else None,
        "zero_shot": t.zero_shot,
    }
    reports: dict[str, Any] = {}
    with accelerator.main_process_first():
        splits = {name: load_split(name, section, reports) for name, section in sections.items() if section is not None}
    for name in ("train", "validation", "test"):
        if name in splits and not splits[name].captions:
            raise ConfigError(f"data.{name} has no captions: the caption task and retrieval evaluation need captioned images.")
    label_sources = [splits["labels/train"]] if t.labels.enabled else [splits[k] for k in ("labels/validation", "labels/test") if k in splits]
    classes = ClassSet.present([s.dataset for s in label_sources], "tasks.labels") if label_sources else None
    zero_shot = ClassSet.present([splits["zero_shot"].dataset], "tasks.zero_shot") if "zero_shot" in splits else None
    if classes is not None:
        logger.info("labels: %d classes (%s)", len(classes.names), ", ".join(classes.names[:5]))
    return _Data(splits, reports, classes, zero_shot)


def _cache_features(cfg: Any, model: Any, data: _Data, plan: Any, templates: Any, accelerator: Any) -> tuple[Any, dict[str, int]]:
    """Frozen towers: every split's image features, and the text of captions and class-name prompts, once."""
    from ..assemble.captions import cache_image_features, cache_text_features, caption_texts

    t, splits = cfg.tasks, data.splits
    texts = caption_texts({n: s for n, s in splits.items() if n in CAPTION_SPLITS}, templates)
    texts += [p for cs in (data.classes, data.zero_shot) if cs is not None for p in cs.prompts(t.templates)]
    text_cache, text_rows = None, {}
    model.to(accelerator.device)
    with accelerator.main_process_first():
        if plan.cache:
            for name, split in splits.items():
                cache_image_features(model, split, plan, cfg.data.augment, cfg.train.seed, cfg.train.eval_batch_size,
                                     accelerator.is_local_main_process, train=name in TRAINING_SPLITS,
                                     keep_tokens=plan.keep_tokens and name in CAPTION_SPLITS)
        if plan.text_frozen and (plan.cache or data.classes is not None or data.zero_shot is not None):
            text_cache, text_rows = cache_text_features(model, texts, plan, accelerator.is_local_main_process)
    return text_cache, text_rows


def _label_head(cfg: Any, model: Any, classes: ClassSet, text_cache: Any, text_rows: dict[str, int]) -> Any:
    """The label task's linear head: the class names' text embeddings, or nn.Linear's random range."""
    from ..transfer import LinearHead

    t = cfg.tasks
    with torch.no_grad():
        if t.labels.head_init == "text":
            # The temperature is folded into the rows (scale 1), so under Adam the head stays
            # close to the names and cross-entropy through it pulls images towards their
            # names' text embeddings (docs/multitask.md measures this).
            weight = name_embeddings(model, classes.names, t.templates, text_cache, text_rows) * model.get_logit_scale()
            return LinearHead(weight.cpu())  # (C, E)
        # nn.Linear's default range, U(-1/sqrt(E), 1/sqrt(E)), scale 1.
        g = torch.Generator().manual_seed(cfg.train.seed)
        bound = model.config.embed_dim ** -0.5
        return LinearHead((torch.rand(len(classes.names), model.config.embed_dim, generator=g) * 2 - 1) * bound)


def _task(cfg: Any, model: Any, use_itm: bool, method: Any, classes: ClassSet | None, text_cache: Any,
          text_rows: dict[str, int]) -> MultiTask:
    """The objectives over the one model, and how their losses add up."""
    from ..objectives.captions import CaptionObjective

    t = cfg.tasks
    captions = CaptionObjective(cfg.objective, use_itm) if t.captions.enabled else None
    if model.fusion is not None and not use_itm:
        model.fusion.requires_grad_(False)  # DDP: no parameter may go without a gradient
    if not t.captions.enabled:
        # Labels alone never read the text side or the temperature.
        model.text_projection.requires_grad_(False)
        model.logit_scale.requires_grad_(False)
    labels = LabelObjective(_label_head(cfg, model, classes, text_cache, text_rows)) if t.labels.enabled else None
    domain = None
    if method is not None:
        from ..objectives.domain import build_domain_loss, grl_lambda

        domain = DomainObjective(build_domain_loss(method, model.config.embed_dim, 0, cfg.train.seed), lambda p: grl_lambda(method, p))
    enabled = [k for k in TASKS if getattr(t, k).enabled]
    fixed = {k: getattr(t, k).weight for k in enabled}
    weighting = UncertaintyWeighting(enabled, fixed, t.init_log_var) if t.weighting == "uncertainty" else FixedWeighting(fixed)
    return MultiTask(model, captions, labels, domain, weighting)


def _train_loader(cfg: Any, model: Any, data: _Data, plan: Any, enabled: list[str], sizes: dict[str, int], templates: Any,
                  text_cache: Any, text_rows: dict[str, int]) -> Any:
    """Training data: every step holds each enabled task's share of train.batch_size."""
    from .. import data as mmdata
    from ..assemble.captions import caption_collator

    seed, splits, classes = cfg.train.seed, data.splits, data.classes
    train_names = {"captions": "train", "labels": "labels/train", "domain": "domain/target"}
    datasets = {k: splits[train_names[k]].dataset for k in enabled}
    collators: dict[str, Callable] = {}
    if plan.cache:
        if "captions" in enabled:
            collators["captions"] = caption_collator(model, splits["train"], plan, text_cache, text_rows, train=True, seed=seed,
                                                     templates=templates)
        for k, lookup in (("labels", classes.lookup if classes else None), ("domain", None)):
            if k in enabled:
                s = splits[train_names[k]]
                collators[k] = CachedImageBatches([s.image_feats, *s.augmented_feats],
                                                  None if lookup is None else lookup[_labels(s.dataset, "tasks.labels.train")])
    else:
        aug, pre = cfg.data.augment, model.preprocessor
        if "captions" in enabled:
            collators["captions"] = mmdata.CaptionCollator.from_model(model, train=True, augment=aug, seed=seed, templates=templates)
        if "labels" in enabled:
            collators["labels"] = _LabelRows(mmdata.ImageCollator(pre.with_augment(aug)), classes.lookup)
        if "domain" in enabled:
            collators["domain"] = mmdata.ImageCollator(pre.with_augment(aug))
    return mixed_loader(datasets, collators, sizes, seed, {k: not plan.cache for k in enabled}, cfg.train.num_workers)


def _eval_loaders(cfg: Any, model: Any, data: _Data, plan: Any, text_cache: Any, text_rows: dict[str, int]) -> dict[str, Any]:
    """Retrieval loaders of the captioned splits, image loaders of the labelled and zero-shot ones."""
    from .. import data as mmdata
    from ..assemble.captions import retrieval_loaders

    bs, splits = cfg.train.eval_batch_size, data.splits
    loaders: dict[str, Any] = {}
    for name in ("validation", "test"):
        if name in splits:
            loaders.update(retrieval_loaders(model, splits[name], plan, text_cache, text_rows, bs, cfg.train.seed))
    for name in EVAL_LABEL_SPLITS:
        if name in splits:
            s = splits[name]
            if plan.cache:
                loaders[name] = torch.utils.data.DataLoader(list(range(len(s.dataset))), batch_size=bs,
                                                            collate_fn=CachedImageBatches([s.image_feats]))
            else:
                loaders[name] = mmdata.make_loader(s.dataset, mmdata.ImageCollator(model.preprocessor), bs)
    return loaders


class _Evaluation:
    """Every task's metrics on the validation or test splits: retrieval, the head and class names, zero-shot names."""

    def __init__(self, cfg: Any, data: _Data, text_cache: Any, text_rows: dict[str, int]) -> None:
        self.cfg, self.data, self.text_cache, self.text_rows = cfg, data, text_cache, text_rows
        self.labels = {name: (data.zero_shot if name == "zero_shot" else data.classes).lookup[_labels(data.splits[name].dataset, name)]
                       for name in EVAL_LABEL_SPLITS if name in data.splits}

    def split(self, task: MultiTask, acc: Any, prepared: dict[str, Any], which: str) -> dict[str, float]:
        """Every task's metrics on the ``which`` ("validation" or "test") splits."""
        from ..objectives.captions import evaluate_retrieval

        m, templates, out = task.model, self.cfg.tasks.templates, {}
        if f"{which}/images" in prepared:
            r = evaluate_retrieval(m, acc, prepared[f"{which}/images"], prepared[f"{which}/captions"], self.cfg.data.rerank_k)
            out.update({f"captions/{k}": v for k, v in r.items()})
        scale = m.get_logit_scale()
        if f"labels/{which}" in prepared:
            names_z = name_embeddings(m, self.data.classes.names, templates, self.text_cache, self.text_rows)  # (C, E)
            fns: dict[str, Callable] = {"names_": lambda z: scale * z @ names_z.T}  # (N, E) @ (E, C)
            if task.labels is not None:
                fns[""] = task.labels.head
            r = classify_split(m, prepared[f"labels/{which}"], self.labels[f"labels/{which}"], fns, acc)
            out.update({f"labels/{k}": v for k, v in r.items()})
        if which == "test" and "zero_shot" in prepared:
            zs_z = name_embeddings(m, self.data.zero_shot.names, templates, self.text_cache, self.text_rows)  # (K, E)
            r = classify_split(m, prepared["zero_shot"], self.labels["zero_shot"], {"": lambda z: z @ zs_z.T}, acc)
            out.update({f"zero_shot/{k}": v for k, v in r.items()})
        return out

    def __call__(self, task: MultiTask, acc: Any, prepared: dict[str, Any]) -> dict[str, float]:
        return {f"val/{k}": v for k, v in self.split(task, acc, prepared, "validation").items()}


def run(cfg: MultitaskConfig, fast_dev_run: bool = False) -> dict[str, Any]:
    """Train and evaluate a multi-task run per ``cfg``.

    Returns the summary (also in the run folder's summary.json): validation and
    test metrics per task, keyed ``captions/...``, ``labels/...``, ``zero_shot/...``.
    """
    from ..assemble.captions import build_model, caption_templates, feature_plan
    from ..objectives.captions import CaptionObjective
    from ..run_folder import save_example_image
    from ..train import Trainer, make_accelerator

    t = cfg.tasks
    method = _check(cfg)
    templates = caption_templates(cfg.data)
    if fast_dev_run:
        _fast_dev(cfg)
    started = time.perf_counter()
    accelerator = make_accelerator(cfg.train)
    model = build_model(cfg)
    data = _load_data(cfg, accelerator)
    use_itm = t.captions.enabled and CaptionObjective.uses_itm(model, cfg.objective)
    plan = feature_plan(model, cfg.data, keep_tokens=use_itm)
    text_cache, text_rows = _cache_features(cfg, model, data, plan, templates, accelerator)
    task = _task(cfg, model, use_itm, method, data.classes, text_cache, text_rows)
    enabled = [k for k in TASKS if getattr(t, k).enabled]
    sizes = batch_shares(cfg.train.batch_size, {k: getattr(t, k).share for k in enabled})
    logger.info("Each step: %s (train.batch_size=%d).", ", ".join(f"{n} {k}" for k, n in sizes.items()), cfg.train.batch_size)
    train_loader = _train_loader(cfg, model, data, plan, enabled, sizes, templates, text_cache, text_rows)
    evaluation = _Evaluation(cfg, data, text_cache, text_rows)

    def export(task: MultiTask, folder: Path) -> None:
        task.model.save_pretrained(folder)
        if task.labels is not None:
            save_label_head(task.labels.head, data.classes.names, folder)

    summary_extra = {"data": {k: r.to_dict() for k, r in data.reports.items()}, "feature_cache": bool(plan.cache),
                     "augmented_copies": plan.copies, "tasks": enabled, "batch_shares": sizes, "weighting": t.weighting,
                     "label_classes": len(data.classes.names) if data.classes else 0,
                     "zero_shot_classes": len(data.zero_shot.names) if data.zero_shot else 0}
    trainer = Trainer(task, train_loader, cfg.train, cfg.optim, evaluate=evaluation,
                      eval_loaders=_eval_loaders(cfg, model, data, plan, text_cache, text_rows),
                      run_config=cfg, export=export, summary_extra=summary_extra, accelerator=accelerator)
    result = trainer.fit()
    final_weights = {}
    with trainer.evaluation() as task_:
        test_metrics = evaluation.split(task_, accelerator, trainer.eval_loaders, "test")
        if isinstance(task_.weighting, UncertaintyWeighting):
            final_weights = {k: float(v) for k, v in zip(task_.weighting.names, task_.weighting.log_vars.detach().cpu())}
    summary = {"run_dir": str(result.run_dir), "model_dir": str(result.model_dir) if result.model_dir else None,
               "steps": result.step, "tasks": enabled, "batch_shares": sizes, "weighting": t.weighting,
               "log_vars": final_weights, "validation": result.metrics, "test": test_metrics}
    extra: dict[str, Any] = {"test_metrics": test_metrics, "minutes_total": round((time.perf_counter() - started) / 60, 2)}
    if final_weights:
        extra["final_log_vars"] = final_weights
    trainer.add_to_summary(extra)
    if accelerator.is_main_process:
        summary["example_image"] = save_example_image([s.dataset for s in data.splits.values()], result.run_dir)
    return summary


def format_report(summary: dict[str, Any]) -> str:
    """The end-of-run table printed by ``scripts/finetune_captions.py`` for a multi-task run."""
    test = summary["test"]
    lines = ["", f"Multi-task run: {', '.join(summary['tasks'])} (per step: "
             + ", ".join(f"{n} {k}" for k, n in summary["batch_shares"].items()) + f"; {summary['weighting']} weights)", ""]
    rows = [("captions", "retrieval i2t / t2i R@1 (%)", "captions/i2t_R@1", "captions/t2i_R@1"),
            ("labels", "head top-1 / top-5 (%)", "labels/top1", "labels/top5"),
            ("labels", "class names top-1 / top-5 (%)", "labels/names_top1", "labels/names_top5"),
            ("zero-shot", "unseen names top-1 / top-5 (%)", "zero_shot/top1", "zero_shot/top5")]
    for what, label, a, b in rows:
        if a in test:
            lines.append(f"  test {what:<10} {label:<32} {test[a]:6.2f} / {test.get(b, float('nan')):6.2f}")
    if summary.get("log_vars"):
        lines.append("  learned log-variances s_k: " + ", ".join(f"{k} {v:+.3f}" for k, v in summary["log_vars"].items()))
    lines += ["", f"Run folder: {summary['run_dir']}", f"Model:      {summary['model_dir']}"]
    if "labels" in summary["tasks"]:
        from ..run_folder import example_image_code

        image, note = example_image_code(summary)
        lines += ["", "Load the classifier:", "  from PIL import Image", "  from mmtransfer.transfer import load_classifier",
                  f"  clf = load_classifier({summary['model_dir']!r})", f"  print(clf.predict([Image.open({image})])){note}"]
    return "\n".join(lines)
