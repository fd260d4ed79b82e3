"""What a person gets for bad inputs: command lines, config values, broken model folders, pasted snippets."""

from __future__ import annotations

import re

import pytest
from data_helpers import load_repo_module

from mmtransfer.assemble.captions import FinetuneConfig
from mmtransfer.cli import parse_args
from mmtransfer.recipes import captions

RECIPE = "configs/openmoji_contrastive.yaml"


# ----------------------------------------------------------------------------- command line


@pytest.mark.parametrize(
    "argv",
    [
        ["--config", RECIPE, "train.max_steps=3", "--fast-dev-run", "optim.lr=0.5"],
        ["train.max_steps=3", "--config", RECIPE, "optim.lr=0.5", "--fast-dev-run"],
        ["--fast-dev-run", "train.max_steps=3", "--config", RECIPE, "optim.lr=0.5"],
    ],
)
def test_overrides_and_flags_in_any_order(argv):
    script = load_repo_module("scripts/finetune_captions.py")
    config, args = parse_args(FinetuneConfig, script.__doc__, argv)
    assert args.fast_dev_run and args.config == RECIPE
    assert (config.train.max_steps, config.optim.lr) == (3, 0.5)


# ----------------------------------------------------------------------------- config values


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_steps=-5", "train.max_steps must be at least 1, got -5."),
        ("train.batch_size=0", "train.batch_size must be at least 1, got 0."),
        ("train.grad_accum_steps=0", "train.grad_accum_steps must be at least 1, got 0."),
        ("train.log_every=0", "train.log_every must be at least 1, got 0."),
        ("train.seed=-1", "train.seed must be between 0 and 4294967295, got -1."),
        ("optim.lr=-1e-3", "optim.lr must be at least 0, got -0.001."),
        ("optim.betas=[0.9,1.0]", "optim.betas[1] must be at least 0 and less than 1, got 1.0."),
        ("optim.min_lr_ratio=1.5", "optim.min_lr_ratio must be between 0 and 1, got 1.5."),
        ("model.embed_dim=0", "model.embed_dim must be at least 1, got 0."),
        ("model.init_temperature=.nan", "model.init_temperature must be greater than 0, got nan."),
        ("model.fusion.num_heads=0", "model.fusion.num_heads must be at least 1, got 0."),
        ("model.fusion.dropout=1", "model.fusion.dropout must be at least 0 and less than 1, got 1.0."),
        ("model.text.max_length=0", "model.text.max_length must be at least 1, got 0."),
        ("model.image.image_size=-32", "model.image.image_size must be at least 1, got -32."),
        ("train.eval_batch_size=0", "train.eval_batch_size must be at least 1, got 0."),
        ("data.augment.hflip=2", "data.augment.hflip must be between 0 and 1, got 2.0."),
        ("freeze.text_keep_last=-1", "freeze.text_keep_last must be at least 0, got -1."),
    ],
)
def test_out_of_range_values_fail_as_the_recipe_loads(override, message):
    from mmtransfer.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config(FinetuneConfig, RECIPE, [override])
    assert str(err.value) == message


def test_out_of_range_values_in_a_yaml_file_and_other_recipes(tmp_path):
    from mmtransfer.assemble.domains import AdaptConfig
    from mmtransfer.config import ConfigError, load_config
    from mmtransfer.recipes.classify import ClassifyConfig

    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  max_steps: 0\n")
    with pytest.raises(ConfigError, match=r"^train\.max_steps must be at least 1, got 0\.$"):
        load_config(FinetuneConfig, recipe)
    with pytest.raises(ConfigError, match=r"^data\.shots\[1\] must be at least 1, got 0\.$"):
        load_config(ClassifyConfig, "configs/openmoji_zero_shot.yaml", ["data.shots=[1,0]"])
    with pytest.raises(ConfigError, match=r"^classifier\.dropout must be at least 0 and less than 1, got 1\.5\.$"):
        load_config(AdaptConfig, None, ["classifier.dropout=1.5"])


def test_config_built_in_python_names_its_class():
    from mmtransfer.config import ConfigError, FusionConfig
    from mmtransfer.train import TrainConfig

    with pytest.raises(ConfigError, match=r"^TrainConfig\.max_steps must be at least 1, got 0\.$"):
        TrainConfig(max_steps=0)
    with pytest.raises(ConfigError, match=r"^FusionConfig\.width must be at least 1, got 0\.$"):
        FusionConfig(width=0)
    assert FusionConfig(width=None).width is None  # unset optional fields pass


