"""The one training loop, on Hugging Face Accelerate.

Everything trainable is a *task*: an ``nn.Module`` that holds the model and
its loss modules and maps ``(batch, StepInfo)`` to a :class:`TaskOutput`. The
loop owns devices, precision, accumulation, clipping, the learning-rate
schedule (a pure function of the step), evaluation, logging and exact
checkpoint/resume; tasks own the mathematics.

    trainer = Trainer(task, train_loader, TrainConfig(...), OptimConfig(...), evaluate=fn)
    result = trainer.fit()
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal

import torch
from torch import nn

from . import checkpoint, sharding
from .config import FRACTION, Range, at_least, check_ranges, to_dict
from .distributed import MetricWindow, check_launch, has_accelerator_device, launched_processes
from .evaluate import plot_curves
from .losses.l2sp import L2SP, tower_parameter_ids
from .models.common import compile_towers
from .objectives.base import StepInfo, TaskOutput
from .run_folder import (
    CHECKPOINT_PREFIX,
    SUMMARY_FILE,
    flat_hparams,
    folder_error,
    list_checkpoints,
    prepare_run_folder,
    read_metrics,
    update_summary,
    write_text_atomic,
)
from .schedules import LR_SCHEDULES, warmup_inverse

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- configs


@dataclass
class OptimConfig:
    """The optimizer (AdamW or SGD) with two learning rates and a warm-up schedule."""

    # "adamw", or "sgd" (Nesterov momentum; with schedule "inverse" the usual recipe of
    # domain-adversarial training from scratch).
    name: Literal["adamw", "sgd"] = "adamw"
    # Learning rate of new parameters (projections, fusion, heads, temperature).
    lr: float = 1e-3
    # Learning rate of pretrained tower parameters that are trainable.
    tower_lr: float = 1e-5
    # Decoupled weight decay (AdamW) or L2 penalty (SGD); never applied to norms, biases or
    # the temperature.
    weight_decay: float = 0.05
    # AdamW: moment decay rates and epsilon.
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    # SGD: Nesterov momentum.
    momentum: float = 0.9
    # Learning-rate shape after warm-up: "cosine", "linear", "constant", or "inverse"
    # (1 + inverse_gamma * step) ** -inverse_power, which decays slowly and never reaches 0.
    schedule: Literal["cosine", "linear", "constant", "inverse"] = "cosine"
    inverse_gamma: float = 0.001
    inverse_power: float = 0.75
    # Steps of linear warm-up from 0.
    warmup_steps: int = 50
    # Final learning rate as a fraction of the peak (cosine and linear).
    min_lr_ratio: float = 0.0
    # Clip the global gradient norm to this value (0 disables).
    grad_clip: float = 1.0
    # L2-SP strength alpha (0 disables): adds alpha/2 * sum ||w - w0||^2 over trainable pretrained-tower weights, w0 their
    # pretrained values, logged as train/l2sp (train/loss stays the task loss); it replaces weight_decay for those weights.
    l2sp: float = 0.0

    def __post_init__(self) -> None:
        # AdamW refuses betas outside [0, 1) and negative rates, decay and eps, but only once the
        # model and data are loaded; here they fail as the recipe is read.
        check_ranges(self, lr=at_least(0), tower_lr=at_least(0), weight_decay=at_least(0), l2sp=at_least(0), eps=at_least(0),
                     betas=Range(0, 1, high_open=True), momentum=Range(0, 1, high_open=True), inverse_gamma=at_least(0),
                     inverse_power=at_least(0), warmup_steps=at_least(0), min_lr_ratio=FRACTION, grad_clip=at_least(0))

    def lr_multiplier(self, step: int, total_steps: int) -> float:
        """The schedule's multiplier of the peak learning rates at ``step`` (a pure function of the step)."""
        if self.schedule == "inverse":
            return warmup_inverse(step, total_steps, self.warmup_steps, self.inverse_gamma, self.inverse_power)
        return LR_SCHEDULES[self.schedule](step, total_steps, self.warmup_steps, self.min_lr_ratio)

    def make_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        if self.name == "sgd":
            return torch.optim.SGD(groups, lr=self.lr, momentum=self.momentum, nesterov=self.momentum > 0)
        return torch.optim.AdamW(groups, lr=self.lr, betas=tuple(self.betas), eps=self.eps)


