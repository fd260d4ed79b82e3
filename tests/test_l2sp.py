"""L2-SP (optim.l2sp): the penalty's value, what it acts on, its effect, and exact resume, on tiny random towers."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

import mmtransfer
from mmtransfer.losses.l2sp import L2SP
from mmtransfer.objectives.captions import CaptionObjectiveConfig, CaptionTask
from mmtransfer.run_folder import list_checkpoints
from mmtransfer.train import OptimConfig, TrainConfig, Trainer, parameter_groups

try:
    from test_train import Collate, ColourPairs
except ImportError:  # tests/ collected as a package
    from tests.test_train import Collate, ColourPairs

pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")

TOWERS = ("model.text_encoder.", "model.image_encoder.")


def _task() -> CaptionTask:
    """The tiny random model posing as pretrained: text tower trainable, image tower frozen but its last block."""
    torch.manual_seed(0)
    model = mmtransfer.create_model("tiny-random")
    model.text_encoder.config.pretrained = True
    model.image_encoder.config.pretrained = True
    model.freeze("image", keep_last_blocks=1)
    return CaptionTask(model, CaptionObjectiveConfig(itm_weight=0.5))


def _trainer(run_dir, l2sp: float, max_steps: int = 6, **train_kw) -> Trainer:
    task = _task()
    loader = torch.utils.data.DataLoader(ColourPairs(), batch_size=8, shuffle=True, collate_fn=Collate(task.model.tokenizer))
    cfg = TrainConfig(output_dir=str(run_dir), max_steps=max_steps, batch_size=8, trackers=[], progress_bar=False,
                      log_every=1, **train_kw)
    return Trainer(task, loader, cfg, OptimConfig(lr=3e-3, tower_lr=3e-3, warmup_steps=0, l2sp=l2sp))


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(run_dir, step: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "checkpoints" / f"checkpoint-{step}" / "model.safetensors"))


def _trainable_tower_names(task) -> set[str]:
    return {n for n, p in task.named_parameters() if p.requires_grad and n.startswith(TOWERS)}


def _penalty(alpha: float, weights: dict[str, torch.Tensor], start: dict[str, torch.Tensor], names) -> float:
    return 0.5 * alpha * sum(float(((weights[n].double() - start[n].double()) ** 2).sum()) for n in names)


def test_penalty_acts_on_trainable_tower_parameters_only():
    task = _task()
    l2sp = L2SP(task, alpha=0.3)
    assert set(l2sp.names) == _trainable_tower_names(task)
    assert any(n.startswith("model.image_encoder.") for n in l2sp.names)
    frozen = {n for n, p in task.named_parameters() if not p.requires_grad}
    assert frozen and not frozen & set(l2sp.names)
    assert float(l2sp.penalty().detach()) == 0.0
    # Move every parameter: only trainable tower parameters get a gradient, alpha * (w - w0).
    with torch.no_grad():
        for p in task.parameters():
            p.add_(0.01 * torch.randn_like(p))
    penalty = l2sp.penalty()
    assert penalty.dtype == torch.float32 and float(penalty.detach()) > 0
    penalty.backward()
    start = dict(zip(l2sp.names, l2sp.anchors))
    for name, p in task.named_parameters():
        if name in start:
            torch.testing.assert_close(p.grad, 0.3 * (p.detach() - start[name]))
        else:
            assert p.grad is None, name  # projections, fusion, heads, temperature, frozen tower weights
    # Off: nothing copied, nothing added.
    off, metrics = L2SP(task, alpha=0.0), {}
    assert not off and off.add_to(torch.tensor(1.0), metrics) == 1.0 and not metrics


def test_l2sp_replaces_weight_decay_for_towers_only():
    task = _task()
    groups = {g["name"]: g for g in parameter_groups(task, OptimConfig(weight_decay=0.05, l2sp=0.1))}
    assert groups["tower"]["weight_decay"] == 0.0 and groups["new"]["weight_decay"] == 0.05
    plain = {g["name"]: g for g in parameter_groups(task, OptimConfig(weight_decay=0.05))}
    assert plain["tower"]["weight_decay"] == 0.05
    with pytest.raises(ValueError, match="l2sp"):
        OptimConfig(l2sp=-1.0)


def test_nothing_to_act_on_warns_once(caplog):
    torch.manual_seed(0)
    task = CaptionTask(mmtransfer.create_model("tiny-random"), CaptionObjectiveConfig())  # towers not pretrained
    with caplog.at_level(logging.WARNING, logger="mmtransfer.losses.l2sp"):
        l2sp = L2SP(task, alpha=0.1)
    assert not l2sp and sum("nothing to act on" in r.message for r in caplog.records) == 1


def test_logged_penalty_is_exact_and_grows(tmp_path):
    start = {k: v.detach().clone() for k, v in _task().state_dict().items()}
    alpha = 0.5
    trainer = _trainer(tmp_path, l2sp=alpha, max_steps=4, save_every=1, keep_last=10)
    names = _trainable_tower_names(trainer.task)
    result = trainer.fit()
    logged = [r["train/l2sp"] for r in _records(result.run_dir) if "train/l2sp" in r]
    assert len(logged) == 4 and logged[0] == 0.0  # measured before each step's update: zero at step 0
    assert all(b > a for a, b in zip(logged, logged[1:])), logged
    # The value logged at step k is the penalty of the weights after k - 1 updates (checkpoint-(k-1)).
    for step in (2, 3, 4):
        assert logged[step - 1] == pytest.approx(_penalty(alpha, _weights(result.run_dir, step - 1), start, names), rel=1e-5)
    final = _weights(result.run_dir, 4)
    assert float(trainer.l2sp.penalty().detach()) == pytest.approx(_penalty(alpha, final, start, names), rel=1e-5)
    # w0 stays out of the checkpoint: it holds the task's weights and nothing else.
    assert set(final) <= set(trainer.task.state_dict())
    # Projections moved but are not penalised; frozen tower weights did not move.
    assert not torch.equal(final["model.text_projection.net.weight"], start["model.text_projection.net.weight"])
    frozen = [n for n, p in trainer.task.named_parameters() if not p.requires_grad and n in final]
    assert frozen and all(torch.equal(final[n], start[n]) for n in frozen)


def test_larger_alpha_keeps_towers_closer_to_their_start(tmp_path):
    start = {k: v.detach().clone() for k, v in _task().state_dict().items()}
    distance = {}
    for alpha in (0.0, 20.0):
        trainer = _trainer(tmp_path / str(alpha), l2sp=alpha, max_steps=6)
        names = _trainable_tower_names(trainer.task)
        trainer.fit()
        distance[alpha] = _penalty(2.0, _weights(tmp_path / str(alpha), 6), start, names)  # sum ||w - w0||^2
    assert distance[0.0] > 0 and distance[20.0] < 0.5 * distance[0.0], distance


def test_resume_latest_keeps_the_pretrained_start(tmp_path):
    straight = _trainer(tmp_path / "a", l2sp=1.0).fit()
    # A run stopped after step 3: its last checkpoint and log lines are gone, then resume=latest in the same folder.
    stopped = _trainer(tmp_path / "b", l2sp=1.0, save_every=3, keep_last=5).fit()
    shutil.rmtree(stopped.run_dir / "checkpoints" / "checkpoint-6")
    assert [p.name for p in list_checkpoints(stopped.run_dir)] == ["checkpoint-3"]
    resumed = _trainer(tmp_path / "b", l2sp=1.0, save_every=3, keep_last=5, resume="latest").fit()
    assert resumed.step == 6
    a, b = _weights(straight.run_dir, 6), _weights(resumed.run_dir, 6)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logged = {run: {r["step"]: r["train/l2sp"] for r in _records(run) if "train/l2sp" in r} for run in (straight.run_dir, resumed.run_dir)}
    assert logged[straight.run_dir] == logged[resumed.run_dir]
    assert logged[resumed.run_dir][4] > 0  # w0 is the pretrained start, not the checkpoint it resumed from


def test_bf16_and_accumulation_keep_the_penalty_in_float32(tmp_path):
    trainer = _trainer(tmp_path, l2sp=0.5, max_steps=3, grad_accum_steps=2, mixed_precision="bf16")
    result = trainer.fit()
    logged = [r["train/l2sp"] for r in _records(result.run_dir) if "train/l2sp" in r]
    assert len(logged) == 3 and logged[0] == 0.0 < logged[-1]
    assert trainer.l2sp.penalty().dtype == torch.float32
