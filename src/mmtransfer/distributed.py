"""Cross-process helpers that work the same with one process and with many."""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist


def is_main_process() -> bool:
    """True in a single process, and in process 0 of a distributed run (before or after Accelerate starts)."""
    import os

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forwards; backwards, the sum over processes of the gathered gradient, sliced to this rank.

    Written out rather than taken from ``torch.distributed.nn.functional.all_gather``:
    that one backs gloo with an all-to-all that, now and then, aborts the
    process at exit ("terminate called without an active exception").
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, size = world()
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = rank, x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # every process's loss sends gradient to every slice
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every process along dim 0, keeping gradients to every slice.

    The backward pass sums the gradients that all processes send to each
    slice, so a loss over the gathered batch trains every process's encoder.
    Every process must pass the same number of rows.

    Shapes:
        (B, ...) on each of W processes -> (W*B, ...)
    """
    if world()[1] == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every process along dim 0 (no gradients; e.g. ids)."""
    size = world()[1]
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


class MetricWindow:
    """The training metrics of the steps since the last log, read once when the window closes.

    Tensors are kept on their device as they come, because reading one (``float``,
    ``.item()``) makes the host wait for every kernel queued before it: the loop
    then never waits for the GPU between log steps.
    """

    def __init__(self, first_step: int, micro_batches: int, device: torch.device | str) -> None:
        self.first_step, self.micro_batches, self.device = first_step, micro_batches, torch.device(device)
        self.values: dict[str, list[torch.Tensor | float]] = {}

    def add(self, key: str, value: torch.Tensor | float) -> None:
        """One value of ``key`` (a tensor counts as its mean)."""
        self.values.setdefault(key, []).append(value.detach().float().mean() if isinstance(value, torch.Tensor) else float(value))

    def means(self) -> dict[str, float]:
        """Each metric's mean over the window and over every process; a non-finite loss stops the run.

        Sums and counts are added up across processes, so a metric that some
        process did not report (e.g. a loss term its batch had no rows for) is
        averaged over the values that exist; with equal counts this is the mean
        of the per-process means, i.e. the metric of the global batch. The
        ``train/loss`` values (one per micro-batch) are added up position by
        position, so a NaN or infinity on any process stops every process, with
        the step where it first appeared.
        """
        keys, size = sorted(self.values), world()[1]
        if size > 1:
            every = [None] * size
            dist.all_gather_object(every, keys)
            keys = sorted(set().union(*every))
        K = len(keys)
        sums = [self._stacked(self.values.get(k, [])).sum() for k in keys]
        counts = [float(len(self.values.get(k, ()))) for k in keys]
        payload = torch.cat([self._stacked(sums + counts), self._stacked(self.values.get("train/loss", []))])  # 2K + W
        if size > 1:
            dist.all_reduce(payload)
        read = payload.tolist()  # the window's one wait for the device
        totals, counts, losses = read[:K], read[K:2 * K], read[2 * K:]
        bad = next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)
        if bad is not None:
            raise FloatingPointError(
                f"The loss became {losses[bad]} at step {self.first_step + bad // self.micro_batches}. "
                "Lower optim.lr, check the data, or try train.mixed_precision=no."
            )
        return {k: total / max(count, 1.0) for k, total, count in zip(keys, totals, counts)}

    def _stacked(self, values: list[torch.Tensor | float]) -> torch.Tensor:  # (n,) float64 on the device
        if not values:
            return torch.zeros(0, dtype=torch.float64, device=self.device)
        return torch.stack([torch.as_tensor(v).to(self.device, torch.float64) for v in values])


class LaunchError(RuntimeError):
    """The processes that were started are not the ones that were asked for."""


def launched_processes() -> int:
    """The world size a launcher (torchrun, accelerate launch, mpirun) set in the environment; 1 without one."""
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


def has_accelerator_device() -> bool:
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def check_launch() -> None:
    """Refuse ``accelerate launch --cpu --num_processes N``, which starts one process where N were asked.

    Accelerate's CPU launcher runs the script once unless mpirun is configured; it
    still sets MASTER_ADDR for the N processes it was asked for, which is how the
    mismatch shows. Training on with one process would silently change the global
    batch, so the run stops and says what to type instead.
    """
    if (os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") and "MASTER_ADDR" in os.environ
            and launched_processes() == 1):
        raise LaunchError(
            "accelerate launch --cpu with --num_processes > 1 started only this one process (Accelerate's CPU launcher "
            "needs mpirun for more). To train with N processes on CPUs run: torchrun --nproc_per_node N "
            "scripts/<script>.py ...; to run one process, drop --num_processes."
        )