@dataclass
class TrainConfig:
    """How long, how big, how precise, and where the run goes."""

    # Run folder: resolved config, metrics.jsonl, curves.png, checkpoints/, model/.
    output_dir: str = "runs/default"
    # Optimizer steps in total (one step = grad_accum_steps micro-batches).
    max_steps: int = 1000
    # Micro-batch size per process.
    batch_size: int = 64
    # Batch size of evaluation and feature caching (no gradients: larger fits).
    eval_batch_size: int = 128
    # Micro-batches accumulated per optimizer step.
    grad_accum_steps: int = 1
    # "no", "bf16" or "fp16" (fp16 needs a GPU).
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    seed: int = 0
    # Evaluate every N optimizer steps (0: only at the end).
    eval_every: int = 0
    # Save a resumable checkpoint every N steps (0: only at the end).
    save_every: int = 0
    # Checkpoints kept on disk (older ones are deleted).
    keep_last: int = 2
    # Log training metrics every N steps. Metrics stay on the device in between, so the host
    # never waits for the GPU between log steps; a non-finite loss stops the run at the next
    # log, evaluation or checkpoint, naming the step where it appeared.
    log_every: int = 10
    # DataLoader worker processes.
    num_workers: int = 0
    # Accelerate trackers ("tensorboard", "wandb", ...); [] for none.
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    # Resume from "latest" (newest checkpoint in the run folder) or a checkpoint folder.
    resume: str | None = None
    # Two training steps and one evaluation on a small slice, to check a set-up.
    fast_dev_run: bool = False
    # Show a progress bar on the console (main process only).
    progress_bar: bool = True
    # Compile the towers (text and image encoders) with torch.compile before Accelerate wraps the task.
    # Meant for GPUs, where it has not been measured yet; on a CPU the tiny test towers compiled in
    # 16-46 s, then stepped in 0.81x the eager time (docs/results/benchmarks.md).
    compile: bool = False

    def __post_init__(self) -> None:
        # max_steps <= 0 would export an untrained model; log_every=0 divides by zero; NumPy takes
        # seeds in [0, 2**32).
        check_ranges(self, max_steps=at_least(1), batch_size=at_least(1), eval_batch_size=at_least(1), grad_accum_steps=at_least(1),
                     seed=Range(0, 2**32 - 1), eval_every=at_least(0), save_every=at_least(0), keep_last=at_least(0),
                     log_every=at_least(1), num_workers=at_least(0))


# ----------------------------------------------------------------------------- task interface


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    metrics: dict[str, float]
    model_dir: Path | None


class _TrainState:
    """The loop's counters, saved with every checkpoint as JSON (``trainer_state.json``)."""

    def __init__(self) -> None:
        self.step = 0
        self.epoch = 0
        self.batches_in_epoch = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step, self.epoch, self.batches_in_epoch = state["step"], state["epoch"], state["batches_in_epoch"]


# ----------------------------------------------------------------------------- helpers


def parameter_groups(task: nn.Module, optim: OptimConfig) -> list[dict[str, Any]]:
    """Optimizer groups: towers vs new parameters, each with and without weight decay.

    A parameter belongs to a pretrained tower when it sits inside a module that
    declares ``is_pretrained_tower = True`` (the text and image encoders do).
    Norm weights, biases and scalars (the temperature) get no weight decay, nor towers under L2-SP.
    """
    tower_params = tower_parameter_ids(task)
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for _, p in task.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        key = (id(p) in tower_params, p.ndim >= 2)
        groups.setdefault(key, []).append(p)
    out = []
    for (is_tower, decays), params in groups.items():
        out.append({
            "params": params,
            "lr": optim.tower_lr if is_tower else optim.lr,
            "base_lr": optim.tower_lr if is_tower else optim.lr,
            "weight_decay": optim.weight_decay if decays and not (is_tower and optim.l2sp > 0) else 0.0,
            "name": f"{'tower' if is_tower else 'new'}{'' if decays else '/no_decay'}",
        })
    if not out:
        raise ValueError("Nothing to train: every parameter is frozen.")
    return out


