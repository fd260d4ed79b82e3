"""Unit tests of the towers, fusion and MultimodalModel on tiny random encoders."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image

import mmtransfer
from mmtransfer.config import FusionConfig, ImageEncoderConfig, ModelConfig, TextEncoderConfig
from mmtransfer.models.fusion import Fusion
from mmtransfer.models.outputs import MultimodalOutput


def _tiny_config(**changes) -> ModelConfig:
    from mmtransfer.registry import get_preset

    return dataclasses.replace(get_preset("tiny-random"), **changes)


def test_encode_shapes_and_normalisation(tiny_model):
    img = [Image.new("RGB", (40, 30), (200, 10, 10)), Image.new("RGBA", (16, 16))]
    with torch.no_grad():
        z_img = tiny_model.encode_image(img)
        z_txt = tiny_model.encode_text(["a red square", "nothing at all here"])
        raw = tiny_model.encode_text("a red square", normalize=False)
    assert z_img.shape == (2, 32) and z_txt.shape == (2, 32) and raw.shape == (1, 32)
    torch.testing.assert_close(z_img.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(z_txt.norm(dim=-1), torch.ones(2))
    assert tiny_model.similarity(img, ["x", "y", "z"]).shape == (2, 3)


def test_encode_text_accepts_tokens_and_strings(tiny_model):
    tokens = tiny_model.tokenize(["a cat", "a much longer sentence about a dog"])
    with torch.no_grad():
        a = tiny_model.encode_text(["a cat", "a much longer sentence about a dog"])
        b = tiny_model.encode_text(tokens)
        c = tiny_model.encode_text(tokens["input_ids"], attention_mask=tokens["attention_mask"])
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)


def test_forward_returns_one_dataclass(tiny_model):
    pixels = torch.randn(3, 3, 32, 32)
    tok = tiny_model.tokenize(["one", "two words", "and three words"])
    with torch.no_grad():
        out = tiny_model(pixels, **tok, output_attentions=True)
    assert isinstance(out, MultimodalOutput)
    assert out.logits_per_image.shape == (3, 3)
    torch.testing.assert_close(out.logits_per_text, out.logits_per_image.T)
    assert out.fusion.itm_logits.shape == (3, 2)
    assert out.fusion.tokens.shape[:2] == tok["input_ids"].shape
    # One (B, heads, T, P) map per layer; P = 1 class token + 16 patches.
    assert [a.shape for a in out.fusion.attentions] == [(3, 2, tok["input_ids"].shape[1], 17)]
    torch.testing.assert_close(out.fusion.attentions[0].sum(-1), torch.ones(3, 2, tok["input_ids"].shape[1]))


def test_logit_scale_is_clamped(tiny_model):
    with torch.no_grad():
        old = tiny_model.logit_scale.clone()
        tiny_model.logit_scale.fill_(10.0)
        assert float(tiny_model.get_logit_scale()) == pytest.approx(100.0)
        tiny_model.logit_scale.copy_(old)
    assert float(tiny_model.get_logit_scale().detach()) == pytest.approx(1 / 0.07, rel=1e-5)


def test_padding_does_not_change_fused_outputs(tiny_model):
    """Extra padding tokens change neither the fused real tokens nor the pooled vector nor ITM."""
    texts = ["a small red apple", "hi"]
    short = tiny_model.tokenize(texts)
    pad_id = tiny_model.tokenizer.pad_token_id
    extra = 7
    long_ids = torch.cat([short["input_ids"], torch.full((2, extra), pad_id)], dim=1)
    long_mask = torch.cat([short["attention_mask"], torch.zeros(2, extra, dtype=torch.long)], dim=1)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a = tiny_model(pixels, short["input_ids"], short["attention_mask"])
        b = tiny_model(pixels, long_ids, long_mask)
    T = short["input_ids"].shape[1]
    real = short["attention_mask"].bool()
    torch.testing.assert_close(a.fusion.tokens[real], b.fusion.tokens[:, :T][real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.fusion.pooled, b.fusion.pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.fusion.itm_logits, b.fusion.itm_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.text_embeds, b.text_embeds, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_fusion_padding_mask_in_both_directions(bidirectional):
    torch.manual_seed(0)
    fusion = Fusion(FusionConfig(num_layers=2, num_heads=4, bidirectional=bidirectional), 24, 20, 32).eval()
    text = torch.randn(2, 5, 24)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    image = torch.randn(2, 9, 20)
    with torch.no_grad():
        a = fusion(text, mask, image)
        garbage = text.clone()
        garbage[0, 3:] = 1e3  # padded positions hold arbitrary values
        b = fusion(garbage, mask, image)
    torch.testing.assert_close(a.pooled, b.pooled)
    torch.testing.assert_close(a.tokens[mask.bool()], b.tokens[mask.bool()])


@pytest.mark.parametrize("bidirectional", [False, True])
def test_shared_image_rows_equal_expanded_images(bidirectional):
    """Pairing texts with shared image rows (as ITM does) gives what copying the images gives."""
    torch.manual_seed(0)
    fusion = Fusion(FusionConfig(num_layers=2, num_heads=4, bidirectional=bidirectional), 24, 20, 32).eval()
    text, mask = torch.randn(6, 5, 24), torch.ones(6, 5, dtype=torch.long)
    image = torch.randn(3, 9, 20)
    index = torch.tensor([0, 1, 2, 0, 1, 0])
    with torch.no_grad():
        shared = fusion(text, mask, image, image_index=index)
        copied = fusion(text, mask, image[index])
    torch.testing.assert_close(shared.pooled, copied.pooled)
    torch.testing.assert_close(shared.itm_logits, copied.itm_logits)


def test_save_load_round_trip_is_identical(tiny_model, tmp_path):
    pixels = torch.randn(2, 3, 32, 32)
    tok = tiny_model.tokenize(["a dog", "a blue car on a road"])
    with torch.no_grad():
        before = tiny_model(pixels, **tok)
    tiny_model.save_pretrained(tmp_path / "m")
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer", "text_config"} <= files
    loaded = mmtransfer.load(str(tmp_path / "m"))
    with torch.no_grad():
        after = loaded(pixels, **loaded.tokenize(["a dog", "a blue car on a road"]))
    for name in ("image_embeds", "text_embeds", "logits_per_image"):
        assert torch.equal(getattr(before, name), getattr(after, name)), name
    assert torch.equal(before.fusion.itm_logits, after.fusion.itm_logits)
    assert loaded.config == tiny_model.config
    assert loaded.preprocessor.config == tiny_model.preprocessor.config
    # Saving over an existing folder replaces it whole; no temporary folders are left behind.
    loaded.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_from_pretrained_on_a_folder_without_a_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="no saved mmtransfer model"):
        mmtransfer.load(str(tmp_path))


def test_freeze_keep_last_blocks_and_summary(tiny_model):
    import copy

    model = copy.deepcopy(tiny_model)
    model.freeze("text", keep_last_blocks=1)
    layers = model.text_encoder.model.encoder.layer
    assert not any(p.requires_grad for p in layers[0].parameters())
    assert all(p.requires_grad for p in layers[1].parameters())
    assert not any(p.requires_grad for p in model.text_encoder.model.embeddings.parameters())
    assert all(p.requires_grad for p in model.image_encoder.parameters())
    model.freeze("image")
    assert not any(p.requires_grad for p in model.image_encoder.parameters())
    assert all(p.requires_grad for p in model.text_projection.parameters())
    summary = model.parameter_summary()
    assert "frozen" in summary and "image tower" in summary
    model.unfreeze()
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="tower must be one of"):
        model.freeze("audio")


def test_frozen_batchnorm_keeps_running_stats():
    cfg = _tiny_config(image=ImageEncoderConfig(name="resnet10t", pretrained=False, image_size=32))
    model = mmtransfer.create_model(cfg).freeze("image")
    model.train()
    bn = next(m for m in model.image_encoder.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    model.encode_image(torch.randn(4, 3, 32, 32))
    assert not bn.training and torch.equal(before, bn.running_mean)
    assert model.text_encoder.training


@pytest.mark.parametrize("pooling", ["cls", "mean", "auto"])
def test_vit_end_to_end_with_each_pooling(pooling):
    cfg = _tiny_config()
    cfg = dataclasses.replace(cfg, image=dataclasses.replace(cfg.image, pooling=pooling))
    model = mmtransfer.create_model(cfg).eval()
    out = model.image_features(torch.randn(2, 3, 32, 32))
    assert out.tokens.shape == (2, 17, 64)  # class token + 4x4 patches
    expected = {"cls": out.tokens[:, 0], "mean": out.tokens[:, 1:].mean(1)}.get(pooling)
    if expected is not None:
        torch.testing.assert_close(out.pooled, expected)
    loss = model(torch.randn(2, 3, 32, 32), **model.tokenize(["a", "b"])).logits_per_image.sum()
    loss.backward()
    assert model.image_encoder.backbone.patch_embed.proj.weight.grad is not None


def test_cls_pooling_on_a_cnn_is_refused():
    cfg = _tiny_config(image=ImageEncoderConfig(name="resnet10t", pretrained=False, pooling="cls"))
    with pytest.raises(ValueError, match="class token"):
        mmtransfer.create_model(cfg)


def test_vit_size_mismatch_explains_the_fix():
    cfg = _tiny_config(image=ImageEncoderConfig(
        name="vit_tiny_patch16_224", pretrained=False, image_size=64, model_kwargs={"depth": 1}))
    with pytest.raises(ValueError, match="model_kwargs.img_size=64"):
        mmtransfer.create_model(cfg)


def test_torchvision_resnet_grid_tokens():
    cfg = _tiny_config(image=ImageEncoderConfig(name="torchvision:resnet18", pretrained=False, image_size=64))
    model = mmtransfer.create_model(cfg).eval()
    out = model.image_features(torch.randn(2, 3, 64, 64))
    assert out.tokens.shape == (2, 4, 512) and out.pooled.shape == (2, 512)
    torch.testing.assert_close(out.pooled, out.tokens.mean(1))
    assert model.preprocessor.config.image_size == 64
    assert len(model.image_encoder.blocks()) == 4


def test_text_cls_pooling():
    cfg = _tiny_config()
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, pooling="cls"))
    model = mmtransfer.create_model(cfg).eval()
    out = model.text_features(["hello world"])
    torch.testing.assert_close(out.pooled, out.tokens[:, 0])


def test_sentencepiece_albert_text_tower(tmp_path):
    """A tiny ALBERT with a sentencepiece model built here loads, encodes and round-trips."""
    import sentencepiece as spm
    from transformers import AlbertConfig

    corpus = ["a photo of a cat", "a picture of a kitten", "a cup of espresso", "the quick brown fox jumps"] * 50
    folder = tmp_path / "albert"
    folder.mkdir()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(folder / "spiece"), vocab_size=32, hard_vocab_limit=False,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, pad_piece="<pad>", unk_piece="<unk>",
        bos_piece="[CLS]", eos_piece="[SEP]", minloglevel=2,
    )
    AlbertConfig(vocab_size=64, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                 num_attention_heads=2, intermediate_size=64).save_pretrained(folder)
    cfg = _tiny_config(text=TextEncoderConfig(name=str(folder), pretrained=False))
    model = mmtransfer.create_model(cfg).eval()
    tok = model.tokenize(["a photo of a cat"])
    unk = model.tokenizer.unk_token_id
    assert (tok["input_ids"] != unk).all(), "the sentencepiece vocabulary was not used"
    with torch.no_grad():
        z = model.encode_text(["a photo of a cat", "espresso"])
    assert z.shape == (2, 32)
    model.save_pretrained(tmp_path / "saved")
    again = mmtransfer.load(str(tmp_path / "saved"))
    with torch.no_grad():
        assert torch.equal(again.encode_text(["a photo of a cat", "espresso"]), z)


def test_mlp_projection_and_no_fusion():
    cfg = _tiny_config(projection="mlp", fusion=FusionConfig(num_layers=0))
    model = mmtransfer.create_model(cfg).eval()
    out = model(torch.randn(2, 3, 32, 32), **model.tokenize(["a", "b"]))
    assert out.fusion is None
    with pytest.raises(RuntimeError, match="no fusion"):
        model.match(torch.randn(1, 3, 32, 32), ["a"])


def test_per_tower_projections_none_keeps_the_sentence_space(tmp_path):
    # Text projection "none": the shared space is the text tower's own pooled space.
    cfg = _tiny_config(text_projection="none", image_projection="mlp", projection_dropout=0.2, embed_dim=64)
    model = mmtransfer.create_model(cfg).eval()
    assert not list(model.text_projection.parameters())
    texts = ["a red apple", "a blue car"]
    with torch.no_grad():
        pooled = model.text_features(texts).pooled
        torch.testing.assert_close(model.encode_text(texts), torch.nn.functional.normalize(pooled, dim=-1))
        z = model.encode_image(torch.randn(2, 3, 32, 32))
    assert z.shape == (2, 64)
    # Dropout acts in training only and adds no weights: a saved model loads without it.
    model.train()
    x = torch.randn(4, model.image_encoder.width)
    assert not torch.equal(model.image_projection(x), model.image_projection(x))
    model.eval().save_pretrained(tmp_path / "m")
    again = mmtransfer.load(str(tmp_path / "m"))
    torch.testing.assert_close(again.image_projection(x), model.image_projection(x))
    # "none" needs the shared width to equal the tower's.
    with pytest.raises(ValueError, match="embed_dim"):
        mmtransfer.create_model(_tiny_config(text_projection="none", embed_dim=16))


def test_ensemble_of_separately_trained_models_averages_their_image_embeddings(tmp_path, run_script):
    import copy

    cfg = _tiny_config(text_projection="none", image_projection="mlp", embed_dim=64)
    torch.manual_seed(0)
    a = mmtransfer.create_model(cfg).eval()
    b = copy.deepcopy(a)  # the same towers and text side; its own image projection and temperature
    for p in b.image_projection.parameters():
        torch.nn.init.normal_(p, std=0.05)
    with torch.no_grad():
        b.logit_scale.add_(1.0)
    merged = mmtransfer.ensemble([a, b])
    x, texts = torch.randn(3, 3, 32, 32), ["a red apple", "a blue car"]
    with torch.no_grad():
        expected = torch.nn.functional.normalize(a.encode_image(x) + b.encode_image(x), dim=-1)
        torch.testing.assert_close(merged.encode_image(x), expected)
        torch.testing.assert_close(merged.encode_text(texts), a.encode_text(texts))
        torch.testing.assert_close(merged.logit_scale, (a.logit_scale + b.logit_scale) / 2)
    assert merged.members == 2 and isinstance(merged, mmtransfer.MultimodalModel)
    # Ensembles flatten: adding a third model gives three equal members.
    assert mmtransfer.ensemble([merged, copy.deepcopy(a)]).members == 3
    # Models whose towers differ cannot share them.
    with pytest.raises(ValueError, match="text_encoder.*only the image projection"):
        mmtransfer.ensemble([a, mmtransfer.create_model(cfg)])
    with pytest.raises(ValueError, match="at least two"):
        mmtransfer.ensemble([a])
    # The script does the same for saved folders, and the result loads as an ordinary model.
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    run_script("scripts/ensemble_models.py", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "ens"))
    with torch.no_grad():
        torch.testing.assert_close(mmtransfer.load(str(tmp_path / "ens")).encode_image(x), expected)
    bad = run_script("scripts/ensemble_models.py", str(tmp_path / "a"), str(tmp_path / "nowhere"), "--out", str(tmp_path / "x"), check=False)
    assert bad.returncode == 2 and "nowhere" in bad.stderr and "Traceback" not in bad.stderr
    # Ensembles saved when they were a model config field (image_projection_members) load as ensembles.
    import json

    legacy = tmp_path / "ens"
    (legacy / "ensemble.json").unlink()
    meta = json.loads((legacy / "config.json").read_text())
    meta["config"]["image_projection_members"] = 2
    (legacy / "config.json").write_text(json.dumps(meta))
    loaded = mmtransfer.load(str(legacy))
    assert loaded.members == 2
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(x), expected)


def test_create_model_from_dict_and_unknown_key():
    model = mmtransfer.create_model(dataclasses.asdict(_tiny_config(embed_dim=16)))
    assert model.encode_text(["x"]).shape == (1, 16)
    with pytest.raises(mmtransfer.ConfigError, match="Valid keys"):
        mmtransfer.create_model({"embed_dimension": 16})


def test_models_saved_with_the_text_towers_pooler_still_load(tiny_model, tmp_path):
    """Saved folders from before the pooler head was dropped hold pooler.* weights: they load, and nothing else is lenient."""
    from safetensors.torch import load_file, save_file

    import mmtransfer

    folder = tiny_model.save_pretrained(tmp_path / "m")
    weights = load_file(str(folder / "model.safetensors"))
    assert not any(".pooler." in k for k in weights)  # dropped: no loss could train it
    save_file({**weights, "text_encoder.model.pooler.dense.weight": torch.zeros(32, 32)}, str(folder / "model.safetensors"))
    loaded = mmtransfer.load(str(folder))
    assert torch.equal(loaded.logit_scale, tiny_model.logit_scale)
    save_file({**weights, "image_projection.extra": torch.zeros(2)}, str(folder / "model.safetensors"))
    with pytest.raises(mmtransfer.ModelFileError, match="image_projection.extra"):
        mmtransfer.load(str(folder))
