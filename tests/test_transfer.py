"""Zero-shot classifiers, text-initialised heads, LP-FT and WiSE-FT on tiny models."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmtransfer.evaluate import classification_metrics, confusion_matrix
from mmtransfer.recipes.classify import ClassifyConfig, _train_mode, few_shot_indices, pooled_features
from mmtransfer.transfer import (
    ImageClassifier,
    LinearHead,
    class_embeddings,
    hub_penalty,
    interpolated,
    wise_ft,
    zero_shot_classifier,
)

NAMES = ["red apple", "green leaf", "blue sky", "yellow sun"]
RGB = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 230, 20)]


@pytest.fixture()
def colour_dataset():
    from datasets import ClassLabel, Dataset, Features, Image, Value
    from PIL import Image as PILImage

    rows = {"image": [], "label": [], "image_id": []}
    for i in range(16):
        c = i % 4
        rows["image"].append(PILImage.new("RGB", (32, 32), RGB[c]))
        rows["label"].append(c)
        rows["image_id"].append(i)
    feats = Features({"image": Image(), "label": ClassLabel(names=NAMES), "image_id": Value("int64")})
    return Dataset.from_dict(rows, features=feats)


def test_class_embeddings_average_normalised_prompts(tiny_model):
    w = class_embeddings(tiny_model, NAMES[:2], ["{}", "a photo of {}."])
    manual = F.normalize(torch.stack([
        F.normalize(tiny_model.encode_text(["red apple", "a photo of red apple."]), dim=-1).mean(0),
        F.normalize(tiny_model.encode_text(["green leaf", "a photo of green leaf."]), dim=-1).mean(0),
    ]), dim=-1)
    torch.testing.assert_close(w, manual.detach())
    with pytest.raises(ValueError, match="needs a '\\{\\}'"):
        class_embeddings(tiny_model, NAMES, ["no slot here"])


def test_zero_shot_picks_the_class_whose_text_matches_the_image(tiny_model):
    model = copy.deepcopy(tiny_model)
    pixels = torch.randn(1, 3, 32, 32)
    w = class_embeddings(model, NAMES, ["{}"])  # (C, E)
    with torch.no_grad():
        pooled = model.image_encoder(pixels).pooled[0]  # (Di,)
        # Make the image tower's projection map this image exactly onto class 2's text embedding.
        model.image_projection.net.weight.copy_(torch.outer(w[2], pooled) / pooled.dot(pooled))
    clf = zero_shot_classifier(model, NAMES, ["{}"])
    logits = clf(pixels)
    assert logits.shape == (1, 4)
    assert clf.predict(pixels) == ["blue sky"]
    torch.testing.assert_close(logits[0, 2], model.get_logit_scale().detach(), rtol=1e-4, atol=1e-4)


def test_wise_ft_endpoints_and_midpoint(tiny_model):
    zs = zero_shot_classifier(tiny_model, NAMES)
    ft = copy.deepcopy(zs)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(torch.randn_like(p))
    zs_state = zs.state_dict()
    at0, at1 = interpolated(ft, zs_state, 0.0), interpolated(ft, zs_state, 1.0)
    for k, v in zs_state.items():
        assert torch.equal(at0.state_dict()[k], v), k
        assert torch.equal(at1.state_dict()[k], ft.state_dict()[k]), k
    half = wise_ft(zs_state, ft.state_dict(), 0.5)
    k = "head.weight"
    torch.testing.assert_close(half[k], (zs_state[k] + ft.state_dict()[k]) / 2)
    with pytest.raises(ValueError, match="keys differ"):
        wise_ft({"a": torch.zeros(1)}, {"b": torch.zeros(1)}, 0.5)


def test_lp_ft_probe_phase_leaves_towers_untouched(tiny_model, colour_dataset, tmp_path, monkeypatch):
    import mmtransfer.recipes.classify as C

    cfg = ClassifyConfig()
    cfg.train.max_steps, cfg.train.batch_size, cfg.method.probe_steps = 3, 8, 3
    cfg.optim.lr = cfg.optim.tower_lr = 1e-2
    clf = ImageClassifier(copy.deepcopy(tiny_model), LinearHead.from_text(tiny_model, NAMES), NAMES)
    train = pooled_features(clf, colour_dataset, 16, progress=False)
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    snapshots = {}
    real_fit = C._fit

    def spy(cfg_, clf_, loader, steps, out_dir, seed):
        real_fit(cfg_, clf_, loader, steps, out_dir, seed)
        snapshots[out_dir.name] = {k: v.clone() for k, v in clf_.state_dict().items()}

    monkeypatch.setattr(C, "_fit", spy)
    _train_mode(cfg, "lp-ft", clf, colour_dataset, train, list(range(16)), 0, tmp_path)
    probe = snapshots["probe"]
    towers = [k for k in before if not k.startswith("head.")]
    assert all(torch.equal(probe[k], before[k]) for k in towers), "the probe phase changed the towers"
    assert not torch.equal(probe["head.weight"], before["head.weight"])
    final = snapshots["finetune"]
    assert any(not torch.equal(final[k], before[k]) for k in towers), "the finetune phase did not train the towers"


def test_few_shot_indices_are_per_class_and_seeded():
    labels = [0] * 5 + [1] * 5 + [2] * 1
    a = few_shot_indices(labels, 2, seed=0)
    assert [labels[i] for i in a].count(0) == 2 and [labels[i] for i in a].count(2) == 1
    assert a == few_shot_indices(labels, 2, seed=0) and a != few_shot_indices(labels, 2, seed=1)


def test_classification_metrics():
    logits = torch.tensor([[3.0, 1, 0], [0, 3, 1], [0, 3, 1], [1, 0, 3]])
    labels = torch.tensor([0, 1, 2, 2])
    m = classification_metrics(logits, labels, ["a", "b", "c"])
    assert m["top1"] == 75.0 and m["top3"] == 100.0
    # Class b: precision 1/2, recall 1; class c: precision 1, recall 1/2; class a: 1, 1.
    assert m["macro_precision"] == pytest.approx(100 * (1 + 0.5 + 1) / 3)
    assert m["macro_recall"] == pytest.approx(100 * (1 + 1 + 0.5) / 3)
    assert confusion_matrix(logits.argmax(1), labels, 3).tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]


def test_hub_penalty_marks_down_the_class_near_every_reference_image():
    classes = torch.eye(3)  # (C, E): three orthogonal class embeddings
    reference = F.normalize(torch.tensor([[1.0, 0.3, 0.0], [1.0, 0.0, 0.3], [0.9, 0.4, 0.4], [0.0, 1.0, 0.0]]), dim=-1)  # (N, E)
    r = hub_penalty(classes, reference, k=2)  # mean of each class's 2 best cosines
    torch.testing.assert_close(r, (reference @ classes.T).topk(2, dim=0).values.mean(0))
    assert r[0] > r[1] > r[2]
    # An image a little closer to class 0 (the hub) than to class 1 goes to class 1 once hubs are marked down.
    image = F.normalize(torch.tensor([[0.7, 0.6, 0.0]]), dim=-1)
    plain = LinearHead(classes)(image)
    corrected = LinearHead(classes, -0.5 * r)(image)
    assert plain.argmax().item() == 0 and corrected.argmax().item() == 1
    assert hub_penalty(classes, reference, k=100).shape == (3,)  # k is capped at the number of references
    with pytest.raises(ValueError, match="hub reference must be"):
        hub_penalty(classes, torch.zeros(5, 4))


def test_zero_shot_classifier_with_reference_embeddings(tiny_model):
    model = copy.deepcopy(tiny_model).eval()
    pixels, reference = torch.randn(2, 3, 32, 32), torch.randn(6, 3, 32, 32)
    plain = zero_shot_classifier(model, NAMES, ["{}"])
    embedded = model.encode_image(reference)
    corrected = zero_shot_classifier(model, NAMES, ["{}"], reference=embedded, hub_k=3, hub_weight=0.5)
    with torch.no_grad():
        penalty = hub_penalty(class_embeddings(model, NAMES, ["{}"]), model.encode_image(reference), 3)
        expected = plain(pixels) - 0.5 * model.get_logit_scale() * penalty
    torch.testing.assert_close(corrected(pixels), expected, rtol=1e-4, atol=1e-4)
    assert torch.count_nonzero(plain.head.bias) == 0
    off = zero_shot_classifier(model, NAMES, ["{}"], reference=embedded, hub_weight=0.0)
    torch.testing.assert_close(off(pixels), plain(pixels))


def test_classify_run_reports_hub_corrected_and_plain_zero_shot(tmp_path, tiny_model, colour_dataset):
    from mmtransfer.config import from_dict
    from mmtransfer.recipes.classify import run

    colour_dataset.save_to_disk(str(tmp_path / "colours"))
    tiny_model.save_pretrained(tmp_path / "model")
    cfg = from_dict(ClassifyConfig, {
        "model": str(tmp_path / "model"),
        "data": {"test": {"name": str(tmp_path / "colours")}, "hub_reference": {"name": str(tmp_path / "colours")}},
        "method": {"hub_k": 2, "hub_weight": 0.5},
        "train": {"output_dir": str(tmp_path / "run")},
    })
    results = run(cfg)
    assert results["hub"] == {"reference_images": 16, "k": 2, "weight": 0.5}
    assert set(results["zero_shot_plain"]) == set(results["zero_shot"])
    assert "plain cosine" in (tmp_path / "run" / "results.md").read_text()
    cfg.method.hub_k = 0
    with pytest.raises(ValueError, match="hub_k must be at least 1"):
        run(cfg)


def test_transfer_script_zero_shot_on_a_folder(tmp_path, tiny_model):
    """The script's zero-shot mode on a labelled image folder, with class names from a file."""
    import subprocess
    import sys

    from PIL import Image

    for name, rgb in zip(["apple", "leaf"], RGB):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (24, 24), rgb).save(tmp_path / "data" / name / f"{i}.png")
    (tmp_path / "names.txt").write_text("a red apple\na green leaf\n")
    tiny_model.save_pretrained(tmp_path / "model")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "scripts/transfer_classify.py", f"model={tmp_path / 'model'}", f"data.test.name={tmp_path / 'data'}",
         f"data.class_names_file={tmp_path / 'names.txt'}", f"train.output_dir={tmp_path / 'run'}"],
        cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 classes, 6 test images" in proc.stdout
    assert (tmp_path / "run" / "results.md").is_file() and (tmp_path / "run" / "confusion.png").is_file()
