"""Caption fine-tuning: the recipe behind ``scripts/finetune_captions.py``.

Builds the model, data, cached features (for frozen towers), the caption task
and its retrieval evaluation, then hands them to the one training loop.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from ..assemble.captions import (
    FinetuneConfig,
    Split,
    build_model,
    cache_image_features,
    cache_text_features,
    caption_collator,
    caption_templates,
    caption_texts,
    feature_plan,
    load_split,
    retrieval_loaders,
    stream_loader,
    streaming_plan,
)
from ..run_folder import example_image_code, save_example_image

logger = logging.getLogger(__name__)


def run(cfg: FinetuneConfig, fast_dev_run: bool = False) -> dict[str, Any]:
    """Train and evaluate per ``cfg``; returns the summary (also written to the run folder).

    A config with a ``tasks`` section is a multi-task run (:class:`MultitaskConfig`, :mod:`mmtransfer.recipes.multitask`).
    """
    from ..assemble.fast_dev import fast_dev_slice
    from ..data.shards import is_stream
    from ..objectives.captions import CaptionObjective, CaptionTask, evaluate_retrieval
    from ..train import Trainer, make_accelerator

    templates = caption_templates(cfg.data)
    if fast_dev_run:
        fast_dev_slice(cfg.train, (cfg.data.train, cfg.data.validation, cfg.data.test), 64)
        cfg.train.batch_size = min(cfg.train.batch_size, 16)
    accelerator = make_accelerator(cfg.train)
    model = build_model(cfg)
    if accelerator.is_main_process:
        logger.info("Model:\n%s", model.parameter_summary())

    # Data: main process first, so built-in sets are rendered once and read by the others.
    # Streamed training shards (wds:/parquet:) are read while training: no split to load.
    streaming = is_stream(cfg.data.train.name)
    reports: dict[str, Any] = {}
    splits: dict[str, Split] = {}
    with accelerator.main_process_first():
        for name, section in (("train", cfg.data.train), ("validation", cfg.data.validation), ("test", cfg.data.test)):
            if section is not None and not (streaming and name == "train"):
                splits[name] = load_split(name, section, reports)

    plan = feature_plan(model, cfg.data, keep_tokens=CaptionObjective.uses_itm(model, cfg.objective))
    bs = cfg.train.eval_batch_size
    text_cache = None
    text_rows: dict[str, int] = {}
    train_split = splits.get("train")
    if cfg.objective.positives == "label" and (train_split is None or "label" not in train_split.dataset.column_names):
        raise ValueError(f"objective.positives=label needs class labels, but the training data ({cfg.data.train.name}) "
                         "has no 'label' column; use objective.positives=caption.")

    plan = streaming_plan(plan, cfg.data) if streaming else plan  # a stream is never cached
    if plan.cache:
        text_cache, text_rows = _cache_features(model, splits, plan, cfg, templates, accelerator)
    train_loader = (stream_loader(model, cfg, templates, accelerator) if streaming
                    else _train_loader(model, train_split, plan, cfg, text_cache, text_rows, templates))
    reports_out: dict[str, Any] = {"train": train_loader.report} if streaming else {}

    loaders: dict[str, Any] = {}
    for name in ("validation", "test"):
        if name in splits:
            loaders.update(retrieval_loaders(model, splits[name], plan, text_cache, text_rows, bs, cfg.train.seed))

    task = CaptionTask(model, cfg.objective)

    def evaluate(task: Any, acc: Any, prepared: dict[str, Any]) -> dict[str, float]:
        if "validation/images" not in prepared:
            return {}
        out = task.evaluate_retrieval(acc, prepared["validation/images"], prepared["validation/captions"], cfg.data.rerank_k)
        return {f"val/{k}": v for k, v in out.items()}

    reports_out.update({k: r.to_dict() for k, r in reports.items()})
    summary_extra = {"data": reports_out, "feature_cache": bool(plan.cache),
                     "augmented_copies": len(train_split.augmented_feats) if train_split else 0}
    trainer = Trainer(task, train_loader, cfg.train, cfg.optim, evaluate=evaluate, eval_loaders=loaders,
                      run_config=cfg, export=lambda t, d: t.model.save_pretrained(d), summary_extra=summary_extra,
                      accelerator=accelerator)
    result = trainer.fit()
    test_metrics: dict[str, float] = {}
    if "test/images" in trainer.eval_loaders:
        with trainer.evaluation() as task_:
            test_metrics = evaluate_retrieval(task_.model, accelerator, trainer.eval_loaders["test/images"],
                                              trainer.eval_loaders["test/captions"], cfg.data.rerank_k)
    summary = {"run_dir": str(result.run_dir), "model_dir": str(result.model_dir) if result.model_dir else None,
               "steps": result.step, "validation": result.metrics, "test": test_metrics}
    trainer.add_to_summary({"test_metrics": test_metrics})
    if streaming:  # every process's bad samples, not the main process's alone
        trainer.add_to_summary({"data": {**reports_out, "train": train_loader.gathered_report()}})
    if accelerator.is_main_process:
        summary["example_image"] = save_example_image([s.dataset for s in splits.values()], result.run_dir)
    return summary


def _cache_features(model: Any, splits: dict[str, Split], plan: Any, cfg: FinetuneConfig, templates: Sequence[str] | None,
                    accelerator: Any) -> tuple[Any, dict[str, int]]:
    """Frozen towers' features of every split (and of every caption when the text tower is frozen), computed once."""
    bs, progress, train_split = cfg.train.eval_batch_size, accelerator.is_local_main_process, splits["train"]
    text_cache, text_rows = None, {}
    model.to(accelerator.device)
    with accelerator.main_process_first():
        for split in splits.values():
            cache_image_features(model, split, plan, cfg.data.augment, cfg.train.seed, bs, progress, train=split is train_split)
        if plan.text_frozen:
            text_cache, text_rows = cache_text_features(model, caption_texts(splits, templates), plan, progress)
    logger.info("Frozen towers: training on cached features (image%s%s).", " and text" if text_cache else "",
                f", {plan.copies} augmented cop{'y' if plan.copies == 1 else 'ies'} of the training images" if plan.copies else "")
    return text_cache, text_rows


