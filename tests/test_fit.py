"""Towers that fit: gradient checkpointing, torch.compile and the accelerate config files (issue #23, part 3)."""

from __future__ import annotations

import copy
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mmtransfer
from mmtransfer.config import ImageEncoderConfig
from mmtransfer.losses import ContrastiveLoss
from mmtransfer.registry import get_preset

ROOT = Path(__file__).resolve().parents[1]


def _tiny(**changes) -> mmtransfer.MultimodalModel:
    """The tiny random preset without dropout (so two forward passes are comparable), in training mode."""
    cfg = get_preset("tiny-random")
    cfg.text.config_overrides.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return mmtransfer.create_model(dataclasses.replace(cfg, **changes)).train()


def _batch(model, n: int = 4, size: int = 32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    texts = ["a red square", "two blue circles on a line", "nothing", "a small green triangle"][:n]
    return {"pixel_values": torch.randn(n, 3, size, size, generator=g), **model.tokenize(texts)}


def _loss_and_grads(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(**batch, fuse=False)
    loss = ContrastiveLoss()(out.image_embeds, out.text_embeds, out.logit_scale).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(a: tuple, b: tuple) -> None:
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------- gradient checkpointing


def test_checkpointing_gives_the_same_loss_and_gradients():
    plain = _tiny()
    ckpt = copy.deepcopy(plain).set_gradient_checkpointing(True)
    assert ckpt.config.gradient_checkpointing and ckpt.text_encoder.gradient_checkpointing
    assert ckpt.image_encoder.gradient_checkpointing and not plain.text_encoder.gradient_checkpointing
    batch = _batch(plain)
    reference = _loss_and_grads(plain, batch)
    assert any(n.startswith("text_encoder.model.encoder.layer.0.") for n in reference[1])
    assert any(n.startswith("image_encoder.backbone.blocks.0.") for n in reference[1])
    _assert_same(reference, _loss_and_grads(ckpt, batch))


def test_checkpointing_recomputes_the_blocks_in_backward():
    """It is really on: every tower block runs twice per training step (forward, then again in backward)."""
    model = _tiny(gradient_checkpointing=True)
    calls = {"text": 0, "image": 0}
    # Hooks on a module inside each block (transformers checkpoints a layer's forward, inside its own hooks).
    model.text_encoder.model.encoder.layer[0].attention.register_forward_hook(lambda *_: calls.__setitem__("text", calls["text"] + 1))
    model.image_encoder.backbone.blocks[0].attn.register_forward_hook(lambda *_: calls.__setitem__("image", calls["image"] + 1))
    _loss_and_grads(model, _batch(model))
    assert calls == {"text": 2, "image": 2}
    calls.update(text=0, image=0)
    with torch.no_grad():  # no gradients: nothing to recompute
        model(**_batch(model), fuse=False)
    model.eval()
    model(**_batch(model), fuse=False)
    assert calls == {"text": 2, "image": 2}


def test_frozen_towers_are_untouched_by_checkpointing():
    """Frozen towers build no graph and give the same features; only the trainable parts get gradients."""
    plain = _tiny().freeze("both")
    ckpt = copy.deepcopy(plain).set_gradient_checkpointing(True)
    batch = _batch(plain)
    out = ckpt(**batch, fuse=False)
    assert not out.text.pooled.requires_grad and not out.image.pooled.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(out.text.pooled, plain(**batch, fuse=False).text.pooled)
    reference, checkpointed = _loss_and_grads(plain, batch), _loss_and_grads(ckpt, batch)
    _assert_same(reference, checkpointed)
    assert not any(n.startswith(("text_encoder.", "image_encoder.")) for n in checkpointed[1])


def test_checkpointing_with_one_tower_partly_frozen():
    plain = _tiny().freeze("text", keep_last_blocks=1)
    ckpt = copy.deepcopy(plain).set_gradient_checkpointing(True)
    batch = _batch(plain)
    reference = _loss_and_grads(plain, batch)
    assert any(n.startswith("text_encoder.model.encoder.layer.1.") for n in reference[1])
    assert not any(n.startswith("text_encoder.model.encoder.layer.0.") for n in reference[1])
    _assert_same(reference, _loss_and_grads(ckpt, batch))


def test_checkpointing_survives_save_and_load(tmp_path):
    model = _tiny(gradient_checkpointing=True)
    model.save_pretrained(tmp_path / "m")
    loaded = mmtransfer.load(tmp_path / "m")
    assert loaded.config.gradient_checkpointing
    assert loaded.text_encoder.gradient_checkpointing and loaded.image_encoder.gradient_checkpointing
    loaded.set_gradient_checkpointing(False)
    assert not loaded.text_encoder.gradient_checkpointing and not loaded.config.gradient_checkpointing


def test_checkpointing_a_torchvision_resnet():
    image = ImageEncoderConfig(name="torchvision:resnet18", pretrained=False, image_size=32)
    plain = _tiny(image=image)
    plain.image_encoder.apply(lambda m: m.eval() if isinstance(m, torch.nn.BatchNorm2d) else None)  # no stats updates
    ckpt = copy.deepcopy(plain).set_gradient_checkpointing(True)
    ckpt.image_encoder.apply(lambda m: m.eval() if isinstance(m, torch.nn.BatchNorm2d) else None)
    batch = _batch(plain)
    _assert_same(_loss_and_grads(plain, batch), _loss_and_grads(ckpt, batch))


def test_the_recipe_key_reaches_built_and_loaded_models(tmp_path):
    """model.gradient_checkpointing=true in a caption recipe: on in the built model, and in one started from a folder."""
    from mmtransfer.assemble.captions import FinetuneConfig, build_model
    from mmtransfer.config import apply_overrides, from_dict

    data = apply_overrides({}, ["model.gradient_checkpointing=true"], FinetuneConfig)
    cfg = from_dict(FinetuneConfig, data)
    cfg.model = dataclasses.replace(get_preset("tiny-random"), gradient_checkpointing=True)
    assert build_model(cfg).image_encoder.gradient_checkpointing
    _tiny().save_pretrained(tmp_path / "saved")  # saved without it
    cfg = from_dict(FinetuneConfig, {**data, "init_from": str(tmp_path / "saved")})
    model = build_model(cfg)
    assert model.text_encoder.gradient_checkpointing and cfg.model.gradient_checkpointing


# ----------------------------------------------------------------------------- torch.compile


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_accelerator_state")
def test_compiled_training_runs_and_saves_plain_weights(tmp_path):
    """train.compile: a few steps of the caption task compile, give a finite loss, train the projections through
    the contrastive loss alone (compiling the whole task once returned a loss without a graph there), and save
    the usual weight names."""
    import json

    from safetensors.torch import load_file

    from mmtransfer.objectives.captions import CaptionObjectiveConfig, CaptionTask
    from mmtransfer.train import OptimConfig, TrainConfig, Trainer

    model = _tiny()
    before = {k: v.clone() for k, v in model.image_projection.state_dict().items()}
    task = CaptionTask(model, CaptionObjectiveConfig(itm_weight=0.0))
    batches = [_batch(model) | {"image_index": torch.arange(4)} for _ in range(2)]
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=3, batch_size=4, trackers=[], progress_bar=False,
                      log_every=1, compile=True)
    result = Trainer(task, batches, cfg, OptimConfig(warmup_steps=0), export=lambda t, d: t.model.save_pretrained(d)).fit()
    losses = [json.loads(line)["train/loss"] for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert model.text_encoder._compiled_call_impl is not None and model.image_encoder._compiled_call_impl is not None
    weights = load_file(str(result.run_dir / "checkpoints" / "checkpoint-3" / "model.safetensors"))
    assert "model.logit_scale" in weights and not any("_orig_mod" in n for n in weights)
    assert any(not torch.equal(weights[f"model.image_projection.{k}"], v) for k, v in before.items())
    assert mmtransfer.load(result.model_dir).config == model.config


# ----------------------------------------------------------------------------- accelerate config files and FSDP

CONFIGS = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_accelerate_config_files_read_as_accelerate_reads_them(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_processes == 2 and config.compute_environment.value == "LOCAL_MACHINE"
    if config.distributed_type.value == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2  # the loop gathers and loads state the FSDP2 way
        # Unset: the loop names the towers' blocks, whichever towers the recipe has.
        assert "fsdp_transformer_layer_cls_to_wrap" not in config.fsdp_config
    assert config.use_cpu == ("cpu" in path.name)


def test_fsdp1_and_l2sp_under_fsdp_are_refused(monkeypatch):
    from mmtransfer.distributed import LaunchError
    from mmtransfer.sharding import before_prepare, route_fsdp

    class Sharded:
        distributed_type = "FSDP"

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(LaunchError, match="fsdp_version: 2"):
        route_fsdp(Sharded())
    with pytest.raises(ValueError, match="optim.l2sp"):
        before_prepare(Sharded(), _tiny(), l2sp=0.1)


def test_fsdp_shards_the_towers_blocks_one_by_one():
    """The blocks FSDP wraps on its own when the config file names none: the towers' layers, a CNN stage's members."""
    from mmtransfer.sharding import before_prepare, tower_block_names

    class Sharded:
        distributed_type = "FSDP"

    model = _tiny()
    shell = before_prepare(Sharded(), model, l2sp=0.0)
    assert model._no_split_modules == ["BertLayer", "Block"]
    assert all(p.is_meta for p in shell.parameters()) and shell.config == model.config
    resnet = _tiny(image=ImageEncoderConfig(name="torchvision:resnet18", pretrained=False, image_size=32))
    assert tower_block_names(resnet) == ["BasicBlock", "BertLayer"]


def test_a_scalar_logit_scale_saved_before_still_loads(tmp_path):
    from safetensors.torch import load_file, save_file

    _tiny().save_pretrained(tmp_path / "m")
    weights = load_file(str(tmp_path / "m" / "model.safetensors"))
    save_file({**weights, "logit_scale": torch.tensor(3.0)}, str(tmp_path / "m" / "model.safetensors"))
    loaded = mmtransfer.load(tmp_path / "m")
    assert loaded.logit_scale.shape == (1,) and float(loaded.logit_scale.detach()) == 3.0
    assert loaded.get_logit_scale().shape == ()


def _accelerate(config: str | None, *args: str) -> subprocess.CompletedProcess:
    """finetune_captions.py under ``accelerate launch --config_file configs/accelerate/<config>``, or one plain process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_USE_CPU", None)
    runner = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
              f"configs/accelerate/{config}"] if config else [sys.executable]
    proc = subprocess.run([*runner, "scripts/finetune_captions.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"{config or 'one process'} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory) -> Path:
    """The caption folder template with the tiny-random towers, on a small folder of captioned shapes."""
    import yaml

    from mmtransfer.config import to_dict

    try:
        from own_data import shapes_caption_folder
    except ImportError:  # tests/ collected as a package
        from tests.own_data import shapes_caption_folder

    root = tmp_path_factory.mktemp("fsdp")
    photos = shapes_caption_folder(root / "photos")
    recipe = yaml.safe_load((ROOT / "configs" / "caption_folder_template.yaml").read_text())
    recipe["model"] = to_dict(get_preset("tiny-random"))
    recipe["data"].update(train={**recipe["data"]["train"], "name": str(photos / "train")},
                          validation={**recipe["data"]["validation"], "name": str(photos / "validation")},
                          features={"cache": True, "persist": False})
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return root / "recipe.yaml"


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "checkpoints" / f"checkpoint-{step}" / "model.safetensors"))


def _assert_same_weights(a: dict, b: dict, moved: str) -> None:
    assert a.keys() == b.keys() and any(moved in k for k in a)
    worst = max((float((a[k].double() - b[k].double()).abs().max()), k) for k in a if a[k].is_floating_point())
    assert worst[0] < 2e-5, f"largest difference: {worst}"


@pytest.mark.slow
def test_fsdp_on_two_cpu_processes_trains_resumes_and_exports(tiny_recipe, tmp_path):
    """FSDP2 over 2 CPU processes (gloo) with the tiny towers, gradient checkpointing on: the same weights as one
    process without either on the same global batch, checkpoints that resume under FSDP and without it, and an
    exported model that loads."""
    import json

    exact = ["objective.itm_weight=0", "model.fusion.num_layers=0", "freeze.image=false",
             "model.text.config_overrides={hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: "
             "128, max_position_embeddings: 64, hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0}"]
    common = ["--config", str(tiny_recipe), "train.max_steps=3", "train.save_every=2", "train.eval_every=2",
              "train.num_workers=0", "train.log_every=1", "optim.warmup_steps=0", *exact]
    fsdp, one = tmp_path / "fsdp", tmp_path / "one"
    proc = _accelerate("fsdp_cpu_2proc.yaml", *common, f"train.output_dir={fsdp}", "train.batch_size=8",
                       "model.gradient_checkpointing=true")
    assert proc.stdout.count("Run folder:") == 1
    summary = json.loads((fsdp / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 3 and summary["distributed_type"] == "FSDP"
    assert mmtransfer.load(fsdp / "model").config.gradient_checkpointing
    _accelerate(None, *common, f"train.output_dir={one}", "train.batch_size=16")
    _assert_same_weights(_weights(fsdp, 3), _weights(one, 3), "model.image_encoder.backbone.blocks.1.")
    model = mmtransfer.load(fsdp / "model")
    exported = {f"model.{k}": v for k, v in model.state_dict().items()}
    assert all(torch.equal(exported[k], v) for k, v in _weights(fsdp, 3).items() if k in exported)

    # Resumed from checkpoint-3: under FSDP, and in one process from a copy of the FSDP run folder.
    import shutil

    shutil.copytree(fsdp, tmp_path / "fsdp_then_one")
    more = ["train.resume=latest", "train.max_steps=5"]
    _accelerate("fsdp_cpu_2proc.yaml", *common, *more, f"train.output_dir={fsdp}", "train.batch_size=8",
                "model.gradient_checkpointing=true")
    _accelerate(None, *common, *more, f"train.output_dir={tmp_path / 'fsdp_then_one'}", "train.batch_size=16")
    _accelerate(None, *common, *more, f"train.output_dir={one}", "train.batch_size=16")
    _assert_same_weights(_weights(fsdp, 5), _weights(one, 5), "model.text_encoder.model.encoder.layer.1.")
    _assert_same_weights(_weights(tmp_path / "fsdp_then_one", 5), _weights(one, 5), "model.logit_scale")