def test_script_exits_2_with_one_line_for_a_bad_value(run_script, tmp_path):
    proc = run_script("scripts/finetune_captions.py", "--config", RECIPE, "train.max_steps=-5",
                      f"train.output_dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == ["finetune_captions.py: error: train.max_steps must be at least 1, got -5."]
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- broken model folders


def _truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture
def saved_tiny(tmp_path, tiny_model):
    return tiny_model.save_pretrained(tmp_path / "model")


@pytest.mark.parametrize(
    "broken, problem",
    [
        ("model.safetensors", "is truncated or not a safetensors file"),
        ("config.json", "is truncated or not valid JSON"),
        ("text_config/config.json", "is truncated or not valid JSON"),
        ("preprocessor_config.json", "is truncated or not valid JSON"),
    ],
)
def test_truncated_file_of_a_saved_model_is_named(saved_tiny, broken, problem):
    import mmtransfer

    _truncate(saved_tiny / broken)
    with pytest.raises(mmtransfer.ModelFileError) as err:
        mmtransfer.load(saved_tiny)
    message = str(err.value)
    assert message.startswith(f"'{saved_tiny / broken}' {problem}")
    assert message.endswith("save the model again (save_pretrained) or copy its folder again.")
    assert "\n" not in message


def test_truncated_classifier_weights_are_named(tmp_path):
    import mmtransfer
    from mmtransfer.models.classifier import BackboneClassifier, ClassifierConfig
    from mmtransfer.models.lenet import LeNetConfig

    config = ClassifierConfig(lenet=LeNetConfig(channels=[4, 8], image_size=16), bottleneck_dim=8)
    folder = BackboneClassifier(config, num_classes=3).save_pretrained(tmp_path / "clf")
    _truncate(folder / "model.safetensors")
    with pytest.raises(mmtransfer.ModelFileError, match="^" + re.escape(f"'{folder / 'model.safetensors'}' is truncated")):
        mmtransfer.load(folder)


def test_weights_of_another_model_are_named(saved_tiny):
    import json

    import mmtransfer

    meta = json.loads((saved_tiny / "config.json").read_text())
    meta["config"]["embed_dim"] = 16
    (saved_tiny / "config.json").write_text(json.dumps(meta))
    with pytest.raises(mmtransfer.ModelFileError, match=r"model\.safetensors' holds the weights of a different model.*size mismatch"):
        mmtransfer.load(saved_tiny)


def test_run_main_prints_a_broken_model_folder_as_one_line(saved_tiny, capsys):
    import mmtransfer
    from mmtransfer.cli import run_main

    _truncate(saved_tiny / "model.safetensors")
    with pytest.raises(SystemExit) as exited:
        run_main(mmtransfer.load, saved_tiny)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [f"error: '{saved_tiny / 'model.safetensors'}' is truncated or not a safetensors file "
                                "(Error while deserializing header: incomplete metadata, file not fully covered); "
                                "save the model again (save_pretrained) or copy its folder again."]


@pytest.fixture
def hf_text_folder(tmp_path):
    """A tiny pretrained-style BERT folder (config.json, model.safetensors) with the packaged MiniLM tokenizer."""
    import shutil
    from pathlib import Path

    import torch
    from transformers import BertConfig, BertModel

    from mmtransfer.registry import resolve_text_name

    folder = tmp_path / "bert"
    torch.manual_seed(0)
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)).save_pretrained(folder)
    source = Path(resolve_text_name("minilm-l6"))
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(source / name, folder / name)
    return folder


@pytest.mark.parametrize("broken, problem", [("model.safetensors", "not a safetensors file"), ("config.json", "not valid JSON")])
def test_broken_file_of_a_local_text_tower_is_named(hf_text_folder, broken, problem):
    import mmtransfer
    from mmtransfer.models.text import TextEncoder

    config = mmtransfer.TextEncoderConfig(name=str(hf_text_folder))
    assert TextEncoder.from_config(config).width == 32  # the intact folder loads
    _truncate(hf_text_folder / broken)
    with pytest.raises(mmtransfer.ModelFileError, match="^" + re.escape(f"'{hf_text_folder / broken}' is truncated or {problem}")):
        TextEncoder.from_config(config)


