"""The training loop, the losses and exact resume, on tiny models and synthetic pairs."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import mmtransfer
from mmtransfer.losses import ContrastiveLoss, MatchingLoss, sample_hard_negatives
from mmtransfer.objectives.base import TaskOutput
from mmtransfer.objectives.captions import CaptionObjectiveConfig, CaptionTask, caption_groups
from mmtransfer.run_folder import list_checkpoints
from mmtransfer.schedules import dann_lambda, warmup_cosine
from mmtransfer.train import OptimConfig, TrainConfig, Trainer, parameter_groups

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 230, 20),
           "black": (0, 0, 0), "white": (255, 255, 255), "purple": (140, 20, 160), "orange": (250, 140, 0)}


# Each test starts with no Accelerate state left by the one before (conftest.py).
pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")


class ColourPairs(torch.utils.data.Dataset):
    """Solid-colour squares captioned with their colour: a pairing that can be learnt."""

    def __init__(self, n: int = 32, size: int = 32) -> None:
        g = torch.Generator().manual_seed(0)
        names = list(COLOURS)
        self.items = []
        for i in range(n):
            name = names[i % len(names)]
            rgb = torch.tensor(COLOURS[name], dtype=torch.float32) / 255
            pixels = rgb[:, None, None].expand(3, size, size) + 0.05 * torch.randn(3, size, size, generator=g)
            self.items.append((pixels, f"a {name} square"))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return i, *self.items[i]


class Collate:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, rows):
        idx, pixels, texts = zip(*rows)
        tok = self.tokenizer(list(texts), padding=True, return_tensors="pt")
        return {"pixel_values": torch.stack(pixels), "input_ids": tok["input_ids"],
                "attention_mask": tok["attention_mask"], "image_index": torch.tensor(idx)}


def _trainer(tmp_path, max_steps=6, log_every=1, **train_kw) -> Trainer:
    torch.manual_seed(0)
    model = mmtransfer.create_model("tiny-random")
    task = CaptionTask(model, CaptionObjectiveConfig(itm_weight=0.5))
    data = ColourPairs()
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True, collate_fn=Collate(model.tokenizer))
    # One image per colour, so every caption names exactly one image.
    eval_loader = torch.utils.data.DataLoader(ColourPairs(n=8), batch_size=4, collate_fn=Collate(model.tokenizer))
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=max_steps, batch_size=8, trackers=[],
                      progress_bar=False, log_every=log_every, **train_kw)

    def evaluate(task, accelerator, loaders):
        return task.evaluate_retrieval(accelerator, loaders["eval"], loaders["eval"])

    return Trainer(task, loader, cfg, OptimConfig(lr=3e-3, warmup_steps=2), evaluate=evaluate,
                   eval_loaders={"eval": eval_loader}, export=lambda t, d: t.model.save_pretrained(d))


# ----------------------------------------------------------------------------- losses


def test_contrastive_loss_is_clip_loss_without_groups():
    torch.manual_seed(0)
    a, b = F.normalize(torch.randn(6, 8), dim=-1), F.normalize(torch.randn(6, 8), dim=-1)
    scale = torch.tensor(7.0)
    out = ContrastiveLoss()(a, b, scale)
    logits = scale * a @ b.T
    expected = (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.T, torch.arange(6))) / 2
    torch.testing.assert_close(out.loss, expected)


def test_contrastive_duplicates_share_the_target():
    """Pairs in one group split the target evenly instead of being pushed apart."""
    torch.manual_seed(0)
    images, texts = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    groups = torch.tensor([0, 0, 1, 2])
    out = ContrastiveLoss()(images, texts, torch.tensor(5.0), groups)
    target = torch.tensor([[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    logits = 5.0 * images @ texts.T
    expected = (-(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.T.log_softmax(1)).sum(1).mean()) / 2
    torch.testing.assert_close(out.loss, expected)


def test_hard_negatives_never_pick_own_group():
    sim = torch.randn(6, 6) * 5
    groups = torch.tensor([0, 0, 1, 1, 2, 3])
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        neg = sample_hard_negatives(sim, groups, g)
        assert (groups[neg] != groups).all()


def test_hard_negatives_follow_similarity():
    sim = torch.tensor([[0.0, 10.0, -10.0], [10.0, 0.0, -10.0], [10.0, -10.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    picks = torch.stack([sample_hard_negatives(sim, None, g) for _ in range(200)])
    assert (picks[:, 0] == 1).float().mean() > 0.95


def test_hard_negatives_of_a_row_without_negatives_are_uniform():
    """A batch of one caption group has no negatives: every column is drawn alike, none is NaN."""
    g = torch.Generator().manual_seed(0)
    picks = torch.cat([sample_hard_negatives(torch.randn(4, 4), torch.zeros(4, dtype=torch.long), g) for _ in range(100)])
    assert torch.bincount(picks, minlength=4).min() > 60  # 400 draws over 4 columns


def test_matching_loss_shapes(tiny_model):
    tok = tiny_model.tokenize(["a", "b c", "d e f"])
    img = tiny_model.image_features(torch.randn(3, 3, 32, 32))
    txt = tiny_model.text_features(tok)
    out = MatchingLoss()(tiny_model.fusion, img.tokens, txt.tokens, txt.attention_mask, torch.randn(3, 3))
    assert out.loss.ndim == 0 and 0 <= float(out.accuracy) <= 1


def test_caption_groups_identify_equal_captions(tiny_model):
    tok = tiny_model.tokenize(["a cat", "a dog", "a cat", "a cat sat"])
    g = caption_groups(tok["input_ids"], tok["attention_mask"])
    assert g[0] == g[2] and len({int(x) for x in g}) == 3


def test_schedules_are_pure_functions():
    assert warmup_cosine(0, 100, 10) == 0.0
    assert warmup_cosine(5, 100, 10) == 0.5
    assert warmup_cosine(10, 100, 10) == 1.0
    assert warmup_cosine(55, 100, 10) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 10, min_ratio=0.1) == pytest.approx(0.1)
    assert dann_lambda(0.0) == 0.0 and dann_lambda(0.5) == pytest.approx(2 / (1 + math.exp(-5)) - 1)


def test_parameter_groups_split_towers_and_decay(tiny_model):
    import copy

    model = copy.deepcopy(tiny_model)
    model.text_encoder.config.pretrained = True  # pretend the text tower is pretrained
    groups = {g["name"]: g for g in parameter_groups(CaptionTask(model, CaptionObjectiveConfig()), OptimConfig(lr=1e-3, tower_lr=1e-5))}
    assert groups["tower"]["lr"] == 1e-5 and groups["new"]["lr"] == 1e-3
    no_decay = {id(p) for p in groups["new/no_decay"]["params"]}
    assert id(model.logit_scale) in no_decay and groups["new/no_decay"]["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in groups["new"]["params"])


# ----------------------------------------------------------------------------- the loop


def test_training_learns_and_writes_the_run_folder(tmp_path):
    result = _trainer(tmp_path, max_steps=40).fit()
    run = result.run_dir
    assert {"config.yaml", "metrics.jsonl", "summary.json", "curves.png", "model", "checkpoints"} <= {p.name for p in run.iterdir()}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert losses[-1] < losses[0] * 0.7, losses
    assert result.metrics["eval/i2t_R@1"] >= 50.0, result.metrics  # 8 colours: chance is 12.5%
    assert result.metrics["eval/t2i_R@1"] >= 50.0, result.metrics
    loaded = mmtransfer.load(str(result.model_dir))
    assert loaded.encode_text(["a red square"]).shape == (1, 32)


def test_resume_ends_with_identical_weights(tmp_path):
    straight = _trainer(tmp_path / "a", max_steps=6).fit()
    # A run that saved at step 3; resuming from that checkpoint is what a run stopped after step 3 does.
    first = _trainer(tmp_path / "b", max_steps=6, save_every=3, keep_last=5).fit()
    middle = first.run_dir / "checkpoints" / "checkpoint-3"
    resumed = _trainer(tmp_path / "c", max_steps=6, resume=str(middle)).fit()
    assert resumed.step == 6
    from safetensors.torch import load_file

    a = load_file(str(straight.model_dir / "model.safetensors"))
    b = load_file(str(resumed.model_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_keep_last_checkpoints_and_atomic_names(tmp_path):
    result = _trainer(tmp_path, max_steps=6, save_every=2, keep_last=2).fit()
    names = [p.name for p in list_checkpoints(result.run_dir)]
    assert names == ["checkpoint-4", "checkpoint-6"]
    assert not list((result.run_dir / "checkpoints").glob(".tmp-*"))


def test_grad_accumulation_and_bf16_autocast_on_cpu(tmp_path):
    result = _trainer(tmp_path, max_steps=2, grad_accum_steps=2, mixed_precision="bf16").fit()
    assert result.step == 2 and math.isfinite(result.metrics["eval/t2i_R@1"])


def test_a_non_finite_loss_stops_the_run_naming_its_step(tmp_path):
    """The loss is read at log steps, not every step; a NaN is still reported at the step it appeared, before the
    next evaluation or checkpoint, and nothing after it is saved or exported."""
    trainer = _trainer(tmp_path, max_steps=8, log_every=5, save_every=2)
    objective = trainer.task.objective
    forward = objective.forward

    def nan_from_step_3(model, batch, info):
        out = forward(model, batch, info)
        return TaskOutput(out.loss * float("nan"), out.metrics) if info.step >= 3 else out

    objective.forward = nan_from_step_3
    with pytest.raises(FloatingPointError, match=r"The loss became nan at step 3\. Lower optim.lr"):
        trainer.fit()
    run = tmp_path / "run"
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-2"]  # the check before step 4's checkpoint stopped it
    assert not (run / "model").exists()
    assert not (run / "metrics.jsonl").exists() or "NaN" not in (run / "metrics.jsonl").read_text()


def test_the_loop_reads_no_tensor_between_log_steps(tmp_path, monkeypatch):
    """On a GPU, reading a tensor (float(), .item(), bool()) waits for every queued kernel. mmtransfer's own code
    reads the same number of tensors in a 2-step and a 6-step run that log once: none per step."""
    import sys

    reads: list[tuple[str, int]] = []
    for name in ("__float__", "__bool__", "__int__", "item", "tolist"):
        def counted(self, *args, _original=getattr(torch.Tensor, name), **kwargs):
            caller = sys._getframe(1)
            if caller.f_globals.get("__name__", "").startswith("mmtransfer"):
                reads.append((caller.f_globals["__name__"], caller.f_lineno))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    counts = {}
    for steps in (2, 6):
        reads.clear()
        _trainer(tmp_path / str(steps), max_steps=steps, log_every=steps).fit()
        counts[steps] = sorted(reads)
    assert counts[2] and counts[6] == counts[2]


def test_resume_from_missing_folder_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _trainer(tmp_path, resume=str(tmp_path / "nope")).fit()


# ----------------------------------------------------------------------------- two processes


def _two_process_worker(rank: int, images: torch.Tensor, texts: torch.Tensor, groups, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=2)
    B = images.shape[0] // 2
    a = images[rank * B:(rank + 1) * B].clone().requires_grad_(True)
    b = texts[rank * B:(rank + 1) * B].clone().requires_grad_(True)
    g = None if groups is None else groups[rank * B:(rank + 1) * B]
    out = ContrastiveLoss()(a, b, torch.tensor(10.0), g)
    out.loss.backward()
    torch.save({"loss": out.loss.detach(), "ga": a.grad, "gb": b.grad}, os.path.join(out_dir, f"{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _window_worker(rank: int, out_dir: str) -> None:
    import torch.distributed as dist

    from mmtransfer.distributed import MetricWindow

    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=2)
    window = MetricWindow(first_step=10, micro_batches=2, device="cpu")
    for i, loss in enumerate([1.0, 2.0, 3.0, 4.0] if rank == 0 else [3.0, 4.0, 5.0, 6.0]):
        window.add("train/loss", torch.tensor(loss))
        if rank == 1:
            window.add("train/only_rank1", torch.tensor([float(i), float(i)]))  # a key only one process reports
    result = {"means": window.means()}
    if rank == 1:
        window.values["train/loss"][3] = torch.tensor(float("nan"))  # a NaN on one process, at its 4th micro-batch
    try:
        window.means()
    except FloatingPointError as err:
        result["error"] = str(err)
    torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_metric_window_means_over_processes_and_a_nan_on_one_stops_all(tmp_path):
    """2 gloo processes: each metric is the mean over every value that exists; a NaN on one process is found on
    both, at its step (micro-batch 3 of 2 per step from step 10: step 11)."""
    import torch.multiprocessing as mp

    mp.spawn(_window_worker, args=(str(tmp_path),), nprocs=2, join=True)
    for rank in range(2):
        result = torch.load(tmp_path / f"{rank}.pt")
        assert result["means"] == pytest.approx({"train/loss": 3.5, "train/only_rank1": 1.5})
        assert result["error"].startswith("The loss became nan at step 11.")


@pytest.mark.parametrize("with_groups", [False, True])
def test_two_process_contrastive_equals_single_process(tmp_path, with_groups):
    """Loss on 2 gloo processes (mean over ranks) equals the 1-process loss on the global batch; so do gradients."""
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    images = F.normalize(torch.randn(8, 16), dim=-1)
    texts = F.normalize(torch.randn(8, 16), dim=-1)
    groups = torch.tensor([0, 1, 2, 0, 3, 4, 1, 5]) if with_groups else None
    mp.spawn(_two_process_worker, args=(images, texts, groups, str(tmp_path)), nprocs=2, join=True)
    parts = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]

    a, b = images.clone().requires_grad_(True), texts.clone().requires_grad_(True)
    ref = ContrastiveLoss()(a, b, torch.tensor(10.0), groups)
    ref.loss.backward()
    torch.testing.assert_close((parts[0]["loss"] + parts[1]["loss"]) / 2, ref.loss.detach())
    # Each rank's gradient covers every rank's loss; DDP divides by the world size.
    torch.testing.assert_close(torch.cat([p["ga"] for p in parts]) / 2, a.grad)
    torch.testing.assert_close(torch.cat([p["gb"] for p in parts]) / 2, b.grad)


def test_rerank_recall_uses_the_pair_scorer():
    from mmtransfer.evaluate import rerank_recall_at_k

    torch.manual_seed(0)
    sims = torch.randn(6, 6)
    owner = torch.arange(6)
    # A perfect matcher lifts every query whose answer is in the top k to rank 1.
    perfect = lambda i, t: (owner[t] == i).float()  # noqa: E731
    out = rerank_recall_at_k(sims, owner, perfect, k=6, ks=(1, 5))
    assert out["i2t_R@1"] == 100.0 and out["t2i_R@1"] == 100.0
    # A scorer that repeats the similarities changes nothing.
    same = rerank_recall_at_k(sims, owner, lambda i, t: sims[i, t], k=6, ks=(1, 5))
    base_i2t = 100.0 * float((sims.argmax(1) == owner).float().mean())
    assert same["i2t_R@1"] == base_i2t


def test_label_positives_group_images_of_a_class_captioned_differently(tiny_model):
    from mmtransfer.objectives.captions import CaptionObjective, CaptionObjectiveConfig

    texts = ["seven", "the digit 7", "eight", "seven"]
    tok = tiny_model.tokenize(texts)
    batch = {**tok, "labels": torch.tensor([7, 7, 8, 7])}
    by_caption = CaptionObjective(CaptionObjectiveConfig(), use_itm=False).positive_groups(batch)
    by_label = CaptionObjective(CaptionObjectiveConfig(positives="label"), use_itm=False).positive_groups(batch)
    assert by_caption[0] == by_caption[3] and by_caption[0] != by_caption[1]
    assert torch.equal(by_label, batch["labels"])
    with pytest.raises(ValueError, match="positives=label"):
        CaptionObjective(CaptionObjectiveConfig(positives="label"), use_itm=False).positive_groups(tok)
    # Templated captions bring the group of the caption they were made from.
    templated = {**tok, "caption_group": torch.tensor([3, 3, 4, 3])}
    assert CaptionObjective(CaptionObjectiveConfig(), use_itm=False).positive_groups(templated).tolist() == [3, 3, 4, 3]


def test_the_loop_never_changes_its_config(tmp_path):
    """A fast dev run trains two steps on a copy of the settings; the caller's config stays as written."""
    from mmtransfer.train import TrainConfig, loop_settings

    result = _trainer(tmp_path, max_steps=6, save_every=3, fast_dev_run=True).fit()
    assert result.step == 2 and not list_checkpoints(result.run_dir)
    cfg = TrainConfig(max_steps=6, save_every=3, trackers=["tensorboard"], fast_dev_run=True)
    run = loop_settings(cfg)
    assert (run.max_steps, run.save_every, run.trackers) == (2, 0, [])
    assert (cfg.max_steps, cfg.save_every, cfg.trackers) == (6, 3, ["tensorboard"])
