"""Feature caches for frozen towers, with and without augmented copies."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmtransfer.features import CachedCaptionCollator, CachedFeatures
from mmtransfer.models.preprocess import AugmentConfig, ImagePreprocessor, PreprocessConfig
from mmtransfer.transfer import DEFAULT_TEMPLATES

try:
    from data_helpers import save_image, write_jsonl
except ImportError:  # pragma: no cover - run from the repository root
    from tests.data_helpers import save_image, write_jsonl


def test_affine_augmentation_fills_with_the_background():
    pre = PreprocessConfig(image_size=32, background=(255, 255, 255))
    plain = ImagePreprocessor(pre)
    aug = ImagePreprocessor(pre, AugmentConfig(degrees=30, translate=0.2, scale=(0.7, 1.2)))
    assert aug.augment.enabled and not plain.augment.enabled
    white = Image.new("RGB", (40, 40), (255, 255, 255))
    torch.manual_seed(0)
    # Every uncovered corner takes the background colour, so a white image stays white.
    assert torch.allclose(aug([white] * 4), plain([white] * 4), atol=1e-5)
    # A black square does move.
    square = Image.new("RGB", (40, 40), (255, 255, 255))
    square.paste((0, 0, 0), (10, 10, 30, 30))
    torch.manual_seed(0)
    moved = aug([square] * 4)
    assert moved.shape == (4, 3, 32, 32)
    assert not torch.allclose(moved, plain([square] * 4).expand_as(moved), atol=1e-3)


def _copies(n: int = 6, k: int = 3) -> list[CachedFeatures]:
    # Copy c holds the value c in every pooled and token entry.
    return [CachedFeatures(pooled=torch.full((n, 4), float(c)), tokens=torch.full((n, 2, 4), float(c), dtype=torch.float16))
            for c in range(k)]


def test_collator_draws_each_item_from_one_copy_in_training_and_the_plain_one_in_evaluation(tiny_model):
    copies = _copies()
    captions = [[f"caption {i}"] for i in range(6)]
    train = CachedCaptionCollator(copies, captions, tokenizer=tiny_model.tokenizer, train=True, seed=0)
    seen = set()
    for _ in range(20):
        batch = train([0, 1, 2, 3, 4, 5])
        pooled, tokens = batch["image_pooled"][:, 0], batch["image_tokens"][:, :, 0]  # (B,), (B, P)
        assert torch.equal(tokens, pooled[:, None].expand_as(tokens))  # tokens and pooled from the same copy
        seen |= set(pooled.tolist())
    assert seen == {0.0, 1.0, 2.0}
    evaluation = CachedCaptionCollator(copies, captions, tokenizer=tiny_model.tokenizer, train=False)
    assert evaluation([0, 1, 2])["image_pooled"].eq(0).all()


def test_collator_with_one_copy_is_unchanged(tiny_model):
    feats = _copies(k=1)[0]
    batch = CachedCaptionCollator(feats, [["x"]] * 6, tokenizer=tiny_model.tokenizer, train=True)([1, 2])
    assert batch["image_pooled"].shape == (2, 4) and batch["image_tokens"].dtype == torch.float32


def _captioned_folder(root: Path, n: int = 24) -> Path:
    colours = [(220, 30, 30), (30, 30, 220), (30, 180, 30), (230, 200, 20)]
    names = ["red", "blue", "green", "yellow"]
    rows = []
    for i in range(n):
        save_image(root / f"{i}.png", size=(36, 36), color=colours[i % 4])
        rows.append({"file_name": f"{i}.png", "text": f"a {names[i % 4]} square number {i}"})
    write_jsonl(root / "metadata.jsonl", rows)
    return root


def test_finetune_trains_on_augmented_copies_of_cached_features(tmp_path):
    from mmtransfer.config import from_dict
    from mmtransfer.recipes import captions as finetune
    from mmtransfer.registry import get_preset

    folder = _captioned_folder(tmp_path / "data")
    cfg = from_dict(finetune.FinetuneConfig, {
        "freeze": {"text": True, "image": True},
        "data": {"train": {"name": str(folder)}, "validation": None, "test": None,
                 "augment": {"degrees": 10, "scale": [0.8, 1.0]}, "augmented_copies": 2,
                 "features": {"folder": str(tmp_path / "features")}},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 3, "batch_size": 8, "eval_every": 3,
                  "save_every": 3, "progress_bar": False, "trackers": []},
    })
    cfg.model = get_preset("tiny-random")
    summary = finetune.run(cfg)
    assert summary["steps"] == 3
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert written["feature_cache"] is True and written["augmented_copies"] == 2
    # The plain training features plus two augmented copies, on disk.
    assert len(list((tmp_path / "features").glob("image-*.safetensors"))) == 3


@pytest.mark.parametrize("frozen_image", [True, False])
def test_finetune_with_caption_templates(tmp_path, frozen_image):
    """Templated training captions: cached text holds every form (frozen towers), or the raw collator templates them."""
    from mmtransfer.assemble import captions
    from mmtransfer.config import ConfigError, from_dict
    from mmtransfer.recipes import captions as finetune
    from mmtransfer.registry import get_preset

    folder = _captioned_folder(tmp_path / "data")

    def config(templates):
        cfg = from_dict(finetune.FinetuneConfig, {
            "freeze": {"text": True, "image": frozen_image},
            "data": {"train": {"name": str(folder)}, "validation": {"name": str(folder)}, "test": None,
                     "caption_templates": templates, "features": {"folder": str(tmp_path / "features")}},
            "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "batch_size": 8, "eval_every": 2,
                      "save_every": 2, "progress_bar": False, "trackers": []},
        })
        cfg.model = get_preset("tiny-random")
        return cfg

    assert finetune.run(config(["{}", "a picture of {}"]))["steps"] == 2
    assert captions.caption_templates(config("default").data) == tuple(DEFAULT_TEMPLATES)
    with pytest.raises(ConfigError, match="data.caption_templates must be .* one '{}' each"):
        finetune.run(config(["a picture"]))


def test_collator_carries_labels_when_given(tiny_model):
    feats = _copies(k=1)[0]
    batch = CachedCaptionCollator(feats, [["x"]] * 6, tokenizer=tiny_model.tokenizer, labels=[3, 3, 1, 0, 2, 2])([1, 2, 5])
    assert batch["labels"].tolist() == [3, 1, 2]
    assert "labels" not in CachedCaptionCollator(feats, [["x"]] * 6, tokenizer=tiny_model.tokenizer)([1])


def test_image_feature_cache_keeps_poolings_apart(tmp_path, tiny_model):
    # Pooling has no weights: the cache key must still tell a class-token- from a mean-pooled tower.

    from mmtransfer.features import image_features
    from mmtransfer.models.image import ImageEncoder

    tower = tiny_model.image_encoder
    cls_tower = ImageEncoder(dataclasses.replace(tower.config, pooling="cls"), tower.backbone, tower.preprocessor.config).eval()
    mean_tower = ImageEncoder(dataclasses.replace(tower.config, pooling="mean"), tower.backbone, tower.preprocessor.config).eval()
    loader = [{"pixel_values": torch.randn(3, 3, 32, 32), "image_index": torch.arange(3)}]
    kwargs = dict(num_items=3, keep_tokens=False, cache_dir=tmp_path, data_key="d", progress=False)
    cls_feats = image_features(cls_tower, loader, **kwargs).pooled
    mean_feats = image_features(mean_tower, loader, **kwargs).pooled
    assert len(list(tmp_path.glob("image-*.safetensors"))) == 2
    assert not torch.allclose(cls_feats, mean_feats)
    torch.testing.assert_close(image_features(mean_tower, loader, **kwargs).pooled, mean_feats)


def test_text_feature_cache_keeps_poolings_apart(tmp_path, tiny_model):
    import copy

    from mmtransfer.features import text_features
    from mmtransfer.models.text import TextEncoder

    mean_tower = tiny_model.text_encoder  # shared by the session: its copy is changed, never the tower itself
    cls_tower = TextEncoder(dataclasses.replace(mean_tower.config, pooling="cls"), copy.deepcopy(mean_tower.model),
                            mean_tower.tokenizer).eval()
    kwargs = dict(keep_tokens=False, cache_dir=tmp_path, progress=False)
    texts = ["a red square", "two blue circles and a line"]
    mean_feats = text_features(mean_tower, texts, **kwargs).pooled
    cls_feats = text_features(cls_tower, texts, **kwargs).pooled
    assert len(list(tmp_path.glob("text-*.safetensors"))) == 2
    assert not torch.allclose(mean_feats, cls_feats)


def test_image_feature_cache_sees_images_replaced_under_the_same_name(tmp_path):
    # The cache is keyed on the data set's fingerprint, which must follow the files' contents, not only their names.
    from mmtransfer.config import ImageEncoderConfig
    from mmtransfer.data import ImageCollator, load, make_loader
    from mmtransfer.features import image_features
    from mmtransfer.models.image import ImageEncoder

    folder = _captioned_folder(tmp_path / "data", n=4)
    torch.manual_seed(0)
    tower = ImageEncoder.from_config(ImageEncoderConfig(name="resnet10t", pretrained=False, image_size=32)).eval()

    def features(ds):
        loader = make_loader(ds, ImageCollator(tower.preprocessor), batch_size=4)
        return image_features(tower, loader, len(ds), keep_tokens=False, cache_dir=tmp_path / "features",
                              data_key=ds._fingerprint, progress=False).pooled

    first = load(folder)
    before = features(first)
    again = load(folder)
    assert again._fingerprint == first._fingerprint  # unchanged files: the cache is reused
    torch.testing.assert_close(features(again), before)
    assert len(list((tmp_path / "features").glob("image-*.safetensors"))) == 1
    Image.effect_noise((36, 36), 80).convert("RGB").save(folder / "2.png")  # other pixels, same name
    after = features(load(folder))
    assert len(list((tmp_path / "features").glob("image-*.safetensors"))) == 2
    assert not torch.allclose(after[2], before[2])
    torch.testing.assert_close(after[[0, 1, 3]], before[[0, 1, 3]])