# ----------------------------------------------------------------------------- inference without autograd


def test_inference_helpers_track_no_gradients_unless_asked(tiny_model):
    import warnings

    import torch

    pixels, texts = torch.randn(2, 3, 32, 32), ["a red square", "a blue circle"]
    outputs = {"image": tiny_model.encode_image(pixels), "text": tiny_model.encode_text(texts),
               "match": tiny_model.match(pixels, texts)}
    for name, out in outputs.items():
        assert not out.requires_grad and out.grad_fn is None, name
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # what a user's float(emb.norm()) warned about
        float(outputs["image"][0].norm())

    try:
        emb = tiny_model.encode_image(pixels, grad=True)
        txt = tiny_model.encode_text(texts, grad=True)
        assert emb.requires_grad and txt.requires_grad
        assert tiny_model.match(pixels, texts, grad=True).requires_grad
        (emb * txt).sum().backward()
        assert tiny_model.text_projection.net.weight.grad is not None
        torch.testing.assert_close(emb.detach(), outputs["image"])
    finally:
        tiny_model.zero_grad(set_to_none=True)  # the model is shared by the session's tests


# ----------------------------------------------------------------------------- printed snippets


def _snippet(report: str, heading: str) -> str:
    """The indented code lines under ``heading`` in a printed report, dedented."""
    lines = report.splitlines()
    start = lines.index(heading) + 1
    code = []
    for line in lines[start:]:
        if not line.startswith("  "):
            break
        code.append(line[2:])
    return "\n".join(code)


@pytest.fixture
def example_image(tmp_path):
    """The example image a run writes, from a small data set with an image column, as the recipes load it."""
    from datasets import Dataset, Features, Image, Value
    from PIL import Image as PILImage

    from mmtransfer.run_folder import save_example_image

    empty = Dataset.from_dict({"caption": []}, features=Features({"caption": Value("string")}))
    images = Dataset.from_dict({"image": [PILImage.new("RGBA", (20, 24), (200, 30, 30, 255))], "caption": ["red"]},
                               features=Features({"image": Image(), "caption": Value("string")}))
    path = save_example_image([empty, images], tmp_path)
    assert path == str(tmp_path / "example.png")
    assert PILImage.open(path).size == (20, 24)
    return path


def test_printed_load_snippet_runs_as_pasted(saved_tiny, example_image):
    summary = {"run_dir": str(saved_tiny.parent), "model_dir": str(saved_tiny), "validation": {}, "test": {},
               "example_image": example_image}
    code = _snippet(captions.format_report(summary), "Load it and embed an image:")
    namespace: dict = {}
    exec(compile(code, "<printed snippet>", "exec"), namespace)  # a fresh namespace, as a new session has
    assert tuple(namespace["emb"].shape) == (1, 32)


def test_printed_snippet_without_an_image_marks_its_placeholder(saved_tiny):
    summary = {"run_dir": str(saved_tiny.parent), "model_dir": str(saved_tiny), "validation": {}, "test": {}}
    code = _snippet(captions.format_report(summary), "Load it and embed an image:")
    compile(code, "<printed snippet>", "exec")
    assert code.splitlines()[-1].endswith("# placeholder: put the path of one of your images here")


def test_printed_classifier_snippet_of_a_multitask_run_runs(saved_tiny, example_image, capsys):
    import torch

    from mmtransfer.recipes.multitask import format_report
    from mmtransfer.transfer import LinearHead, save_label_head

    save_label_head(LinearHead(torch.nn.functional.normalize(torch.randn(3, 32), dim=-1)), ["red", "green", "blue"], saved_tiny)
    summary = {"run_dir": str(saved_tiny.parent), "model_dir": str(saved_tiny), "tasks": ["captions", "labels"],
               "batch_shares": {"captions": 8, "labels": 8}, "weighting": "fixed", "test": {}, "example_image": example_image}
    exec(compile(_snippet(format_report(summary), "Load the classifier:"), "<printed snippet>", "exec"), {})
    assert capsys.readouterr().out.strip() in {"['red']", "['green']", "['blue']"}
