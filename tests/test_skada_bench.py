"""benchmarks/skada_digits.py: both sides train the same steps and the table has both columns (the run needs skada and skorch)."""

from __future__ import annotations

import json
import re
import sys

import pytest

try:
    from data_helpers import REPO, load_repo_module, shared_cache_dir, shared_data_dir
except ImportError:  # tests/ collected as a package
    from tests.data_helpers import REPO, load_repo_module, shared_cache_dir, shared_data_dir


def test_without_skada_it_exits_2_naming_the_extra(monkeypatch, capsys):
    bench = load_repo_module("benchmarks/skada_digits.py")
    monkeypatch.setitem(sys.modules, "skada.deep", None)  # import skada.deep now raises ImportError
    with pytest.raises(SystemExit) as exc:
        bench.main(["--steps", "1", "--out", "unused"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and "pip install -e '.[bench]'" in err


def test_step_check_refuses_another_count_or_rate():
    from mmtransfer.assemble.domains import AdaptConfig
    from mmtransfer.config import load_config

    bench = load_repo_module("benchmarks/skada_digits.py")
    cfg = load_config(AdaptConfig, REPO / "configs" / "digits_mnist_usps_dann.yaml", ["train.max_steps=4"])
    lr = cfg.optim.lr
    steps = [[(lr * cfg.optim.lr_multiplier(s, 4), lr)] for s in range(4)]  # (lr, base_lr) of the one group
    bench.check_skada_steps(cfg, steps)
    with pytest.raises(RuntimeError, match="3 optimizer steps, mmtransfer makes 4"):
        bench.check_skada_steps(cfg, steps[:3])
    with pytest.raises(RuntimeError, match="at step 2"):
        bench.check_skada_steps(cfg, steps[:2] + [[(lr, lr)]] + steps[3:])  # no warm-up at step 2


def test_skada_dann_step_is_ours_with_a_constant_lambda():
    """Same weights, batch and dropout draws: skada's DANN loss and classifier gradients are mmtransfer's."""
    pytest.importorskip("skada.deep")
    pytest.importorskip("skorch")
    import copy

    import torch
    from skada.deep import DANNLoss
    from skada.deep.base import DomainAwareCriterion, DomainAwareModule

    from mmtransfer.assemble.domains import AdaptConfig
    from mmtransfer.config import load_config
    from mmtransfer.models.classifier import BackboneClassifier
    from mmtransfer.objectives.base import StepInfo
    from mmtransfer.objectives.domain import ClassifyAdaptTask

    bench = load_repo_module("benchmarks/skada_digits.py")
    parts = bench.skada_parts()
    cfg = load_config(AdaptConfig, REPO / "configs" / "digits_mnist_usps_dann.yaml", ["method.schedule=constant", "method.mcc_weight=0"])
    torch.manual_seed(0)
    ours = ClassifyAdaptTask(BackboneClassifier(cfg.classifier, 10), cfg.method).train()
    disc = parts["discriminator"](ours.model.features_dim, cfg.method.discriminator, cfg.method.lambda_max)
    disc.net.load_state_dict(ours.domain_loss.discriminator.state_dict())
    theirs = DomainAwareModule(parts["classifier"](copy.deepcopy(ours.model)), "classifier.bottleneck", disc).train()
    criterion = DomainAwareCriterion(torch.nn.CrossEntropyLoss(), DANNLoss(), reg=cfg.method.weight / 2)
    xs, xt, ys = torch.randn(8, 3, 28, 28), torch.randn(8, 3, 28, 28) + 0.5, torch.arange(8)

    torch.manual_seed(1)  # the same dropout masks on both sides: both see [source; target] in one pass
    loss = ours({"source": {"pixel_values": xs, "labels": ys}, "target": {"pixel_values": xt}}, StepInfo(0, 10)).loss
    loss.backward()
    torch.manual_seed(1)
    pred = theirs(torch.cat([xs, xt]), sample_domain=torch.tensor([1] * 8 + [-2] * 8))
    their_loss = criterion(pred, torch.cat([ys, torch.full((8,), -1)]))
    their_loss.backward()

    assert float(their_loss.detach()) == pytest.approx(float(loss.detach()), rel=1e-6)
    for (name, a), b in zip(ours.model.named_parameters(), theirs.base_module_.classifier.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-7), name


@pytest.mark.slow  # real digits, as the marker says (about 6 s on 2 busy cores)
def test_dann_on_both_sides_fills_the_table(tmp_path, monkeypatch, request, tmp_path_factory, fresh_accelerator_state):
    pytest.importorskip("skada.deep")
    pytest.importorskip("skorch")
    folder = shared_data_dir()
    if folder is None:
        pytest.skip("The digit archives are absent: set MMTRANSFER_DATA_DIR to the folder with mnist5k.npz and usps.npz")
    monkeypatch.setenv("MMTRANSFER_DATA_DIR", str(folder))
    monkeypatch.setenv("MMTRANSFER_CACHE_DIR", shared_cache_dir(request, tmp_path_factory))
    bench = load_repo_module("benchmarks/skada_digits.py")

    out = bench.main(["--steps", "3", "--seeds", "0", "--methods", "dann", "--max-samples", "200", "--out", str(tmp_path)])

    header, _, row = out["table"].splitlines()
    assert "mmtransfer target acc" in header and "skada target acc" in header
    accs = [float(x) for x in re.findall(r"(\d+(?:\.\d+)?) ± ", row)]
    assert len(accs) == 2 and all(0.0 <= a <= 100.0 for a in accs), row
    for side in ("mmtransfer", "skada"):
        (run,) = out["results"]["dann"][side]
        assert run["steps"] == 3 and 0.0 <= run["target_acc"] <= 100.0 and run["minutes"] > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["table"] == out["table"] and out["table"] in (tmp_path / "results.md").read_text()
