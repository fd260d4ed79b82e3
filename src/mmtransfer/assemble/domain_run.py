"""Training and reporting a domain run: what the adaptation and distillation recipes share.

The recipe builds nothing itself: the data, model and task come from
:mod:`mmtransfer.assemble.domains`; this module fits them with the one training
loop, draws the embedding plot and writes the summary.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from ..evaluate import load_points, plot_embeddings, sample_points, save_points
from ..run_folder import read_metrics
from .domain_data import (
    collect,
)
from .domains import (
    AdaptConfig,
    TaskFactory,
    _fast_dev,
    build_classify,
    build_multimodal,
    check_config,
    load_sets,
)
from .reweighting import source_weights
from .selection_run import lowest_risk_step

logger = logging.getLogger(__name__)


# Below this mean share of the training loss, method.weight * L_domain barely moves the model
# (e.g. CORAL on L2-normalised 256-d embeddings is ~1e-7, so weight 1000 adds ~1e-4 to a loss near 1).
NEGLIGIBLE_DOMAIN_SHARE = 1e-3


def domain_share(run_dir: Path) -> float | None:
    """The mean ``train/domain_share`` over a run's metrics.jsonl (None when not logged)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return None
    values = [float(r["train/domain_share"]) for r in read_metrics(path)[0] if r.get("train/domain_share") is not None]
    return sum(values) / len(values) if values else None


def fit_domain_run(cfg: AdaptConfig, fast_dev_run: bool = False, make_task: TaskFactory | None = None) -> dict[str, Any]:
    """Build, train and evaluate a domain run per ``cfg``; returns the summary (also in the run folder's summary.json).

    ``make_task(model, accelerator)`` replaces the adaptation task built around the new
    model (distillation passes its own, see :mod:`mmtransfer.recipes.distill`).
    """
    from ..train import Trainer, make_accelerator

    if fast_dev_run:
        _fast_dev(cfg)
    check_config(cfg)
    started = time.perf_counter()
    accelerator = make_accelerator(cfg.train)
    sets, reports, sources = load_sets(cfg, accelerator)
    reweight = source_weights(cfg, accelerator, sets, sources)
    built = (build_classify if cfg.task == "classify" else build_multimodal)(cfg, accelerator, sets, sources, make_task)
    if accelerator.is_main_process:
        n_train = sum(p.numel() for p in built.task.parameters() if p.requires_grad)
        logger.info("Task %s, method %s: %s trainable parameters.", cfg.task, cfg.method.name, f"{n_train:,}")
    summary_extra = {"data": reports, "task_info": built.info}
    if reweight is not None:
        summary_extra["reweight"] = reweight
    trainer = Trainer(built.task, built.train_loader, cfg.train, cfg.optim, evaluate=built.evaluate,
                      eval_loaders=built.eval_loaders, run_config=cfg, export=built.export,
                      summary_extra=summary_extra, accelerator=accelerator)
    if sources.weight is not None and "tensorboard" in cfg.train.trackers and not cfg.train.fast_dev_run and accelerator.is_main_process:
        accelerator.get_tracker("tensorboard", unwrap=True).add_histogram("reweight/source_weights", sources.weight, 0)
    plot_needed = cfg.plot.enabled and "target" in trainer.eval_loaders

    def points() -> dict[str, Any] | None:
        if not plot_needed:
            return None
        was_training = trainer.task.training
        with trainer.evaluation() as task:
            feats = {role: collect(trainer.eval_loaders[role], task.embed, accelerator) for role in ("source", "target")}
        trainer.task.train(was_training)
        return sample_points(feats, cfg.plot.max_points, cfg.train.seed)

    before = points() if cfg.plot.before is None else None
    result = trainer.fit()
    after = points()
    summary: dict[str, Any] = {"run_dir": str(result.run_dir), "model_dir": str(result.model_dir) if result.model_dir else None,
                               "steps": result.step, "method": cfg.method.name, "task": cfg.task, "sources": sources.names,
                               "metrics": {k.split("/", 1)[-1]: v for k, v in result.metrics.items()}}
    if reweight is not None:
        summary["reweight"] = reweight
    if accelerator.is_main_process:
        run_dir = result.run_dir
        share = domain_share(run_dir) if cfg.method.name != "none" else None
        if share is not None:
            summary["domain_share"] = share
            if share < NEGLIGIBLE_DOMAIN_SHARE:
                logger.warning(
                    "method.weight * the %s loss was on average %.2g of the training loss: it barely changed the model "
                    "(a run without it ends the same). Raise method.weight (the loss's scale depends on the features: "
                    "log train/transfer_loss) or drop the method.", cfg.method.name, share)
        if after is not None:
            save_points(after, run_dir / "embeddings_final.npz")
            if before is not None:
                save_points(before, run_dir / "embeddings_step0.npz")
                panels = [("step 0", before), (f"after {result.step} steps ({cfg.method.name})", after)]
            else:
                where = "/".join(Path(cfg.plot.before).parent.parts[-2:])
                panels = [(f"before adaptation ({where})", load_points(cfg.plot.before)),
                          (f"after adaptation ({cfg.method.name})", after)]
            summary["embedding_plot"] = str(plot_embeddings(panels, run_dir / "embeddings.png", cfg.plot.method, cfg.train.seed))
        summary["minutes"] = round((time.perf_counter() - started) / 60, 2)
        extra = {"metrics": summary["metrics"], "minutes_total": summary["minutes"],
                 "embedding_plot": summary.get("embedding_plot")}
        if "domain_share" in summary:
            extra["domain_share"] = summary["domain_share"]
        selection = lowest_risk_step(read_metrics(run_dir / "metrics.jsonl")[0])
        if selection is not None:
            summary["selection"] = extra["selection"] = selection
            logger.info("Lowest DEV risk (label-free) at step %d of the evaluated steps.", selection["best_step"])
        trainer.add_to_summary(extra)
    return summary