# ----------------------------------------------------------------------------- the loop


def loop_settings(config: TrainConfig) -> TrainConfig:
    """The settings the loop runs with; ``config`` itself is never changed.

    A fast dev run is two steps with one evaluation at the end, no checkpoint
    and no trackers.
    """
    if not config.fast_dev_run:
        return config
    return dataclasses.replace(config, max_steps=2, eval_every=0, save_every=0, trackers=[])


def make_accelerator(config: TrainConfig) -> Any:
    """The Accelerator for a run: precision, accumulation, trackers and seeded data order."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

    config = loop_settings(config)
    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("train.mixed_precision=fp16 needs a GPU; on a CPU use bf16 or no.")
    check_launch()
    run_dir = Path(config.output_dir)
    prepare_run_folder(run_dir)
    trackers = list(config.trackers)
    accelerator = Accelerator(
        # Under torchrun without a GPU, Accelerate would treat every process as a lone main process
        # (each logging, each writing the run folder) unless ACCELERATE_USE_CPU is set: say it here.
        cpu=launched_processes() > 1 and not has_accelerator_device(),
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.grad_accum_steps,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
        # Pinned batches (make_loader pins them with a GPU present) go to the GPU without blocking.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=torch.cuda.is_available()),
        step_scheduler_with_optimizer=False,
    )
    sharding.route_fsdp(accelerator)  # FSDP from an accelerate config file: checked, and on CPUs set up here
    set_seed(config.seed, device_specific=False)  # before the model's new heads are initialised
    return accelerator


class Trainer:
    """Train a task with Accelerate: one process on a CPU or many with ``accelerate launch``.

    Args:
        task: module mapping ``(batch, StepInfo)`` to :class:`TaskOutput`.
        train_loader: a DataLoader (prepared here; shuffling is seeded per epoch).
        config: steps, batch, precision, evaluation, checkpoints.
        optim: optimizer and learning-rate schedule.
        evaluate: optional ``fn(task, accelerator, eval_loaders) -> dict[str, float]``,
            called on every process (use ``accelerator.gather_for_metrics``).
        eval_loaders: named DataLoaders, prepared (sharded) here and passed to ``evaluate``.
        run_config: the resolved configuration, written to the run folder.
        export: optional ``fn(unwrapped_task, folder)`` that writes the final model.
        summary_extra: values added to ``summary.json`` (e.g. skipped bad samples).
        accelerator: one from :func:`make_accelerator` when the caller needed it
            earlier (e.g. to build data on the main process first); made here otherwise.
    """

    def __init__(
        self,
        task: nn.Module,
        train_loader: Iterable,
        config: TrainConfig,
        optim: OptimConfig,
        evaluate: Callable[[nn.Module, Any, dict[str, Any]], dict[str, float]] | None = None,
        eval_loaders: dict[str, Iterable] | None = None,
        run_config: Any = None,
        export: Callable[[nn.Module, Path], None] | None = None,
        summary_extra: dict[str, Any] | None = None,
        accelerator: Any = None,
    ) -> None:
        from accelerate.utils import set_seed

        self.config = config = loop_settings(config)
        self.optim_config = optim
        self.run_dir = Path(config.output_dir)
        self.accelerator = accelerator or make_accelerator(config)
        trackers = list(config.trackers)
        set_seed(config.seed, device_specific=False)
        self.state = _TrainState()
        optimizer = optim.make_optimizer(parameter_groups(task, optim))
        # Under FSDP: the towers' blocks named for sharding, and a copy without memory for the full weights.
        self._shell = sharding.before_prepare(self.accelerator, task, optim.l2sp)
        if config.compile:
            compile_towers(task)  # in place: parameter names, checkpoints and unwrap_model stay as they are
        loaders = dict(eval_loaders or {})
        prepare_parts = getattr(train_loader, "prepare_with", None)
        if prepare_parts is not None:
            # A loader made of several loaders (e.g. paired source and target batches) prepares its parts.
            prepare_parts(self.accelerator)
            prepared = self.accelerator.prepare(task, optimizer, *loaders.values())
            self.task, self.optimizer = prepared[:2]
            self.train_loader = train_loader
            self.eval_loaders = dict(zip(loaders, prepared[2:]))
        else:
            prepared = self.accelerator.prepare(task, optimizer, train_loader, *loaders.values())
            self.task, self.optimizer, self.train_loader = prepared[:3]
            self.eval_loaders = dict(zip(loaders, prepared[3:]))
        self.l2sp = L2SP(task, optim.l2sp)  # w0 on the parameters' device (after prepare), before fit() resumes
        self._evaluate = evaluate
        self._export = export
        self.run_config = run_config
        self.summary_extra = dict(summary_extra or {})
        self.records: list[dict[str, Any]] = []
        if self.accelerator.is_main_process:
            prepare_run_folder(self.run_dir)
            import yaml

            if run_config is None:
                data = {"train": to_dict(config), "optim": to_dict(optim)}
            else:
                data = to_dict(run_config) if not isinstance(run_config, dict) else run_config
            write_text_atomic(self.run_dir / "config.yaml", yaml.safe_dump(data, sort_keys=False))
        if trackers:
            self.accelerator.init_trackers("mmtransfer", config=flat_hparams(run_config))

    # -- checkpoints ---------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Write a resumable checkpoint (:mod:`mmtransfer.checkpoint`) to a temporary folder, then rename it.

        A crash or a full disk leaves at most the temporary folder, which the next
        save removes; ``resume=latest`` only ever sees complete checkpoints.
        """
        acc = self.accelerator
        final = self.run_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{self.state.step}"
        tmp = final.with_name(f".tmp-{final.name}")
        failed = torch.zeros(1, device=acc.device)
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                tmp.mkdir(parents=True)
            except OSError:
                failed += 1
        acc.wait_for_everyone()
        error: OSError | None = None
        if not acc.reduce(failed, "sum").item():
            try:
                checkpoint.save(tmp, acc, self.task, self.optimizer, self.state.state_dict(), self._shell)
            except OSError as err:
                error, failed = err, failed + 1
        # Every process learns whether any failed, so that all of them stop together instead of waiting.
        if acc.reduce(failed, "sum").item():
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            raise folder_error(final.parent, error or OSError("another process could not write"), "write a checkpoint")
        if acc.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in list_checkpoints(self.run_dir)[: -max(1, self.config.keep_last)]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def _resume(self) -> None:
        spec = self.config.resume
        if not spec:
            return
        if spec == "latest":
            found = list_checkpoints(self.run_dir)
            if not found:
                logger.info("resume=latest: no checkpoint in %s yet; starting from scratch.", self.run_dir / "checkpoints")
                return
            path = found[-1]
        else:
            path = Path(spec)
            if not path.is_dir():
                raise FileNotFoundError(f"train.resume: checkpoint folder '{path}' does not exist. Use 'latest' or a folder under {self.run_dir / 'checkpoints'}.")
        self.state.load_state_dict(checkpoint.load(path, self.accelerator, self.task, self.optimizer))
        logger.info("Resumed from %s at step %d (epoch %d, batch %d).", path, self.state.step, self.state.epoch, self.state.batches_in_epoch)
        self._load_records()

    def _load_records(self) -> None:
        """Read back the log up to the resumed step; rewrite it so that appends continue a clean file."""
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        records, bad = read_metrics(path)
        later = sum(1 for r in records if r.get("step", 0) > self.state.step)
        self.records = [r for r in records if r.get("step", 0) <= self.state.step]
        if bad and self.accelerator.is_main_process:
            logger.warning("%s: left out %d unreadable line(s) (a run stopped while writing leaves a partial last line).", path, bad)
        if (bad or later) and self.accelerator.is_main_process:
            write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in self.records))
        self.accelerator.wait_for_everyone()

    # -- logging -------------------------------------------------------------------

    def log(self, values: dict[str, float]) -> None:
        record = {"step": self.state.step, "time": round(time.time(), 3), **values}
        self.records.append(record)
        self.accelerator.log(values, step=self.state.step)
        if self.accelerator.is_main_process:
            try:
                with open(self.run_dir / "metrics.jsonl", "a") as fh:
                    fh.write(json.dumps(record) + "\n")
            except OSError as err:
                raise folder_error(self.run_dir, err, "append to metrics.jsonl") from None

    def run_evaluation(self) -> dict[str, float]:
        if self._evaluate is None:
            return {}
        with self.evaluation() as task:
            metrics = self._evaluate(task, self.accelerator, self.eval_loaders)
        self.task.train()
        metrics = {k if "/" in k else f"eval/{k}": float(v) for k, v in metrics.items()}
        self.log(metrics)
        if self.accelerator.is_main_process:
            logger.info("step %d: %s", self.state.step, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        return metrics

    # -- training ------------------------------------------------------------------

    def _set_lr(self) -> float:
        o = self.optim_config
        mult = o.lr_multiplier(self.state.step, self.config.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * mult
        return mult

    def _batches(self):
        """Yield batches forever, from where the state says, with seeded per-epoch order."""
        loader = self.train_loader
        while True:
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(self.state.epoch)
            source = loader
            skip = 0
            if self.state.batches_in_epoch:
                if isinstance(loader, torch.utils.data.DataLoader):
                    source = self.accelerator.skip_first_batches(loader, self.state.batches_in_epoch)
                else:  # other iterables (paired loaders): read and drop, unless they skip by themselves (streams)
                    skip = loader.resume_at(self.state.batches_in_epoch) if hasattr(loader, "resume_at") else self.state.batches_in_epoch
            # Starting an epoch draws worker seeds from the global RNG. Doing it inside a fork seeded
            # by (seed, epoch) leaves the global stream untouched, so an epoch resumed mid-way sees
            # the same dropout and negative sampling as an uninterrupted run.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.config.seed * 1_000_003 + self.state.epoch)
                iterator = iter(source)
                for _ in range(skip):
                    next(iterator, None)
                first = next(iterator, None)
            if first is None:
                if self.state.batches_in_epoch == 0:
                    raise ValueError("The training DataLoader is empty: check the dataset split and batch size.")
                # Resumed exactly at the end of an epoch: move on to the next one.
                self.state.epoch, self.state.batches_in_epoch = self.state.epoch + 1, 0
                continue
            for batch in itertools.chain([first], iterator):
                self.state.batches_in_epoch += 1
                yield batch
            self.state.epoch += 1
            self.state.batches_in_epoch = 0

    def fit(self) -> TrainResult:
        """Train to ``max_steps`` (resuming first if asked), evaluate, checkpoint, export."""
        from tqdm.auto import tqdm

        acc, cfg = self.accelerator, self.config
        self._resume()
        if acc.is_main_process:
            logger.info(
                "Training %d steps: %d process(es) x batch %d x %d accumulation, precision %s, run folder %s",
                cfg.max_steps, acc.num_processes, cfg.batch_size, cfg.grad_accum_steps, cfg.mixed_precision, self.run_dir,
            )
        bar = tqdm(
            total=cfg.max_steps, initial=self.state.step, desc="train", dynamic_ncols=True,
            disable=not (cfg.progress_bar and acc.is_local_main_process),
        )
        self.task.train()
        metrics: dict[str, float] = {}
        window = MetricWindow(self.state.step, cfg.grad_accum_steps, acc.device)
        started = time.perf_counter()
        batches = self._batches()
        while self.state.step < cfg.max_steps:
            lr_mult = self._set_lr()
            for _ in range(cfg.grad_accum_steps):
                batch = next(batches)
                with acc.accumulate(self.task):
                    out: TaskOutput = self.task(batch, StepInfo(self.state.step, cfg.max_steps))
                    acc.backward(self.l2sp.add_to(out.loss, out.metrics))  # logs train/l2sp; train/loss is out.loss
                    if acc.sync_gradients:
                        if self.optim_config.grad_clip > 0:
                            norm = acc.clip_grad_norm_(self.task.parameters(), self.optim_config.grad_clip)
                            window.add("train/grad_norm", norm)
                        self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                window.add("train/loss", out.loss)
                for k, v in out.metrics.items():
                    window.add(f"train/{k}", v)
            self.state.step += 1
            bar.update(1)
            evaluate = cfg.eval_every and self.state.step % cfg.eval_every == 0 and self.state.step < cfg.max_steps
            save = cfg.save_every and self.state.step % cfg.save_every == 0 and self.state.step < cfg.max_steps
            if self.state.step % cfg.log_every == 0 or self.state.step == cfg.max_steps:
                values = window.means()
                values["train/lr"] = self.optim_config.lr * lr_mult
                window = MetricWindow(self.state.step, cfg.grad_accum_steps, acc.device)
                self.log(values)
                bar.set_postfix(loss=f"{values['train/loss']:.4f}")
            elif evaluate or save:
                window.means()  # a non-finite loss stops the run before it is evaluated or saved
            if evaluate:
                metrics = self.run_evaluation()
            if save:
                self.save_checkpoint()
        bar.close()
        elapsed = time.perf_counter() - started
        metrics = self.run_evaluation() or metrics
        if not cfg.fast_dev_run:
            self.save_checkpoint()
        model_dir = self._finish(metrics, elapsed)
        # Close the trackers but keep the process group: recipes evaluate their test split with the
        # same accelerator after fit (Accelerator.end_training would destroy the group under DDP).
        for tracker in acc.trackers:
            tracker.finish()
        return TrainResult(self.run_dir, self.state.step, metrics, model_dir)

    @contextlib.contextmanager
    def evaluation(self) -> Iterator[nn.Module]:
        """The task unwrapped, in eval mode, without gradients, its parameters whole (FSDP): to evaluate after ``fit`` too."""
        self.task.eval()
        with torch.no_grad(), self.accelerator.autocast(), sharding.full_parameters(self.task):
            yield self.accelerator.unwrap_model(self.task)

    def add_to_summary(self, values: dict[str, Any]) -> None:
        """Add a recipe's results (test metrics, plots, timings) to the run's ``summary.json`` (main process)."""
        if self.accelerator.is_main_process:
            update_summary(self.run_dir, values)

    def _finish(self, metrics: dict[str, float], elapsed: float) -> Path | None:
        acc = self.accelerator
        acc.wait_for_everyone()
        model_dir = None
        # Under FSDP every process helps gather the full weights, into the shell on the main process.
        full = sharding.full_weights(acc, self.task, self._shell) if self._shell is not None and self._export else None
        if acc.is_main_process:
            if self._export is not None:
                model_dir = self.run_dir / "model"
                try:
                    self._export(acc.unwrap_model(self.task) if full is None else full, model_dir)
                except OSError as err:
                    raise folder_error(self.run_dir, err, "export the model") from None
            plot = plot_curves(self.records, self.run_dir / "curves.png")
            summary = {
                "steps": self.state.step,
                "train_seconds_this_session": round(elapsed, 2),
                "processes": acc.num_processes,
                "distributed_type": str(getattr(acc.distributed_type, "value", acc.distributed_type)),  # e.g. FSDP
                "final_metrics": metrics,
                "model_dir": str(model_dir) if model_dir else None,
                "curves": str(plot) if plot else None,
                **self.summary_extra,
            }
            write_text_atomic(self.run_dir / SUMMARY_FILE, json.dumps(summary, indent=2))
        acc.wait_for_everyone()
        return model_dir
