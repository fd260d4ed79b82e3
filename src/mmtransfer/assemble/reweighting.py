"""Importance weights of a domain run's source images: estimated once on the main process, saved, restored on resume.

The estimators are :mod:`mmtransfer.losses.reweight`; this module picks their
features (pixels, a pretrained encoder or a saved model, per ``reweight.features``),
writes the weights and their histogram to the run folder and puts them on the sources.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, ImageEncoderConfig
from ..losses.reweight import ImportanceWeights
from ..models.classifier import BackboneClassifier
from ..models.preprocess import ImagePreprocessor
from .domain_data import Sources, _labels, class_names_of, collect, preprocess_all, subset
from .domains import AdaptConfig, feature_folder

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "source_weights.safetensors"


@torch.no_grad()
def ratio_features(cfg: AdaptConfig, dataset: Any, progress: bool = False) -> torch.Tensor:
    """The features ``reweight.features`` names, for every row of ``dataset``: (N, D) float32 on the CPU."""
    from ..data.collate import ImageCollator, make_loader
    from ..features import with_row_ids
    from ..models.preprocess import PreprocessConfig

    r = cfg.reweight
    if r.features == "pixels":
        pre = ImagePreprocessor(PreprocessConfig(image_size=r.pixel_size, crop_pct=1.0, interpolation="bilinear",
                                                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))
        return preprocess_all(dataset, pre, progress=progress).flatten(1)  # (N, 3 * s * s)
    ds = with_row_ids(dataset)
    if r.features == "encoder":
        from ..features import image_features
        from ..models.image import ImageEncoder

        encoder = ImageEncoder.from_config(ImageEncoderConfig(name=r.encoder, pretrained=True))
        loader = make_loader(ds, ImageCollator(encoder.preprocessor), cfg.train.eval_batch_size)
        return image_features(encoder, loader, len(ds), keep_tokens=False, cache_dir=feature_folder(cfg),
                              data_key=f"{ds._fingerprint}", progress=progress, desc="features for the density ratio").pooled
    folder = Path(str(r.model_dir))
    if (folder / "classifier.json").is_file():
        clf = BackboneClassifier.from_pretrained(folder)
        loader = make_loader(ds, ImageCollator(clf.preprocessor), cfg.train.eval_batch_size)
        return collect(loader, lambda b: {"f": clf(b["pixel_values"]).features})["f"]  # (N, F) the bottleneck
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"reweight.model_dir '{folder}' holds neither a saved classifier (classifier.json) nor a "
                                "multimodal model (config.json); point it at a run's model/ folder.")
    from ..models.factory import load

    mm = load(folder).eval()
    loader = make_loader(ds, ImageCollator(mm.preprocessor), cfg.train.eval_batch_size)
    return collect(loader, lambda b: {"f": mm.project_image(mm.image_encoder(b["pixel_values"]).pooled)})["f"]  # (N, E)


def importance_weights(cfg: AdaptConfig, source: Any, target: Any, progress: bool = False) -> ImportanceWeights:
    """Estimate the source rows' importance weights p_target/p_source as ``cfg.reweight`` says (no caching)."""
    from ..losses.reweight import estimate_importance_weights

    r = cfg.reweight
    started = time.perf_counter()
    f_s = ratio_features(cfg, source, progress)
    target = subset(target, r.max_target, cfg.train.seed)
    f_t = ratio_features(cfg, target, progress)
    if r.method == "classifier":
        options: dict[str, Any] = {"l2_grid": list(r.l2_grid), "folds": r.folds, "calibrate": r.calibrate, "pca_dim": r.pca_dim}
    else:
        options = {"bandwidth_scale": r.kmm_bandwidth_scale, "bound": r.kmm_bound, "iterations": r.kmm_iterations, "pca_dim": r.pca_dim}
    iw = estimate_importance_weights(f_s, f_t, r.method, r.clip_max, r.power, seed=cfg.train.seed, **options)
    iw.info.update({"features": r.features, "source_rows": int(f_s.shape[0]), "target_rows": int(f_t.shape[0]),
                    "seconds": round(time.perf_counter() - started, 1)})
    return iw


def source_weights(cfg: AdaptConfig, accelerator: Any, sets: dict[str, Any], sources: Sources) -> dict[str, Any] | None:
    """Compute (or, on resume, restore) the source weights, put them on ``sources`` and return their summary.

    The weights are estimated once, on the main process, and written to the run
    folder with a histogram; a resumed run (``train.resume``) reads them back
    from there instead of estimating them again, so they cannot change.
    """
    from safetensors.torch import load_file, save_file

    from ..losses.reweight import plot_weights

    r = cfg.reweight
    if r.method == "none":
        return None
    run_dir = Path(cfg.train.output_dir)
    path = run_dir / WEIGHTS_FILE
    n = len(sources.pooled)
    with accelerator.main_process_first():
        if accelerator.is_main_process and not (cfg.train.resume and path.is_file()):
            iw = importance_weights(cfg, sources.pooled, sets["target"], accelerator.is_local_main_process and cfg.train.progress_bar)
            stats = iw.stats(r.clip_max)
            labels = _labels(sources.pooled) if "label" in sources.pooled.column_names else None
            if labels is not None and labels.numel() and int(labels.max()) < 30:
                counts = torch.bincount(labels).double().clamp_min(1)
                stats["mean_weight_by_class"] = (torch.zeros(len(counts), dtype=torch.float64).index_add_(0, labels, iw.weights.double())
                                                 / counts).round(decimals=3).tolist()
            if sources.count > 1:
                stats["mean_weight_by_source"] = {name: float(iw.weights[sources.domain == i].mean()) for i, name in enumerate(sources.names)}
            run_dir.mkdir(parents=True, exist_ok=True)
            meta = {"method": iw.method, "stats": json.dumps(stats), "info": json.dumps(iw.info)}
            tmp = path.with_name(f".{path.name}.tmp")
            save_file({"weights": iw.weights.contiguous(), "ratio": iw.ratio.contiguous()}, str(tmp), metadata=meta)
            tmp.rename(path)
            names = class_names_of(sources.pooled, "source") if labels is not None else None
            plot_weights(iw, run_dir / "source_weights.png", labels, names, r.clip_max)
            logger.info("Importance weights (%s on %s features, %.0f s): min %.3f, max %.2f, ESS %.0f of %d (%.0f%%).",
                        iw.method, r.features, iw.info["seconds"], stats["min"], stats["max"], stats["ess"], n, 100 * stats["ess_fraction"])
        elif accelerator.is_main_process:
            logger.info("Resuming: importance weights restored from %s (not estimated again).", path)
    if not path.is_file():
        raise FileNotFoundError(f"The importance weights {path} were not written; is train.output_dir shared by every process?")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata() or {}
    weights = load_file(str(path))["weights"]
    if weights.shape != (n,):
        raise ConfigError(f"The importance weights in {path} cover {weights.shape[0]} source rows, but the source now has {n}: "
                          "the data changed since the run started. Start a new run (another train.output_dir).")
    sources.weight = weights
    return {"method": meta.get("method"), "file": str(path), **json.loads(meta.get("stats", "{}")),
            "estimator": json.loads(meta.get("info", "{}"))}


