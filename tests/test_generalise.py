"""Several labelled sources (domain generalisation): multi-domain losses, pooled data, caption-labelled evaluation, emoji fonts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmtransfer.assemble.domain_data import balanced_items, labels_and_names, pool_sources, zero_shot_candidates
from mmtransfer.assemble.domains import AdaptConfig, check_config
from mmtransfer.config import ConfigError
from mmtransfer.losses.domain import (
    CORALLoss,
    DomainDiscriminator,
    MultiDomainAdversarialLoss,
    MultipleKernelMMD,
    PairwiseDomainLoss,
)
from mmtransfer.models.classifier import BackboneClassifier, ClassifierConfig
from mmtransfer.models.lenet import LeNetConfig
from mmtransfer.objectives.base import StepInfo
from mmtransfer.objectives.domain import ClassifyAdaptTask, DiscriminatorConfig, MethodConfig, MultimodalAdaptTask

SYMBOLA = Path("/usr/share/fonts/truetype/ancient-scripts/Symbola_hint.ttf")


def _tiny_classifier() -> BackboneClassifier:
    return BackboneClassifier(ClassifierConfig(lenet=LeNetConfig(channels=[4, 8], image_size=16), bottleneck_dim=16, dropout=0.0), 3)


# ----------------------------------------------------------------------------- losses


def test_k_way_discriminator_learns_three_domains_and_balances_them():
    torch.manual_seed(0)
    loss = MultiDomainAdversarialLoss(DomainDiscriminator(4, 32, num_layers=1, num_outputs=3), 3)
    opt = torch.optim.Adam(loss.parameters(), lr=1e-2)
    centres = torch.tensor([[3.0, 0, 0, 0], [0, 3.0, 0, 0], [0, 0, 3.0, 0]])
    domains = torch.tensor([0] * 30 + [1] * 10 + [2] * 4)  # unequal shares of the batch
    for _ in range(150):
        out = loss(torch.randn(44, 4) + centres[domains], domains, lambda_=1.0)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert out.lambda_ == 1.0
    loss.eval()
    test_domains = torch.arange(300) % 3
    with torch.no_grad():
        out = loss(torch.randn(300, 4) + centres[test_domains], test_domains, lambda_=1.0)
    assert float(out.domain_accuracy) > 0.9  # chance is 1/3
    # Each domain's mean counts 1/K, whatever its share of the batch.
    logits = torch.randn(44, 3)
    ce = torch.nn.functional.cross_entropy(logits, domains, reduction="none")
    want = sum(ce[domains == k].mean() for k in range(3)) / 3
    fixed = MultiDomainAdversarialLoss(lambda f: logits, 3)
    torch.testing.assert_close(fixed(torch.zeros(44, 4), domains, 1.0).loss, want)


def test_k_way_discriminator_reverses_the_gradient():
    torch.manual_seed(0)
    f = torch.randn(9, 4, requires_grad=True)
    domains = torch.arange(9) % 3
    disc = DomainDiscriminator(4, 8, num_layers=1, batch_norm=False, num_outputs=3)
    MultiDomainAdversarialLoss(disc, 3)(f, domains, lambda_=0.5).loss.backward()
    reversed_grad = f.grad.clone()
    f.grad = None
    MultiDomainAdversarialLoss(disc, 3)(f, domains, lambda_=-1.0).loss.backward()  # -(-1) = plain gradient
    torch.testing.assert_close(reversed_grad, -0.5 * f.grad)


def test_pairwise_coral_is_the_mean_over_pairs_and_skips_thin_domains():
    torch.manual_seed(0)
    f = torch.randn(30, 5)
    d = torch.arange(30) % 3
    coral = CORALLoss()
    want = torch.stack([coral(f[d == a], f[d == b]).loss for a, b in ((0, 1), (0, 2), (1, 2))]).mean()
    torch.testing.assert_close(PairwiseDomainLoss(coral, 3)(f, d).loss, want)
    d2 = torch.tensor([0] * 29 + [2])  # domain 1 absent, domain 2 a single row: no pair has two rows on both sides
    out = PairwiseDomainLoss(coral, 3)(f.requires_grad_(True), d2)
    assert float(out.loss.detach()) == 0.0
    out.loss.backward()  # still connected to the graph (DDP sees every parameter used)
    assert float(PairwiseDomainLoss(MultipleKernelMMD(), 2)(torch.randn(20, 3), torch.arange(20) % 2).loss) >= 0


# ----------------------------------------------------------------------------- tasks


@pytest.mark.parametrize("method", ["dann", "coral", "mmd"])
@pytest.mark.parametrize("with_target", [False, True])
def test_classify_task_with_two_sources(method, with_target):
    torch.manual_seed(0)
    task = ClassifyAdaptTask(_tiny_classifier(), MethodConfig(name=method, discriminator=DiscriminatorConfig(hidden_dim=16)), num_sources=2,
                             with_target=with_target)
    batch = {"source": {"pixel_values": torch.randn(8, 3, 16, 16), "labels": torch.arange(8) % 3,
                        "domain": torch.tensor([0, 1] * 4), "weight": torch.rand(8)}}
    if with_target:
        batch["target"] = {"pixel_values": torch.randn(6, 3, 16, 16)}
    out = task(batch, StepInfo(3, 10))
    out.loss.backward()
    unused = [n for n, p in task.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, unused
    assert "transfer_loss" in out.metrics
    if method == "dann":
        assert task.domain_loss.num_domains == (3 if with_target else 2)
        assert "domain_acc" in out.metrics


def test_pooled_baseline_reads_no_domain_ids_and_no_target():
    task = ClassifyAdaptTask(_tiny_classifier(), MethodConfig(name="none"), num_sources=2, with_target=False)
    out = task({"source": {"pixel_values": torch.randn(4, 3, 16, 16), "labels": torch.arange(4) % 3}}, StepInfo(0, 1))
    assert "transfer_loss" not in out.metrics and not task.uses_target


def test_multimodal_task_with_two_sources_and_no_target(tiny_model):
    import copy

    model = copy.deepcopy(tiny_model).train()
    model.freeze("both")
    task = MultimodalAdaptTask(model, MethodConfig(name="dann"), num_sources=2, with_target=False)
    tok = model.tokenize(["a red square", "a blue circle", "a green star", "a red square"])
    batch = {"source": {"pixel_values": torch.randn(4, 3, 32, 32), **tok, "domain": torch.tensor([0, 0, 1, 1]),
                        "weight": torch.tensor([1.0, 2.0, 0.5, 0.5])}}
    out = task(batch, StepInfo(2, 10))
    out.loss.backward()
    assert {"contrastive", "lambda", "domain_acc"} <= set(out.metrics)
    assert not [n for n, p in task.named_parameters() if p.requires_grad and p.grad is None]


def test_multi_source_config_errors_are_explained():
    cfg = AdaptConfig(method=MethodConfig(name="dann"))
    cfg.data.target = None
    with pytest.raises(ConfigError, match="needs a second domain"):
        check_config(cfg)
    from mmtransfer.data import DataConfig

    cfg.data.extra_sources = [DataConfig(name="mnist_m", split="train")]
    check_config(cfg)  # two sources, no target: domain generalisation
    cfg.method.name = "cdan"
    with pytest.raises(ConfigError, match="no multi-domain form"):
        check_config(cfg)


# ----------------------------------------------------------------------------- data


def test_balanced_items_repeat_the_smaller_domains():
    domain = torch.tensor([0] * 10 + [1] * 3 + [2] * 7)
    items = balanced_items(domain, seed=0)
    counts = torch.bincount(domain[torch.tensor(items)])
    assert counts.tolist() == [10, 10, 10]
    assert set(items) == set(range(20))  # every row appears
    assert items == balanced_items(domain, seed=0)


def _labelled(names: list[str], labels: list[int]):
    from datasets import ClassLabel, Dataset, Features, Image, List, Value
    from PIL import Image as PILImage

    img = PILImage.new("RGB", (8, 8), (255, 0, 0))
    feats = Features({"image": Image(), "captions": List(Value("string")), "label": ClassLabel(names=names)})
    return Dataset.from_dict({"image": [img] * len(labels), "captions": [[names[i]] for i in labels], "label": labels}, features=feats)


def test_pool_sources_keeps_shared_columns_and_refuses_other_classes():
    a = _labelled(["cat", "dog"], [0, 1, 1])
    b = _labelled(["cat", "dog"], [1, 0])
    pooled, domain = pool_sources([a, b], ["a", "b"])
    assert len(pooled) == 5 and domain.tolist() == [0, 0, 0, 1, 1] and pooled["label"] == [0, 1, 1, 1, 0]
    c = _labelled(["dog", "cat"], [0])
    with pytest.raises(ConfigError, match="same classes in the same order"):
        pool_sources([a, c], ["a", "c"])
    pooled, _ = pool_sources([a, c], ["a", "c"], need_labels=False)  # captions are enough for the multimodal task
    assert "label" not in pooled.column_names and pooled["captions"][-1] == ["dog"]


def test_paired_loader_without_target_yields_source_only():
    from mmtransfer.data.collate import PairedLoader

    pairs = PairedLoader([1, 2, 3], None)
    assert len(pairs) == 3 and list(pairs) == [{"source": 1}, {"source": 2}, {"source": 3}]


def test_caption_only_sets_are_labelled_by_caption_and_matched_by_name():
    from datasets import Dataset

    labelled = _labelled(["cat face", "dog face", "sun"], [0, 2, 2])
    captions_only = Dataset.from_dict({"captions": [["sun"], ["moon"], ["sun"], ["cat face"]]})
    labels, names = labels_and_names(captions_only)
    assert names == ["cat face", "moon", "sun"] and labels.tolist() == [2, 1, 2, 0]
    candidates, mapped = zero_shot_candidates({"source": labelled, "target": captions_only})
    assert candidates == ["cat face", "sun", "moon"]
    assert mapped["source"].tolist() == [0, 1, 1] and mapped["target"].tolist() == [1, 2, 1, 0]


# ----------------------------------------------------------------------------- a third emoji style from any font


def test_render_font_folder_refuses_a_missing_font(tmp_path):
    from mmtransfer.data import DataError
    from mmtransfer.data.emoji_sets import render_font_folder

    with pytest.raises(DataError, match="does not exist"):
        render_font_folder(tmp_path / "nope.ttf", tmp_path / "out")
    with pytest.raises(DataError, match="Unknown split"):
        render_font_folder(SYMBOLA if SYMBOLA.is_file() else __file__, tmp_path / "out", splits=["seen"])


@pytest.mark.skipif(not SYMBOLA.is_file(), reason="needs Debian's fonts-symbola")
def test_render_symbola_into_a_captioned_folder(tmp_path):
    from mmtransfer import data
    from mmtransfer.data.emoji_sets import render_font_folder

    info = render_font_folder(SYMBOLA, tmp_path / "sym", splits=["unseen"], views=[0], image_size=48)
    assert info["rows"]["unseen"] == info["emoji_drawn"] > 100
    ds = data.load(str(tmp_path / "sym"))
    assert len(ds) == info["rows"]["unseen"] and "label" not in ds.column_names
    img = ds[0]["image"].convert("L")
    assert img.size == (48, 48) and img.getextrema()[0] < 64  # black ink on a light canvas, not white on white
    first = json.loads((tmp_path / "sym" / "metadata.jsonl").read_text().splitlines()[0])
    assert first["split"] == "unseen" and first["view"] == 0


def test_multimodal_coral_across_two_sources_reaches_the_projection(tiny_model):
    import copy

    model = copy.deepcopy(tiny_model).train()
    model.freeze("both")
    task = MultimodalAdaptTask(model, MethodConfig(name="coral", weight=1.0), num_sources=2, with_target=False)
    tok = model.tokenize(["a red square", "a blue circle", "a green star", "a red square"] * 2)
    batch = {"source": {"pixel_values": torch.randn(8, 3, 32, 32), **tok, "domain": torch.tensor([0] * 4 + [1] * 4)}}
    out = task(batch, StepInfo(2, 10))
    assert float(out.metrics["transfer_loss"]) > 0
    assert 0 < float(out.metrics["domain_share"]) < 1
    # The domain term alone moves the image projection.
    weighted = out.loss - out.metrics["contrastive"]
    params = [p for p in model.image_projection.parameters() if p.requires_grad]
    grads = torch.autograd.grad(weighted, params)
    assert any(float(g.abs().sum()) > 0 for g in grads)


def test_emoji_dg_coral_recipe_weight_makes_the_loss_count():
    """CORAL of L2-normalised 256-d embeddings over 32-row batches is ~1e-7: the recipe's weight must lift it
    to a visible share of a contrastive loss near 1 (weight 1000 left the run identical to pooled training)."""
    import torch.nn.functional as F

    from mmtransfer.config import load_yaml

    root = Path(__file__).resolve().parents[1]
    method = load_yaml(root / "configs" / "emoji_dg_openmoji_noto_symbola_coral.yaml")["method"]
    torch.manual_seed(0)
    a = F.normalize(torch.randn(32, 256), dim=1)
    b = F.normalize(torch.randn(32, 256) * torch.linspace(0.5, 2.0, 256), dim=1)
    weighted = float(method["weight"]) * float(PairwiseDomainLoss(CORALLoss(), 2)(torch.cat([a, b]), torch.tensor([0] * 32 + [1] * 32)).loss)
    assert weighted > 1e-2


def test_domain_share_is_read_from_the_metrics_log(tmp_path):
    from mmtransfer.assemble.domain_run import domain_share

    assert domain_share(tmp_path) is None
    (tmp_path / "metrics.jsonl").write_text(
        "\n".join(json.dumps(r) for r in [{"step": 1, "train/domain_share": 1e-4}, {"step": 2, "eval/target_acc": 5.0},
                                           {"step": 3, "train/domain_share": 3e-4}]) + "\n")
    assert abs(domain_share(tmp_path) - 2e-4) < 1e-12
