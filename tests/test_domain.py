"""Domain adaptation: gradient reversal, the domain losses, the tasks, schedules, resume and two processes."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from mmtransfer.assemble.domain_data import TensorBatches
from mmtransfer.assemble.domains import AdaptConfig, check_config
from mmtransfer.config import ConfigError
from mmtransfer.losses.domain import (
    ConditionalDomainAdversarialLoss,
    CORALLoss,
    DomainAdversarialLoss,
    DomainDiscriminator,
    GradientReversal,
    MultilinearMap,
    MultipleKernelMMD,
    RandomizedMultilinearMap,
    grad_reverse,
)
from mmtransfer.models.classifier import BackboneClassifier, ClassifierConfig
from mmtransfer.models.lenet import LeNet, LeNetConfig
from mmtransfer.objectives.base import StepInfo
from mmtransfer.objectives.domain import ClassifyAdaptTask, MethodConfig, MultimodalAdaptTask, grl_lambda
from mmtransfer.schedules import dann_lambda
from mmtransfer.train import OptimConfig, TrainConfig, Trainer

TINY_LENET = LeNetConfig(channels=[4, 8], image_size=16)


# Each test starts with no Accelerate state left by the one before (conftest.py).
pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")


def _tiny_classifier(**changes) -> BackboneClassifier:
    cfg = ClassifierConfig(lenet=TINY_LENET, bottleneck_dim=16, dropout=0.0, **changes)
    return BackboneClassifier(cfg, num_classes=3)


def _batch(B: int = 8, size: int = 16, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"source": {"pixel_values": torch.randn(B, 3, size, size, generator=g), "labels": torch.randint(0, 3, (B,), generator=g)},
            "target": {"pixel_values": torch.randn(B, 3, size, size, generator=g) + 1.0}}


# ----------------------------------------------------------------------------- gradient reversal


@pytest.mark.parametrize("lam", [0.0, 0.25, 1.0, 3.0])
def test_gradient_reversal_negates_and_scales_exactly(lam):
    x = torch.randn(5, 7, requires_grad=True)
    w = torch.randn(5, 7)
    y = grad_reverse(x, lam)
    assert torch.equal(y, x)  # identity forward
    (y * w).sum().backward()
    assert torch.equal(x.grad, -lam * w)
    x.grad = None
    (GradientReversal()(x, lam) * w).sum().backward()
    assert torch.equal(x.grad, -lam * w)


def test_reversal_reaches_features_but_not_discriminator():
    """The discriminator descends the domain loss; the features get exactly -lambda times that gradient."""
    torch.manual_seed(0)
    f_s, f_t = torch.randn(6, 4, requires_grad=True), torch.randn(6, 4, requires_grad=True)
    disc = DomainDiscriminator(4, 8, num_layers=1, batch_norm=False)
    DomainAdversarialLoss(disc)(f_s, f_t, lambda_=0.5).loss.backward()
    reversed_grad, disc_grad = f_s.grad.clone(), [p.grad.clone() for p in disc.parameters()]
    f_s.grad = None
    disc.zero_grad()
    # Same loss without reversal: discriminator gradients are equal, feature gradients are -1/0.5 times.
    logits = disc(torch.cat([f_s, f_t]))
    labels = torch.cat([torch.ones(6), torch.zeros(6)])
    F.binary_cross_entropy_with_logits(logits, labels).backward()
    torch.testing.assert_close(reversed_grad, -0.5 * f_s.grad)
    for a, p in zip(disc_grad, disc.parameters()):
        torch.testing.assert_close(a, p.grad)


# ----------------------------------------------------------------------------- schedules


def test_lambda_follows_the_dann_schedule():
    m = MethodConfig()
    for p in (0.0, 0.1, 0.37, 0.5, 1.0):
        assert grl_lambda(m, p) == pytest.approx(2 / (1 + math.exp(-10 * p)) - 1)
        assert grl_lambda(m, p) == dann_lambda(p)
    assert grl_lambda(MethodConfig(lambda_max=0.3), 1.0) == pytest.approx(0.3 * dann_lambda(1.0))
    assert grl_lambda(MethodConfig(gamma=5.0), 0.5) == pytest.approx(dann_lambda(0.5, 5.0))
    assert grl_lambda(MethodConfig(schedule="constant", lambda_max=0.7), 0.01) == 0.7


def test_task_uses_lambda_of_the_step_it_is_given():
    torch.manual_seed(0)
    task = ClassifyAdaptTask(_tiny_classifier(), MethodConfig(name="dann"))
    for step in (0, 3, 9):
        out = task(_batch(), StepInfo(step, 10))
        assert out.metrics["lambda"] == pytest.approx(dann_lambda(step / 10))


# ----------------------------------------------------------------------------- losses


def test_discriminator_losses_run_under_bf16_autocast_on_cpu():
    torch.manual_seed(0)
    f_s, f_t = torch.randn(8, 16, requires_grad=True), torch.randn(8, 16)
    logits_s, logits_t = torch.randn(8, 5), torch.randn(8, 5)
    losses = [
        (DomainAdversarialLoss(DomainDiscriminator(16, 32)), lambda l: l(f_s, f_t, 1.0)),
        (ConditionalDomainAdversarialLoss(DomainDiscriminator(80, 32), 16, 5, entropy_conditioning=True),
         lambda l: l(logits_s, f_s, logits_t, f_t, 1.0)),
        (ConditionalDomainAdversarialLoss(DomainDiscriminator(64, 32), 16, 5, randomized=True, randomized_dim=64),
         lambda l: l(logits_s, f_s, logits_t, f_t, 1.0)),
    ]
    for loss, call in losses:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            probe = torch.randn(8, loss.discriminator.in_dim)
            assert loss.discriminator(probe).dtype == torch.bfloat16  # the MLP runs in bf16; its loss does not
            out = call(loss)
        assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
        out.loss.backward()
        assert torch.isfinite(f_s.grad).all()
        f_s.grad = None


def test_discriminator_learns_to_separate_shifted_domains():
    torch.manual_seed(0)
    dann = DomainAdversarialLoss(DomainDiscriminator(8, 32, num_layers=1))
    opt = torch.optim.Adam(dann.parameters(), lr=1e-2)
    for _ in range(60):
        out = dann(torch.randn(32, 8) + 2, torch.randn(32, 8) - 2, lambda_=1.0)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert float(out.domain_accuracy) > 0.95 and out.lambda_ == 1.0
    assert set(out.metrics()) == {"lambda", "domain_acc", "domain_acc_source", "domain_acc_target"}


def test_multilinear_maps():
    f, g = torch.randn(4, 6), torch.softmax(torch.randn(4, 3), 1)
    full = MultilinearMap()(f, g)  # (4, 18)
    assert full.shape == (4, 18)
    torch.testing.assert_close(full.view(4, 3, 6), g[:, :, None] * f[:, None, :])
    a = RandomizedMultilinearMap(6, 3, 4096, seed=1)
    b = RandomizedMultilinearMap(6, 3, 4096, seed=1)
    assert torch.equal(a.Rf, b.Rf) and "Rf" in a.state_dict()  # identical on every process, saved with checkpoints
    ra = a(f, g)
    assert ra.shape == (4, 4096)
    # Inner products approximate those of the full outer product (in expectation).
    torch.testing.assert_close(ra @ ra.T, full @ full.T, atol=0.6 * float((full @ full.T).abs().max()), rtol=0)


def test_cdan_entropy_weights_favour_confident_examples():
    torch.manual_seed(0)
    f = torch.randn(4, 5)
    confident = torch.tensor([[20.0, 0, 0], [20.0, 0, 0], [0, 0, 0.0], [0, 0, 0.0]])
    cdan_e = ConditionalDomainAdversarialLoss(DomainDiscriminator(15, 8, batch_norm=False), 5, 3, entropy_conditioning=True)
    out = cdan_e(confident[:2], f[:2], confident[2:], f[2:], 1.0)
    assert torch.isfinite(out.loss) and out.domain_accuracy is not None


def test_mmd_and_coral_are_zero_for_equal_sets_and_grow_with_shift():
    torch.manual_seed(0)
    x = torch.randn(32, 8)
    for loss in (MultipleKernelMMD(), CORALLoss()):
        assert float(loss(x, x.clone()).loss) == pytest.approx(0.0, abs=1e-6)
    y = torch.randn(32, 8)
    mmd = MultipleKernelMMD()
    assert float(mmd(x, y + 2).loss) > float(mmd(x, y + 0.5).loss) > 0
    coral = CORALLoss()
    assert float(coral(x, y * 3).loss) > float(coral(x, y * 1.5).loss) > 0
    out = mmd(x, y)
    assert out.lambda_ is None and out.domain_accuracy is None and out.discrepancy is not None


# ----------------------------------------------------------------------------- models and tasks


def test_lenet_options_and_shapes():
    x = torch.rand(2, 3, 28, 28)
    assert LeNet(LeNetConfig())(x).shape == (2, 800)
    gray = LeNet(LeNetConfig(color="gray", input_norm="image", batch_norm=True))
    assert gray.features[0].in_channels == 1 and gray(x).shape == (2, 800)
    prepared = LeNet(LeNetConfig(input_norm="channel")).prepare(x)
    torch.testing.assert_close(prepared.mean(dim=(2, 3)), torch.zeros(2, 3), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="shrink"):
        LeNet(LeNetConfig(channels=[8, 8, 8], image_size=16))


@pytest.mark.parametrize("method", ["none", "dann", "cdan", "cdan+e", "mmd", "coral"])
def test_classify_task_every_method_one_backward(method):
    torch.manual_seed(0)
    task = ClassifyAdaptTask(_tiny_classifier(), MethodConfig(name=method, randomized=method == "cdan+e", randomized_dim=32))
    batch = _batch()
    if method == "none":
        del batch["target"]  # source-only never reads the target
    out = task(batch, StepInfo(5, 10))
    out.loss.backward()
    unused = [n for n, p in task.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, unused  # every parameter is used: DDP needs no find_unused_parameters
    assert {"cls_loss", "source_acc"} <= set(out.metrics)
    if method in ("dann", "cdan", "cdan+e"):
        assert {"lambda", "domain_acc", "transfer_loss"} <= set(out.metrics)


def test_classifier_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    model = _tiny_classifier().eval()
    model.save_pretrained(tmp_path / "clf")
    loaded = BackboneClassifier.from_pretrained(tmp_path / "clf")
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(model(x).logits, loaded(x).logits)
    with pytest.raises(FileNotFoundError, match="no saved image classifier"):
        BackboneClassifier.from_pretrained(tmp_path)


@pytest.mark.parametrize("features", ["embedding", "fused"])
def test_multimodal_task_adapts_embedding_or_fused_features(tiny_model, features):
    import copy

    model = copy.deepcopy(tiny_model).train()
    model.freeze("both")
    task = MultimodalAdaptTask(model, MethodConfig(name="dann", features=features))
    tok = model.tokenize(["a red square", "a blue circle", "a green star", "a red square"])
    batch = {"source": {"pixel_values": torch.randn(4, 3, 32, 32), **tok}, "target": {"pixel_values": torch.randn(4, 3, 32, 32)}}
    out = task(batch, StepInfo(2, 10))
    out.loss.backward()
    assert {"contrastive", "lambda", "domain_acc"} <= set(out.metrics)
    unused = [n for n, p in task.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, unused


def test_impossible_combinations_are_explained():
    cfg = AdaptConfig(task="multimodal", method=MethodConfig(name="cdan"))
    with pytest.raises(ConfigError, match="class predictions"):
        check_config(cfg)
    with pytest.raises(ConfigError, match="task=multimodal"):
        check_config(AdaptConfig(method=MethodConfig(features="embedding")))


def test_recipes_load():
    from pathlib import Path

    from mmtransfer.config import load_config

    root = Path(__file__).resolve().parents[1] / "configs"
    recipes = sorted(root.glob("digits_*.yaml")) + sorted(root.glob("emoji_*.yaml")) + [root / "domain_folders_template.yaml", root / "domain_folders_cpu.yaml"]
    assert len(recipes) >= 8
    for path in recipes:
        cfg = load_config(AdaptConfig, path)
        check_config(cfg)


# ----------------------------------------------------------------------------- the loop: schedule and resume


def _synthetic_trainer(tmp_path, max_steps=6, method="dann", **train_kw) -> Trainer:
    from mmtransfer.data import PairedLoader

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(48) % 3
    source = torch.randn(48, 3, 16, 16, generator=g) * 0.3 + labels[:, None, None, None].float()
    target = torch.randn(40, 3, 16, 16, generator=g) * 0.3 + (torch.arange(40) % 3)[:, None, None, None].float() + 0.5

    def loader(x, y, seed):
        return torch.utils.data.DataLoader(list(range(len(x))), batch_size=8, shuffle=True, drop_last=True,
                                           collate_fn=TensorBatches(x, y), generator=torch.Generator().manual_seed(seed))

    pairs = PairedLoader(loader(source, labels, 0), loader(target, None, 1), steps="max", seed=0)
    task = ClassifyAdaptTask(_tiny_classifier(), MethodConfig(name=method))
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=max_steps, batch_size=8, trackers=[],
                      progress_bar=False, log_every=1, **train_kw)
    return Trainer(task, pairs, cfg, OptimConfig(lr=3e-3, warmup_steps=2), export=lambda t, d: t.model.save_pretrained(d))


def _lambdas(run_dir) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/lambda"] for r in records if "train/lambda" in r}


def test_logged_lambda_follows_the_schedule_in_training(tmp_path):
    result = _synthetic_trainer(tmp_path, max_steps=7).fit()
    lambdas = _lambdas(result.run_dir)
    # The record of step s is the update made at step s - 1 (the counter advances after it).
    for s, lam in lambdas.items():
        assert lam == pytest.approx(dann_lambda((s - 1) / 7)), s


def test_resumed_run_continues_the_schedule_where_it_stopped(tmp_path):
    from safetensors.torch import load_file

    straight = _synthetic_trainer(tmp_path / "a", max_steps=8).fit()
    first = _synthetic_trainer(tmp_path / "b", max_steps=8, save_every=3, keep_last=5).fit()
    middle = first.run_dir / "checkpoints" / "checkpoint-3"
    resumed = _synthetic_trainer(tmp_path / "c", max_steps=8, resume=str(middle)).fit()
    assert resumed.step == 8
    a, c = _lambdas(straight.run_dir), _lambdas(resumed.run_dir)
    assert sorted(c) == [4, 5, 6, 7, 8]  # the resumed run starts at step 3: lambda does not restart from 0
    for s in c:
        assert c[s] == a[s], s
    wa = load_file(str(straight.model_dir / "model.safetensors"))
    wc = load_file(str(resumed.model_dir / "model.safetensors"))
    for k in wa:
        assert torch.equal(wa[k], wc[k]), k


# ----------------------------------------------------------------------------- two processes


def _dann_worker(rank: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=2)
    torch.manual_seed(0)  # same initial weights on both ranks (DDP also broadcasts rank 0's)
    task = ClassifyAdaptTask(_tiny_classifier(bottleneck_batch_norm=True), MethodConfig(name="dann"))
    ddp = DDP(task)  # find_unused_parameters=False: DDP errors if a parameter got no gradient
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
    for step in range(2):
        out = ddp(_batch(seed=10 * step + rank), StepInfo(step + 3, 10))  # each rank its own data
        out.loss.backward()
        grads = torch.cat([p.grad.flatten() for p in task.parameters()])
        gathered = [torch.empty_like(grads) for _ in range(2)]
        dist.all_gather(gathered, grads)
        torch.save({"grads": gathered, "local_loss": out.loss.detach(), "lambda": out.metrics["lambda"],
                    "missing": [n for n, p in task.named_parameters() if p.grad is None]},
                   os.path.join(out_dir, f"rank{rank}-step{step}.pt"))
        opt.step()
        opt.zero_grad(set_to_none=False)
    params = torch.cat([p.detach().flatten() for p in task.parameters()])
    torch.save(params, os.path.join(out_dir, f"rank{rank}-params.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_two_process_dann_step_has_identical_gradients(tmp_path):
    """2 gloo processes, different data per rank: one backward per step, no unused parameters, equal gradients."""
    import torch.multiprocessing as mp

    mp.spawn(_dann_worker, args=(str(tmp_path),), nprocs=2, join=True)
    for step in range(2):
        r0 = torch.load(tmp_path / f"rank0-step{step}.pt")
        r1 = torch.load(tmp_path / f"rank1-step{step}.pt")
        assert not r0["missing"] and not r1["missing"]
        assert not torch.equal(r0["local_loss"], r1["local_loss"])  # the ranks saw different data
        assert torch.equal(r0["grads"][0], r0["grads"][1])  # after the all-reduce, identical across ranks
        assert r0["grads"][0].abs().sum() > 0
        assert r0["lambda"] == r1["lambda"] == pytest.approx(dann_lambda((step + 3) / 10))
    assert torch.equal(torch.load(tmp_path / "rank0-params.pt"), torch.load(tmp_path / "rank1-params.pt"))


def test_statistic_losses_give_finite_gradients():
    torch.manual_seed(0)
    f_s = torch.randn(8, 5, requires_grad=True)
    f_t = torch.cat([f_s[:2].detach(), torch.randn(6, 5)]).requires_grad_(True)  # some identical rows: zero distances
    for loss in (MultipleKernelMMD(), CORALLoss()):
        loss(f_s, f_t).loss.backward()
        assert torch.isfinite(f_s.grad).all() and torch.isfinite(f_t.grad).all()
        f_s.grad = f_t.grad = None


# ----------------------------------------------------------------------------- the digits recipe's parts


def test_lenet_fully_connected_layer():
    net = LeNet(LeNetConfig(fc_dim=500, dropout=0.5))
    assert net.width == 500 and net(torch.rand(2, 3, 28, 28)).shape == (2, 500)
    assert isinstance(net.features[-1], torch.nn.Dropout) and isinstance(net.features[-3], torch.nn.Linear)


def test_minimum_class_confusion_prefers_unmixed_predictions():
    from mmtransfer.losses.domain import minimum_class_confusion

    confident = torch.eye(4).repeat(2, 1) * 10  # (8, 4) every class predicted cleanly
    mixed = torch.randn(8, 4, generator=torch.Generator().manual_seed(0)) * 0.1
    assert float(minimum_class_confusion(confident)) < 0.2 < 0.7 < float(minimum_class_confusion(mixed))
    # Row order does not matter; gradients reach the logits.
    logits = mixed.clone().requires_grad_(True)
    loss = minimum_class_confusion(logits)
    torch.testing.assert_close(loss, minimum_class_confusion(mixed.flip(0)))
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("method", ["none", "cdan"])
def test_mcc_reads_the_target_even_without_a_domain_loss(method):
    torch.manual_seed(0)
    task = ClassifyAdaptTask(_tiny_classifier(), MethodConfig(name=method, randomized=False, mcc_weight=1.0))
    out = task(_batch(), StepInfo(5, 10))
    assert task.uses_target and "mcc_loss" in out.metrics
    plain = ClassifyAdaptTask(_tiny_classifier(), MethodConfig(name="none"))
    assert not plain.uses_target


def test_sgd_with_the_inverse_schedule():
    from mmtransfer.schedules import warmup_inverse

    optim = OptimConfig(name="sgd", lr=0.01, momentum=0.9, schedule="inverse", warmup_steps=0)
    opt = optim.make_optimizer([{"params": [torch.nn.Parameter(torch.zeros(2))]}])
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9
    assert optim.lr_multiplier(0, 1500) == 1.0
    assert optim.lr_multiplier(1000, 1500) == pytest.approx((1 + 0.001 * 1000) ** -0.75)
    assert warmup_inverse(5, 100, warmup_steps=10) == 0.5
    assert isinstance(OptimConfig().make_optimizer([{"params": [torch.nn.Parameter(torch.zeros(2))]}]), torch.optim.AdamW)
    with pytest.raises(ConfigError, match="momentum"):
        OptimConfig(momentum=1.0)


def test_multimodal_mcc_uses_the_batch_captions_as_classes(tiny_model):
    import copy

    model = copy.deepcopy(tiny_model).train()
    model.freeze("both")
    task = MultimodalAdaptTask(model, MethodConfig(name="none", mcc_weight=1.0))
    tok = model.tokenize(["a red square", "a blue circle", "a green star", "a red square"])
    g = torch.Generator().manual_seed(0)
    batch = {"source": {"pixel_values": torch.randn(4, 3, 32, 32, generator=g), **tok},
             "target": {"pixel_values": torch.randn(4, 3, 32, 32, generator=g)}}
    out = task(batch, StepInfo(1, 10))
    assert task.uses_target and "mcc_loss" in out.metrics
    out.loss.backward()
    assert all(p.grad is not None for p in model.image_projection.parameters())
