"""How well label-free selection picks among finished domain runs: DEV and IWV against the target accuracy.

Each run folder must come from ``scripts/domain_adapt.py`` with ``selection.holdout``
above 0 (task classify). For every run, its final model is loaded, the held-out
source images (the same rows the run held out) and a sample of unlabelled target
images go through it, and the label-free risks are computed again, with the
density ratio as estimated and clipped to a largest weight, next to the run's target
accuracy (read from its summary, never used by the risks). The table says which run
each criterion would pick and how well its order agrees with the target accuracy
(Spearman), the question a user without target labels cares about.

Examples:
  python benchmarks/domain_selection.py runs/study/dev_*_s0
  python benchmarks/domain_selection.py runs/study/dev_dann_* --clip 5 10 20
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def run_features(run: Path) -> dict[str, Any]:
    """The run's final model on its held-out source rows and target sample: features, logits, labels; and its target accuracy."""
    import torch

    import mmtransfer
    from mmtransfer import data as mmdata
    from mmtransfer.assemble.domain_data import preprocess_all
    from mmtransfer.assemble.domains import AdaptConfig
    from mmtransfer.assemble.selection_run import hold_out, target_sample
    from mmtransfer.config import load_config

    cfg = load_config(AdaptConfig, run / "config.yaml", [])
    if cfg.selection.holdout <= 0:
        raise SystemExit(f"{run} was trained without selection.holdout: it has no held-out source images to score it on.")
    model = mmtransfer.load(run / "model").eval()
    held = hold_out(mmdata.load(cfg.data.source), cfg.selection.holdout, cfg.train.seed)[1]
    target = mmdata.load(cfg.data.target)
    target = target.select(target_sample(len(target), cfg.selection.max_target, cfg.train.seed))
    out: dict[str, Any] = {"labels": torch.tensor(held["label"])}
    with torch.no_grad():
        for name, ds in (("held", held), ("target", target)):
            o = model(preprocess_all(ds, model.preprocessor))
            out[name] = (o.pooled if cfg.method.features == "pooled" else o.features, o.logits)
    summary = json.loads((run / "summary.json").read_text())
    out["target_acc"] = summary["final_metrics"]["eval/target_acc"]
    out["seed"] = cfg.train.seed
    return out


def risks(feats: dict[str, Any], clips: list[float]) -> dict[str, float]:
    """Holdout loss, IWV and DEV with the raw ratio, and DEV with the ratio clipped at each of ``clips``."""
    import torch.nn.functional as F

    from mmtransfer.losses.reweight import classifier_density_ratio, clip_and_normalise
    from mmtransfer.selection import dev_risk

    (fh, lh), (ft, _) = feats["held"], feats["target"]
    losses = F.cross_entropy(lh, feats["labels"], reduction="none")
    ratio, _ = classifier_density_ratio(fh.double(), ft.double(), seed=feats["seed"])
    raw = dev_risk(losses, ratio)
    out = {"holdout loss": raw.source, "IWV": raw.iwv, "DEV": raw.dev}
    for c in clips:
        out[f"DEV clip {c:g}"] = dev_risk(losses, clip_and_normalise(ratio, c)).dev
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders of scripts/domain_adapt.py with selection.holdout > 0")
    parser.add_argument("--clip", nargs="*", type=float, default=[10.0], help="largest weights to clip the ratio at (after mean 1)")
    args = parser.parse_args(argv)
    from mmtransfer.selection import rank_agreement

    rows = {}
    for run in args.runs:
        feats = run_features(run)
        rows[run.name] = {"target acc": feats["target_acc"], **risks(feats, args.clip)}
        print(f"{run.name}: " + ", ".join(f"{k} {v:.4g}" for k, v in rows[run.name].items()), file=sys.stderr, flush=True)
    criteria = [k for k in next(iter(rows.values())) if k != "target acc"]
    lines = ["| run | target acc | " + " | ".join(criteria) + " |", "|---|---:|" + "---:|" * len(criteria)]
    lines += [f"| {name} | {r['target acc']:.1f} | " + " | ".join(f"{r[c]:.4f}" for c in criteria) + " |" for name, r in rows.items()]
    accs = [r["target acc"] for r in rows.values()]
    picks = {c: min(rows, key=lambda n: rows[n][c]) for c in criteria}
    lines.append("| **picks** (its target acc) | best %.1f | " % max(accs)
                 + " | ".join(f"{picks[c]} ({rows[picks[c]]['target acc']:.1f})" for c in criteria) + " |")
    if len(rows) > 1:
        lines.append("| **Spearman with target acc** | | " + " | ".join(
            f"{rank_agreement([r[c] for r in rows.values()], accs):+.2f}" for c in criteria) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
