"""Configs, overrides and the model registry: the errors people read."""

from __future__ import annotations

import subprocess
import sys

import pytest

import mmtransfer
from mmtransfer.config import ConfigError, ModelConfig, apply_overrides, load_config


def test_unknown_preset_lists_known_names():
    with pytest.raises(mmtransfer.UnknownModelError) as err:
        mmtransfer.create_model("minilm-l6-efficientnet-lit0")
    message = str(err.value)
    for name in mmtransfer.list_models():
        assert name in message
    assert "Did you mean 'minilm-l6-efficientnet-lite0'" in message


def test_list_models_has_the_offline_default():
    assert mmtransfer.DEFAULT_PRESET in mmtransfer.list_models()
    assert set(mmtransfer.describe_models()) == set(mmtransfer.list_models())


def test_unknown_image_model_suggests_close_timm_names():
    cfg = mmtransfer.ModelConfig(image=mmtransfer.ImageEncoderConfig(name="resnet5O", pretrained=False))
    with pytest.raises(mmtransfer.UnknownModelError, match="efficientnet-lite0.*resnet50"):
        mmtransfer.create_model(cfg)


def test_unknown_text_model_offline_is_explained(tmp_path):
    cfg = mmtransfer.ModelConfig(text=mmtransfer.TextEncoderConfig(name=str(tmp_path / "nope")))
    with pytest.raises(mmtransfer.UnknownModelError, match="Cannot load the text model config.*minilm-l6"):
        mmtransfer.create_model(cfg)


def test_bad_text_override_field():
    cfg = mmtransfer.ModelConfig(text=mmtransfer.TextEncoderConfig(pretrained=False, config_overrides={"hiden_size": 8}))
    with pytest.raises(mmtransfer.UnknownModelError, match="hiden_size"):
        mmtransfer.create_model(cfg)


def test_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("embed_dim: 128\ntext:\n  pooling: cls\nfusion:\n  num_layers: 1\n")
    cfg = load_config(ModelConfig, path, ["fusion.num_heads=4", "image.model_kwargs.depth=3", "init_temperature=1e-2"])
    assert (cfg.embed_dim, cfg.text.pooling, cfg.fusion.num_layers, cfg.fusion.num_heads) == (128, "cls", 1, 4)
    assert cfg.image.model_kwargs == {"depth": 3}
    assert cfg.init_temperature == 0.01


def test_yaml_booleans_name_the_choice_they_spell(tmp_path):
    """YAML 1.1 reads no/yes as booleans: train.mixed_precision=no (or unquoted in a recipe) is the choice "no"."""
    from mmtransfer.assemble.captions import FinetuneConfig

    assert load_config(FinetuneConfig, None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  mixed_precision: no\n")
    assert load_config(FinetuneConfig, path).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match=r"'train.mixed_precision' must be one of \['no', 'bf16', 'fp16'\], got True"):
        load_config(FinetuneConfig, None, ["train.mixed_precision=yes"])  # no choice is spelled "yes"


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (["fusion.num_layer=1"], r"Unknown config key 'num_layer' in 'fusion'. Did you mean 'num_layers'\?"),
        (["text.pooling=max"], r"'text.pooling' must be one of \['mean', 'cls'\]"),
        (["embed_dim=wide"], r"'embed_dim' must be of type int"),
        (["embed_dim"], r"dotted.key=value"),
        (["embed_dim.x=1"], r"'embed_dim' is not a section"),
        (['text.name="unclosed'], r"Cannot read the value of override 'text.name'.*not valid YAML"),
    ],
)
def test_bad_overrides_are_explained(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(ModelConfig, None, overrides)


def test_unknown_yaml_key_lists_valid_keys(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("fusion:\n  depth: 3\n")
    with pytest.raises(ConfigError, match="Valid keys: bidirectional, dropout, mlp_ratio, num_heads, num_layers, width"):
        load_config(ModelConfig, path)


def test_missing_and_malformed_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(ModelConfig, tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(ModelConfig, bad)


def test_apply_overrides_does_not_mutate():
    data = {"a": {"b": 1}}
    out = apply_overrides(data, ["a.b=2"])
    assert data == {"a": {"b": 1}} and out == {"a": {"b": 2}}


def test_import_is_light():
    code = (
        "import sys, time; t = time.perf_counter(); import mmtransfer; dt = time.perf_counter() - t; "
        "heavy = [m for m in ('torch', 'transformers', 'timm', 'datasets', 'accelerate') if m in sys.modules]; "
        "print(dt, heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split(maxsplit=1)
    assert float(out[0]) < 2.0
    assert out[1].strip() == "[]"
