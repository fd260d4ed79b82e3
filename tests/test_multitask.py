"""Multi-task training: loss weighting (analytic gradients), mixed batches, the task, exact resume, the script."""

from __future__ import annotations

import json

import pytest
import torch

import mmtransfer
from mmtransfer.config import ConfigError
from mmtransfer.data.mixed import CachedImageBatches, MixedBatchSampler, batch_shares, mixed_loader
from mmtransfer.features import CachedCaptionCollator, CachedFeatures
from mmtransfer.objectives.base import StepInfo
from mmtransfer.objectives.captions import CaptionObjective, CaptionObjectiveConfig
from mmtransfer.objectives.multitask import LabelObjective, MultiTask
from mmtransfer.objectives.weighting import FixedWeighting, UncertaintyWeighting
from mmtransfer.train import OptimConfig, TrainConfig, Trainer
from mmtransfer.transfer import LinearHead, load_classifier, save_label_head

# Each test starts with no Accelerate state left by the one before (conftest.py).
pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")


# ----------------------------------------------------------------------------- uncertainty weighting


def _toy_losses(theta: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Two quadratic losses of theta and their analytic gradients."""
    a = torch.tensor([1.0, -2.0, 0.5], dtype=theta.dtype)
    A = torch.tensor([[2.0, 0.0, 1.0], [0.0, -1.0, 3.0]], dtype=theta.dtype)
    b = torch.tensor([0.3, -0.7], dtype=theta.dtype)
    losses = {"captions": ((theta - a) ** 2).sum(), "labels": ((A @ theta - b) ** 2).sum()}
    with torch.no_grad():
        grads = {"captions": 2 * (theta - a), "labels": 2 * A.T @ (A @ theta - b)}
    return losses, grads


def test_uncertainty_weighting_gradients_match_the_analytic_ones():
    """L = sum_k exp(-s_k) w_k L_k + s_k: dL/ds_k = 1 - exp(-s_k) w_k L_k, dL/dtheta = sum_k exp(-s_k) w_k dL_k/dtheta."""
    weights = {"captions": 1.0, "labels": 0.5}
    uw = UncertaintyWeighting(["captions", "labels"], weights, init=0.0)
    with torch.no_grad():
        uw.log_vars.copy_(torch.tensor([0.3, -1.2]))
    theta = torch.tensor([0.2, 0.4, -0.1], requires_grad=True)
    losses, grads = _toy_losses(theta)
    out = uw(losses)
    out.loss.backward()

    s = uw.log_vars.detach()
    L = torch.stack([losses["captions"].detach(), losses["labels"].detach()])
    w = torch.tensor([1.0, 0.5])
    expected_loss = (torch.exp(-s) * w * L + s).sum()
    torch.testing.assert_close(out.loss.detach(), expected_loss)
    torch.testing.assert_close(uw.log_vars.grad, 1 - torch.exp(-s) * w * L)
    expected_theta = torch.exp(-s[0]) * w[0] * grads["captions"] + torch.exp(-s[1]) * w[1] * grads["labels"]
    torch.testing.assert_close(theta.grad, expected_theta)
    # The reported weights are exp(-s_k) w_k and the reported s_k are the parameters.
    torch.testing.assert_close(torch.stack([out.weights["captions"], out.weights["labels"]]), torch.exp(-s) * w)
    torch.testing.assert_close(torch.stack([out.log_vars["captions"], out.log_vars["labels"]]), s)


def test_uncertainty_weighting_gradients_by_finite_differences():
    """Autograd through the module agrees with finite differences in s_k and theta (float64)."""
    from torch.func import functional_call

    torch.manual_seed(0)
    uw = UncertaintyWeighting(["captions", "labels"], {"captions": 2.0, "labels": 0.3})

    def total(log_vars: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        losses, _ = _toy_losses(theta)
        return functional_call(uw, {"log_vars": log_vars}, (losses,)).loss

    log_vars = torch.randn(2, dtype=torch.float64, requires_grad=True)
    theta = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(total, (log_vars, theta))


def test_uncertainty_weighting_settles_at_the_log_of_each_loss():
    """For fixed losses the log-variances go to s_k = log(w_k L_k), where their gradient is zero."""
    uw = UncertaintyWeighting(["captions", "labels"], {"captions": 1.0, "labels": 2.0})
    losses = {"captions": torch.tensor(0.5), "labels": torch.tensor(4.0)}
    opt = torch.optim.Adam(uw.parameters(), lr=0.05)
    for _ in range(1500):
        opt.zero_grad()
        uw(losses).loss.backward()
        opt.step()
    torch.testing.assert_close(uw.log_vars.detach(), torch.log(torch.tensor([0.5, 8.0])), atol=1e-3, rtol=0)


def test_uncertainty_weighting_skips_absent_tasks_and_rejects_unknown_ones():
    uw = UncertaintyWeighting(["captions", "labels"])
    out = uw({"labels": torch.tensor(2.0, requires_grad=True)})
    out.loss.backward()
    assert set(out.weights) == {"labels"} and uw.log_vars.grad[0] == 0
    with pytest.raises(KeyError, match="domain"):
        uw({"domain": torch.tensor(1.0)})


def test_fixed_weighting_is_the_weighted_sum():
    out = FixedWeighting({"captions": 1.0, "labels": 0.25})({"captions": torch.tensor(2.0), "labels": torch.tensor(4.0)})
    assert float(out.loss) == 3.0 and float(out.weights["labels"]) == 0.25 and out.log_vars == {}


# ----------------------------------------------------------------------------- mixing data sets


def test_batch_shares_split_the_batch_by_ratio():
    assert batch_shares(64, {"captions": 1.0, "labels": 1.0}) == {"captions": 32, "labels": 32}
    assert batch_shares(64, {"captions": 3.0, "labels": 1.0}) == {"captions": 48, "labels": 16}
    assert batch_shares(10, {"a": 1.0, "b": 1.0, "c": 1.0}) == {"a": 4, "b": 3, "c": 3}
    assert sum(batch_shares(7, {"a": 100.0, "b": 1.0}).values()) == 7
    with pytest.raises(ConfigError, match="positive"):
        batch_shares(8, {"a": 0.0, "b": 1.0})


def test_mixed_batches_hold_every_task_and_are_a_function_of_seed_and_epoch():
    sampler = MixedBatchSampler({"captions": 50, "labels": 20}, {"captions": 6, "labels": 2}, seed=3)
    assert len(sampler) == 10 and sampler.batch_size == 8
    batches = list(sampler)
    assert len(batches) == 10
    for b in batches:
        assert [t for t, _, _ in b].count("captions") == 6 and [t for t, _, _ in b].count("labels") == 2
    # The task that needs the most steps (labels: 20 rows, 2 a step) sees each row once an epoch;
    # the other (captions: 8 full batches of 6) starts a new, reshuffled pass after 8 steps.
    label_rows = [p for b in batches for t, p, _ in b if t == "labels"]
    assert sorted(label_rows) == list(range(20))
    caption_rows = [p for b in batches for t, p, _ in b if t == "captions"]
    assert len(set(caption_rows[:48])) == 48 and caption_rows[48:] != caption_rows[:12]
    again = MixedBatchSampler({"captions": 50, "labels": 20}, {"captions": 6, "labels": 2}, seed=3)
    assert list(again) == batches
    again.set_epoch(1)
    assert list(again) != batches
    with pytest.raises(ConfigError, match="fewer than its 6 per step"):
        MixedBatchSampler({"captions": 5, "labels": 20}, {"captions": 6, "labels": 2})


def test_draws_choose_copies_and_captions():
    a = CachedFeatures(pooled=torch.zeros(4, 3))
    b = CachedFeatures(pooled=torch.ones(4, 3))
    images = CachedImageBatches([a, b], labels=torch.tensor([5, 6, 7, 8]))
    batch = images([(0, 0), (1, 1), (2, 3)])
    assert batch["image_pooled"][:, 0].tolist() == [0.0, 1.0, 1.0] and batch["labels"].tolist() == [5, 6, 7]
    assert images([0, 1])["image_pooled"].sum() == 0  # plain positions read the plain copy

    class Tok:
        def __call__(self, texts, **kw):
            self.texts = list(texts)
            n = len(texts)
            return {"input_ids": torch.ones(n, 2, dtype=torch.long), "attention_mask": torch.ones(n, 2, dtype=torch.long)}

    tok = Tok()
    captions = CachedCaptionCollator([a, b], [["x", "y", "z"]] * 4, tokenizer=tok, train=True)
    batch = captions([(0, 0), (1, 1), (2, 2), (3, 5)])  # copy = draw % 2, caption = (draw // 2) % 3
    assert batch["image_pooled"][:, 0].tolist() == [0.0, 1.0, 0.0, 1.0]
    assert tok.texts == ["x", "x", "y", "z"]
    # With 2 templates each caption has 6 forms, caption-major: form = (draw // 2) % 6.
    templated = CachedCaptionCollator([a, b], [["x", "y", "z"]] * 4, tokenizer=tok, train=True, templates=["{}", "a {}"])
    batch = templated([(0, 0), (1, 2), (2, 8), (3, 11)])
    assert tok.texts == ["x", "a x", "z", "a z"]
    groups = batch["caption_group"].tolist()
    assert groups[0] == groups[1] and groups[2] == groups[3] and groups[0] != groups[2]


# ----------------------------------------------------------------------------- the task, on a tiny model


COLOURS = ["red", "green", "blue", "yellow", "black", "white", "purple", "orange"]


def _tiny_task(weighting: str = "uncertainty", seed: int = 0):
    """A tiny random model with cached image features: 32 captioned and 32 labelled images (8 colours)."""
    torch.manual_seed(seed)
    model = mmtransfer.create_model("tiny-random")
    model.freeze("both")  # as the recipe: frozen towers (the tiny BERT's unused pooler would otherwise train)
    Di = model.image_encoder.width
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(8, Di, generator=g)
    labels = torch.arange(32) % 8
    copies = [CachedFeatures(pooled=centres[labels] + 0.1 * torch.randn(32, Di, generator=g)) for _ in range(2)]
    captions = [[f"a {COLOURS[y]} square", f"{COLOURS[y]}"] for y in labels.tolist()]
    caption_collate = CachedCaptionCollator(copies, captions, tokenizer=model.tokenizer, max_length=16, train=True)
    label_collate = CachedImageBatches(copies, labels)
    head = LinearHead.random(8, model.config.embed_dim, seed=0)
    names = ["captions", "labels"]
    weights = {"captions": 1.0, "labels": 1.0}
    combine = UncertaintyWeighting(names, weights) if weighting == "uncertainty" else FixedWeighting(weights)
    task = MultiTask(model, CaptionObjective(CaptionObjectiveConfig(itm_weight=0), use_itm=False), LabelObjective(head), None, combine)
    model.fusion.requires_grad_(False)
    loader = mixed_loader({"captions": list(range(32)), "labels": list(range(32))},
                          {"captions": caption_collate, "labels": label_collate},
                          {"captions": 6, "labels": 2}, seed=seed, read_rows={"captions": False, "labels": False})
    return task, loader


def test_every_trainable_parameter_gets_a_gradient_each_step():
    """One backward per step reaches every trainable parameter (DDP without find_unused_parameters)."""
    task, loader = _tiny_task()
    batch = next(iter(loader))
    assert set(batch) == {"captions", "labels"} and batch["captions"]["image_pooled"].shape[0] == 6
    out = task(batch, StepInfo(0, 10))
    out.loss.backward()
    missing = [n for n, p in task.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    assert {"captions/contrastive", "captions/loss", "labels/ce", "labels/acc", "weight/captions", "weight/labels",
            "log_var/captions", "log_var/labels"} <= set(out.metrics)


def _fit(tmp_path, name, weighting="uncertainty", **train_kw):
    task, loader = _tiny_task(weighting)
    cfg = TrainConfig(output_dir=str(tmp_path / name), max_steps=6, batch_size=8, trackers=[], progress_bar=False,
                      log_every=1, **train_kw)

    def export(t, folder):
        t.model.save_pretrained(folder)
        save_label_head(t.labels.head, COLOURS, folder)

    return Trainer(task, loader, cfg, OptimConfig(lr=3e-2, warmup_steps=1), export=export).fit()


def test_multitask_resume_ends_with_identical_weights_and_log_variances(tmp_path):
    """Model, head and the s_k after a resume from step 3 equal those of an uninterrupted run (4 batches an epoch)."""
    from safetensors.torch import load_file

    straight = _fit(tmp_path, "a")
    first = _fit(tmp_path, "b", save_every=3, keep_last=5)
    resumed = _fit(tmp_path, "c", resume=str(first.run_dir / "checkpoints" / "checkpoint-3"))
    a = load_file(str(straight.run_dir / "checkpoints" / "checkpoint-6" / "model.safetensors"))
    b = load_file(str(resumed.run_dir / "checkpoints" / "checkpoint-6" / "model.safetensors"))
    assert "weighting.log_vars" in a and "labels.head.weight" in a
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["weighting.log_vars"], torch.zeros(2))  # the s_k trained
    records = [json.loads(line) for line in (straight.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all("train/log_var/labels" in r and "train/weight/captions" in r for r in records if "train/loss" in r)


def test_exported_label_head_loads_as_a_classifier(tmp_path):
    result = _fit(tmp_path, "run", weighting="fixed")
    clf = load_classifier(result.model_dir)
    assert clf.class_names == COLOURS
    assert clf(torch.zeros(2, 3, 32, 32)).shape == (2, 8)
    with pytest.raises(FileNotFoundError, match="tasks.labels.enabled=true"):
        load_classifier(tmp_path / "nowhere")


# ----------------------------------------------------------------------------- the script


def test_help_lists_the_task_keys(run_script):
    out = run_script("scripts/finetune_captions.py", "--help").stdout
    for key in ("tasks.weighting", "tasks.labels.share", "tasks.labels.head_init", "tasks.domain.method", "tasks.zero_shot"):
        assert key in out, key


def test_no_source_task_is_one_clear_line(tmp_path, run_script):
    proc = run_script("scripts/finetune_captions.py", "--config", "configs/multitask_openmoji.yaml", "tasks.captions.enabled=false",
                      "tasks.labels.enabled=false", f"train.output_dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2
    assert "Enable tasks.captions or tasks.labels" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_fast_dev_run_of_the_multitask_recipe(tmp_path, run_script):
    run = tmp_path / "run"
    out = run_script("scripts/finetune_captions.py", "--config", "configs/multitask_openmoji.yaml", "--fast-dev-run",
                     "tasks.weighting=uncertainty", f"train.output_dir={run}",
                     f"data.features.folder={tmp_path / 'features'}").stdout
    assert "Multi-task run: captions, labels" in out and "learned log-variances" in out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["tasks"] == ["captions", "labels"]
    assert {"captions/i2t_R@1", "labels/top1", "labels/names_top1", "zero_shot/top1"} <= set(summary["test_metrics"])
    assert set(summary["final_log_vars"]) == {"captions", "labels"}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("train/captions/contrastive" in r and "train/labels/ce" in r for r in records)
    assert any("val/labels/top1" in r for r in records)
    assert load_classifier(run / "model").predict
    assert f"Image.open({str(run / 'example.png')!r})" in out and (run / "example.png").is_file()


def test_caption_folder_and_labelled_folder_with_a_trainable_image_tower(tmp_path, tiny_model):
    """Two data sets of different kinds (captions in metadata.jsonl, labels from class sub-folders), read as
    images every step (the image tower trains, so nothing is cached), mixed 2:1, uncertainty weights."""
    from data_helpers import save_image, write_jsonl

    from mmtransfer.assemble.captions import MultitaskConfig
    from mmtransfer.config import load_config
    from mmtransfer.recipes.multitask import run

    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 230, 20)}
    rows = []
    for i in range(16):
        name = list(colours)[i % 4]
        save_image(tmp_path / "captions" / f"{i}.png", color=colours[name], size=(32, 32))
        save_image(tmp_path / "labels" / name / f"{i}.png", color=colours[name], size=(32, 32))
        rows.append({"file_name": f"{i}.png", "text": f"a {name} square"})
    write_jsonl(tmp_path / "captions" / "metadata.jsonl", rows)
    tiny_model.save_pretrained(tmp_path / "tiny")
    caps, labs = str(tmp_path / "captions"), str(tmp_path / "labels")
    cfg = load_config(MultitaskConfig, None, [
        f"init_from={tmp_path / 'tiny'}", "freeze.text=true", "freeze.image=false", "objective.itm_weight=0",
        f"data.train.name={caps}", f"data.validation.name={caps}", "data.test=null",
        "tasks.captions.share=2", "tasks.labels.enabled=true", f"tasks.labels.train.name={labs}",
        f"tasks.labels.validation.name={labs}", f"tasks.labels.test.name={labs}", "tasks.weighting=uncertainty",
        f"tasks.zero_shot.name={labs}", "train.max_steps=3", "train.batch_size=6", "train.trackers=[]",
        "train.progress_bar=false", f"train.output_dir={tmp_path / 'run'}", f"data.features.folder={tmp_path / 'features'}",
    ])
    summary = run(cfg)
    assert summary["batch_shares"] == {"captions": 4, "labels": 2}
    assert summary["steps"] == 3 and summary["tasks"] == ["captions", "labels"]
    assert {"labels/top1", "labels/names_top1", "zero_shot/top1"} <= set(summary["test"])
    assert {"val/captions/i2t_R@1", "val/labels/top1"} <= set(summary["validation"])
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert written["feature_cache"] is False and set(written["final_log_vars"]) == {"captions", "labels"}
    assert load_classifier(tmp_path / "run" / "model").class_names == sorted(colours)


@pytest.mark.parametrize("override, message", [
    ("tasks.domain.method.weight=2", "Unknown config key 'weight' in 'tasks.domain.method'"),
    ("tasks.domain.method.discriminator.hidden=8", "Did you mean 'hidden_dim'?"),
    ("tasks.domain.method.name=cdan", "'tasks.domain.method.name' must be one of ['dann', 'mmd', 'coral']"),
])
def test_domain_method_keys_are_typed(override, message):
    """tasks.domain.method is a dataclass: a misspelt or inapplicable key fails as the config loads."""
    from mmtransfer.assemble.captions import MultitaskConfig
    from mmtransfer.config import load_config

    with pytest.raises(ConfigError) as err:
        load_config(MultitaskConfig, "configs/multitask_openmoji_noto_dann.yaml", [override])
    assert message in str(err.value)