def _train_loader(model: Any, train_split: Split, plan: Any, cfg: FinetuneConfig, text_cache: Any, text_rows: dict[str, int],
                  templates: Sequence[str] | None) -> Any:
    """Shuffled training batches: from cached features (frozen towers) or from the images themselves."""
    from .. import data as mmdata

    if plan.cache:
        train_loader = torch.utils.data.DataLoader(
            list(range(len(train_split.dataset))), batch_size=cfg.train.batch_size, shuffle=True, drop_last=True,
            collate_fn=caption_collator(model, train_split, plan, text_cache, text_rows, train=True, seed=cfg.train.seed,
                                        templates=templates),
        )
    else:
        collate = mmdata.CaptionCollator.from_model(model, train=True, augment=cfg.data.augment, seed=cfg.train.seed,
                                                    templates=templates)
        train_loader = mmdata.make_loader(train_split.dataset, collate, cfg.train.batch_size, shuffle=True,
                                          seed=cfg.train.seed, num_workers=cfg.train.num_workers, drop_last=True)
    if len(train_loader) == 0:
        raise ValueError(f"The training split has {len(train_split.dataset)} images, fewer than one batch of {cfg.train.batch_size}: lower train.batch_size.")
    return train_loader


def format_report(summary: dict[str, Any]) -> str:
    """The retrieval table of a finished run, where it went, and a snippet that loads it (printed by the script)."""
    lines = ["", "Retrieval (recall@K, %; +ITM: top candidates re-ranked by the fusion layer)", f"{'split':<12}{'i2t R@1':>9}{'i2t R@5':>9}{'i2t R@10':>10}{'t2i R@1':>9}{'t2i R@5':>9}{'t2i R@10':>10}"]
    cols = (("i2t_R@1", 9), ("i2t_R@5", 9), ("i2t_R@10", 10), ("t2i_R@1", 9), ("t2i_R@5", 9), ("t2i_R@10", 10))
    for name, metrics in (("validation", summary["validation"]), ("test", summary["test"])):
        m = {k.split("/")[-1]: v for k, v in metrics.items()}
        for prefix, label in (("", name), ("itm_", f"{name}+ITM")):
            if any(k.startswith(prefix) and (prefix or not k.startswith("itm_")) for k in m):
                lines.append(f"{label:<12}" + "".join(f"{m.get(prefix + k, float('nan')):>{w}.1f}" for k, w in cols))
    image, note = example_image_code(summary)
    lines += ["", f"Run folder: {summary['run_dir']}", f"Model:      {summary['model_dir']}", "",
              "Load it and embed an image:",
              "  import mmtransfer",
              "  from PIL import Image",
              f"  model = mmtransfer.load({summary['model_dir']!r})",
              f"  emb = model.encode_image([Image.open({image})]){note}"]
    return "\n".join(lines)
