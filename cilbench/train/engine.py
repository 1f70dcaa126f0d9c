"""The one fit loop every method trains through, plus batched feature extraction.

Methods hand the engine a loss function, the parameters to train and an index set into the stream's
training tensors; the engine does batching, on-device augmentation, the optimiser and schedule, bf16
autocast on CUDA for training (evaluation and features in float32), gradient clipping, a NaN/inf guard and
per-epoch events.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, ClassVar, Iterable, Literal, Protocol

import torch
from torch import nn
from torch.optim.adam import adam as functional_adam
from torch.optim.sgd import sgd as functional_sgd

from cilbench.data.augment import Augmenter
from cilbench.data.protocol import AugmentConfig, TrainConfig
from cilbench.data.stream import Stream
from cilbench.errors import TrainingDiverged


@dataclass
class RuntimeOptions:
    """How a run executes; none of these change the protocol."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True              # bf16 autocast on CUDA
    channels_last: bool = True    # on CUDA
    compile: bool = False         # torch.compile each network the method prepares
    deterministic: bool = False
    max_epochs: int | None = None  # cap for every training phase (--epochs)
    threads: int = 0              # CPU threads (0 = torch default)
    # an epoch whose mean loss exceeds this many times the phase's first-batch loss (at least 1) has
    # diverged and fails the run like a NaN; 0 turns the check off
    divergence_factor: float = 100.0
    # images per forward pass in inference (evaluation, herding, statistics); 0 = auto: the card's
    # eval_batch_size on CUDA, and on the CPU a chunk whose activations stay in cache (64 images at 32x32:
    # a ResNet-32 forward runs 4x faster than at 1000). Features differ only by float rounding, which can
    # still flip a discrete choice (an exemplar herding picks), so runs are comparable bit for bit only at
    # the same setting.
    inference_batch: int = 0
    # glibc on the CPU: keep freed activation buffers in the heap instead of returning them to the OS, so a
    # training step does not page-fault its buffers back in (steps reach full speed after 1-2 instead of ~10)
    tune_malloc: bool = True
    # threads beyond a few per core only slow a run down, and a huge count crashes the OpenMP runtime
    BOUNDS: ClassVar[dict] = {"max_epochs": (1, 100_000), "threads": (0, lambda: max_threads()),
                              "divergence_factor": (0, None), "inference_batch": (0, 1 << 20)}


def max_threads() -> int:
    """The most CPU threads a run may ask for: 4 per core of this machine."""
    return 4 * (os.cpu_count() or 1)


CPU_INFERENCE_PIXELS = 64 * 32 * 32   # images x height x width per CPU forward chunk (64 CIFAR images)


def explain_device(name: str) -> tuple[torch.device, str]:
    """The device a run uses and why, in one line: 'auto → cpu: no CUDA device', 'cuda: NVIDIA H100'."""
    device = resolve_device(name)
    if device.type == "cuda":
        what = f"cuda: {torch.cuda.get_device_name(device)}"
        return device, (f"auto → {what}" if name == "auto" else what)
    if name != "auto":
        return device, "cpu (asked for)"
    if torch.version.cuda is None:
        return device, "auto → cpu: no CUDA device (this torch is a CPU-only build)"
    return device, (f"auto → cpu: no CUDA device (torch built for CUDA {torch.version.cuda}; "
                    "no GPU visible, or the driver is too old for it)")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from cilbench.errors import UserError
        raise UserError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    return torch.device(name)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3     # glibc mallopt parameters


def tune_malloc() -> bool:
    """Fix glibc's mmap and trim thresholds high: blocks below are served from the heap and freed memory stays
    there. By default glibc mmaps large blocks and unmaps them on free, raising the threshold only as it sees
    them freed, so the first ~10 steps of a phase page-fault their activation buffers (a 5-extractor DER step
    starts at 40-150 img/s and levels at ~200). Resident memory stays at its peak instead of shrinking.
    1 GiB where glibc takes it, else its documented cap of 32 MiB (a CIFAR ResNet-32 activation at batch 128 is
    8 MiB). The trim threshold is set only after the mmap one (alone it would pin mmap at 128 KiB).
    False where the C library is not glibc or refuses both (nothing changes there)."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    for threshold in (1 << 30, 32 << 20):
        if mallopt(M_MMAP_THRESHOLD, threshold):
            return bool(mallopt(M_TRIM_THRESHOLD, 2 * threshold))
    return False


def process_age() -> float | None:
    """Seconds since this process started, from Linux's /proc (10 ms ticks); None where there is none."""
    try:
        after_name = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()   # a name may hold spaces
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return round(uptime - int(after_name[19]) / os.sysconf("SC_CLK_TCK"), 3)   # field 22: start time
    except (OSError, ValueError, IndexError):
        return None


def set_deterministic(enabled: bool) -> None:
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # warn_only: a CUDA op without a deterministic kernel warns instead of stopping a long run. The call
    # imports torch's compiler stack (a second of start-up), so it is skipped when nothing changes.
    if enabled or torch.are_deterministic_algorithms_enabled():
        torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled


@dataclass
class Batch:
    """What a loss function receives. `views[0]` is the first augmented view; `x` is an alias for it."""
    views: list[torch.Tensor]
    y: torch.Tensor
    idx: torch.Tensor
    epoch: int
    step: int                 # batch index within the epoch, 0-based
    steps_per_epoch: int

    @property
    def x(self) -> torch.Tensor:
        return self.views[0]


LossFn = Callable[[Batch], torch.Tensor]
StepHook = Callable[[Batch], None]


@dataclass
class FitCall:
    """One `Engine.fit` call as a recorder sees it: enough to run the phase's training step again outside the
    engine, over the same parameters and the method's own loss (`cilbench bench --method`)."""
    task: int
    phase: str
    params: list                  # as handed to fit: tensors or param-group dicts
    loss_fn: LossFn
    indices: torch.Tensor
    cfg: TrainConfig
    views: int
    modules: list[nn.Module]
    before_step: StepHook | None
    drop_last: bool
    shuffle: bool
    epochs: int
    steps_per_epoch: int
    frozen: Callable[[torch.Tensor], torch.Tensor] | None = None


class FitRecorder(Protocol):
    """Sees every finished epoch of every fit call (attached by `cilbench bench --method` only). Its time is
    not the phase's: fit's seconds and the epoch's own figures leave it out."""

    def after_epoch(self, engine: "Engine", call: FitCall, event: dict) -> None: ...


def flat_params(params: list) -> list[torch.Tensor]:
    """The tensors of a parameter list that may hold param-group dicts."""
    return [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]


@dataclass
class FitResult:
    epochs: int
    final_loss: float
    seconds: float
    images: int = 0
    history: list[float] = field(default_factory=list)


def warmup_length(cfg: TrainConfig, epochs: int) -> int:
    """Warm-up epochs of a phase run for `epochs` epochs: the card's warm-up scaled like the milestones, at least
    one epoch when the card asks for one (an --epochs cap never rounds it away) and never the whole phase."""
    if cfg.warmup_epochs <= 0 or epochs < 2:
        return 0
    return min(max(1, round(cfg.warmup_epochs * epochs / cfg.epochs)), epochs - 1)


def schedule_factor(cfg: TrainConfig, epochs: int, epoch: int) -> float:
    """Learning-rate multiplier for a 0-based epoch. When a phase is capped below its budget the warm-up and
    milestones shrink in proportion, so a short run keeps the schedule's shape. A full-length warm-up ramps
    (e + 1) / w up to full lr; a shortened or one-epoch one ramps (e + 1) / (w + 1), so it still starts below
    full lr (a one-epoch warm-up at full lr would be no warm-up)."""
    scale = epochs / cfg.epochs
    warmup = warmup_length(cfg, epochs)
    if epoch < warmup:
        if cfg.warmup_lr is not None:      # timm: warmup_lr + e * (lr - warmup_lr) / w, from warmup_lr at e = 0
            return (cfg.warmup_lr + epoch * (cfg.lr - cfg.warmup_lr) / warmup) / cfg.lr
        full = warmup > 1 and warmup == cfg.warmup_epochs
        return (epoch + 1) / (warmup if full else warmup + 1)
    e, span = epoch - warmup, max(epochs - warmup, 1)
    if cfg.schedule == "cosine":
        floor = min(cfg.min_lr / cfg.lr, 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * e / span))
    if cfg.schedule == "multistep":
        passed = sum(1 for m in cfg.milestones if e >= round(m * scale))
        return cfg.gamma ** passed
    return 1.0


class _FunctionalOptimizer:
    """Parameter groups and zero_grad as torch.optim.Optimizer keeps them, without its wrappers: its
    `add_param_group`, `zero_grad` and `step` import torch._dynamo (and sympy) on first call, 1.5-2 s of every
    process's start-up on a CPU. What the fit loop uses: `param_groups` (each group's "lr" is set per epoch),
    `zero_grad`, `step`; per-parameter state lives in `state`."""

    def __init__(self, params, defaults: dict):
        params = list(params)
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        self.param_groups = [{**defaults, **group, "params": list(group["params"])} for group in groups]
        seen = [id(p) for group in self.param_groups for p in group["params"]]
        if len(seen) != len(set(seen)):
            raise ValueError("some parameters appear in more than one parameter group")
        self.state: dict[torch.Tensor, object] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.detach_().zero_()


class SGD(_FunctionalOptimizer):
    """torch.optim.SGD's update, computed by torch's own functional `torch.optim.sgd.sgd` with the arguments
    torch.optim.SGD.step passes it (so parameters come out bit for bit the same); momentum buffers in `state`."""

    def __init__(self, params, lr: float, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0):
        if nesterov and momentum <= 0:
            raise ValueError("Nesterov momentum requires a momentum")
        super().__init__(params, {"lr": lr, "momentum": momentum, "dampening": 0.0, "nesterov": nesterov,
                                  "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            buffers = [self.state.get(p) for p in params]
            functional_sgd(params, [p.grad for p in params], buffers, weight_decay=group["weight_decay"],
                           momentum=group["momentum"], lr=group["lr"], dampening=group["dampening"],
                           nesterov=group["nesterov"], maximize=False)
            if group["momentum"] != 0:
                self.state.update(zip(params, buffers))     # sgd() fills in the buffers it created


class Adam(_FunctionalOptimizer):
    """torch.optim.Adam (decoupled=False) and torch.optim.AdamW (decoupled=True) with their default betas and
    eps, computed by torch's functional `adam` with the arguments their step passes it (parameters come out bit
    for bit the same, tested), without torch.optim.Optimizer's dynamo import. State per parameter: step count
    (a CPU float32 scalar tensor, as torch keeps it), first and second moments."""

    def __init__(self, params, lr: float, weight_decay: float = 0.0, decoupled: bool = False,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                                  "decoupled_weight_decay": decoupled})

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p not in self.state:
                    self.state[p] = {"step": torch.tensor(0.0, dtype=torch.float32),
                                     "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                     "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
            states = [self.state[p] for p in params]
            beta1, beta2 = group["betas"]
            functional_adam(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                            [s["exp_avg_sq"] for s in states], [], [s["step"] for s in states],
                            foreach=None, capturable=False, differentiable=False, fused=None, grad_scale=None,
                            found_inf=None, has_complex=False, amsgrad=False, beta1=beta1, beta2=beta2,
                            lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
                            decoupled_weight_decay=group["decoupled_weight_decay"])


def make_optimizer(params, cfg: TrainConfig) -> SGD | Adam:
    if cfg.optimizer == "sgd":
        return SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    return Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, decoupled=cfg.optimizer == "adamw")


class Engine:
    def __init__(self, stream: Stream, options: RuntimeOptions, device: torch.device,
                 on_epoch: Callable[[dict], None] | None = None):
        self.stream = stream
        self.options = options
        self.device = device
        self.cuda = device.type == "cuda"
        self.channels_last = options.channels_last and self.cuda
        self.amp = options.amp and self.cuda       # bf16 autocast in training only; apply() stays float32
        self.augmenter = Augmenter(stream.protocol.augment, stream.image_shape[0], device, self.channels_last)
        self.order_gen = torch.Generator()
        self.device_gen = torch.Generator(device=device)   # draws that stay on the device (reservoir, replay)
        self.on_epoch = on_epoch
        self.task = 0
        self.fit_seconds = 0.0       # time inside fit() since the run started (the rest of learn() is statistics)
        self.recorder: FitRecorder | None = None   # off in runs: one `is None` test per epoch is its whole cost
        self.recorder_seconds = 0.0  # time the recorder took, which is not the run's
        self.first_step_age: float | None = None   # process age when the first training step began (start-up)

    @property
    def frozen_chunk(self) -> int:
        """Images per forward of a frozen network inside a training step (nets.frozen_forward): the CPU
        inference chunk; 0 (the whole batch) on CUDA, where bigger batches only help."""
        return 0 if self.cuda else self.inference_batch_size()

    def inference_batch_size(self, requested: int | None = None) -> int:
        """Images per inference forward: an explicit request, runtime.inference_batch, or the auto rule."""
        if requested:
            return requested
        if self.options.inference_batch:
            return self.options.inference_batch
        card = self.stream.protocol.eval_batch_size
        if self.cuda:
            return card
        height, width = self.stream.image_shape[1:]
        aug = self.stream.protocol.augment
        if aug.resize:          # the network sees the resized (and centre-cropped) images
            height = width = aug.crop or aug.resize
        return max(8, min(card, CPU_INFERENCE_PIXELS // (height * width)))

    # --- seeding ------------------------------------------------------------------------------------
    def begin_task(self, seed: int, task: int) -> None:
        """Reseed every generator from (seed, task): a resumed run replays exactly what a full run does."""
        self.task = task
        task_seed = seed * 100_003 + task
        torch.manual_seed(task_seed)
        self.order_gen.manual_seed(task_seed)
        self.augmenter.seed(task_seed + 1)
        self.device_gen.manual_seed(task_seed + 2)

    # --- modules ------------------------------------------------------------------------------------
    def prepare(self, module: nn.Module) -> nn.Module:
        """Move a network to the device (channels_last on CUDA) and compile it if asked."""
        module = module.to(self.device)
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        if self.options.compile:
            module.compile()
        return module

    def autocast(self):
        """bf16 autocast for the training forward pass (CUDA with amp; tests may switch `amp` on for CPU)."""
        if self.amp:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def epochs_for(self, cfg: TrainConfig) -> int:
        cap = self.options.max_epochs
        return min(cfg.epochs, cap) if cap else cfg.epochs

    # --- data ---------------------------------------------------------------------------------------
    def batches(self, indices: torch.Tensor, batch_size: int, shuffle: bool, drop_last: bool = False):
        n = len(indices)
        order = torch.randperm(n, generator=self.order_gen) if shuffle else torch.arange(n)
        order = order.to(indices.device)
        stop = n - n % batch_size if (drop_last and n >= batch_size) else n
        for start in range(0, stop, batch_size):
            yield indices[order[start:start + batch_size]]

    def augmenter_for(self, cfg: AugmentConfig) -> Augmenter:
        """A second augmentation (a method's own, e.g. PCR's strong view) that draws from the run's augmentation
        generator, so the per-task reseeding covers it and runs stay reproducible."""
        return Augmenter(cfg, self.stream.image_shape[0], self.device, self.channels_last, generator=self.augmenter.gen)

    def train_transform(self, images: torch.Tensor) -> torch.Tensor:
        """The card's training augmentation of a uint8 batch."""
        return self.augmenter.train(images)

    def test_transform(self, images: torch.Tensor) -> torch.Tensor:
        """The card's test transform (normalise, centre-crop) of a uint8 batch."""
        return self.augmenter.test(images)

    def train_views(self, idx: torch.Tensor, views: int = 1) -> tuple[list[torch.Tensor], torch.Tensor]:
        images = self.stream.train.images[idx]
        labels = self.stream.train.labels[idx].to(self.device, non_blocking=True)
        return [self.augmenter.train(images) for _ in range(views)], labels

    def epoch_batches(self, indices: torch.Tensor, batch_size: int, views: int, shuffle: bool, drop_last: bool,
                      frozen: Callable[[torch.Tensor], torch.Tensor] | None = None):
        """(idx, views, labels) of each batch of one epoch. With `frozen`, a block of batches is augmented ahead
        and sent through the frozen network at once: the generators are drawn in the same order as batch by
        batch, since the steps between never draw from them."""
        order = self.batches(indices, batch_size, shuffle, drop_last)
        if frozen is None:
            for idx in order:
                yield idx, *self.train_views(idx, views)
            return
        block, per_block = [], self.frozen_block_batches(batch_size)
        for idx in order:
            block.append((idx, *self.train_views(idx, views)))
            if len(block) == per_block:
                yield from self._through_frozen(block, frozen)
                block = []
        yield from self._through_frozen(block, frozen)

    def frozen_block_batches(self, batch_size: int) -> int:
        """Batches per frozen forward of `fit(frozen=...)`: as many as one inference forward holds."""
        return max(1, self.inference_batch_size() // batch_size)

    def _through_frozen(self, block: list[tuple], frozen: Callable[[torch.Tensor], torch.Tensor]) -> list[tuple]:
        if not block:
            return []
        outputs = self.frozen_views(frozen, [views_x for _, views_x, _ in block])
        return [(idx, out, y) for (idx, _, y), out in zip(block, outputs)]

    def frozen_views(self, frozen: Callable[[torch.Tensor], torch.Tensor],
                     views_per_batch: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
        """frozen(view) for every view of every batch under no_grad and the training autocast (as it would run
        inside the loss), frozen_chunk images per forward."""
        flat = [v for views_x in views_per_batch for v in views_x]
        images = torch.cat(flat)
        chunk = self.frozen_chunk or len(images)
        with torch.no_grad(), self.autocast():
            out = torch.cat([frozen(part) for part in images.split(chunk)])
        parts = iter(out.split([len(v) for v in flat]))
        return [[next(parts) for _ in views_x] for views_x in views_per_batch]

    # --- training -----------------------------------------------------------------------------------
    def fit(self, params: Iterable, loss_fn: LossFn, indices: torch.Tensor, cfg: TrainConfig, *,
            phase: str = "train", views: int = 1, modules: Iterable[nn.Module] = (),
            before_step: StepHook | None = None, after_step: StepHook | None = None, drop_last: bool = False,
            shuffle: bool = True, epoch_extras: Callable[[], dict] | None = None,
            frozen: Callable[[torch.Tensor], torch.Tensor] | None = None) -> FitResult:
        """Train `params` to minimise `loss_fn` over `indices` (into the stream's train split).

        `modules` are put in train mode at every epoch start (frozen parts of an ExtractorStack stay in eval).
        `before_step` runs between backward and the optimiser step (gradient surgery, e.g. DER's mask
        gradient compensation); `after_step` after it (online replay updates its buffer there).
        `epoch_extras` is called at each epoch's end; its entries join that epoch's event (a method's loss
        parts, e.g. EXACFS's old/new distillation contributions).
        `frozen`: a frozen network (eval mode, nothing of it trained) that every input passes through first, as in a
        classifier stage on frozen extractors. The loss then receives its outputs as the batch's views, computed
        under no_grad for several batches in one forward (`frozen_views`): the same images and the same steps,
        with fewer and larger frozen forwards, which is what small images on a CPU are short of. Such a loss must
        not draw from the run's augmentation generator (the block is augmented ahead of its steps).
        """
        if isinstance(frozen, nn.Module) and frozen.training:
            raise ValueError(f"fit(frozen=...) of phase {phase!r}: the frozen network is in train mode; call .eval() "
                             "on it first (its BN statistics would otherwise depend on the block)")
        start = time.perf_counter()
        params = list(params)
        modules = list(modules)
        optimizer = make_optimizer(params, cfg)
        flat = flat_params(params)
        epochs = self.epochs_for(cfg)
        steps = math.ceil(len(indices) / cfg.batch_size) if not drop_last else max(len(indices) // cfg.batch_size, 1)
        if self.first_step_age is None:   # after the first optimiser: its one-off import is start-up too
            self.first_step_age = process_age()
        call = None
        if self.recorder is not None:
            call = FitCall(self.task, phase, params, loss_fn, indices, cfg, views, modules, before_step,
                           drop_last, shuffle, epochs, steps, frozen)
        result = FitResult(epochs=epochs, final_loss=float("nan"), seconds=0.0)
        initial_loss = None     # the first batch's loss, before any update: the phase's reference level
        for epoch in range(epochs):
            factor = schedule_factor(cfg, epochs, epoch)
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * factor
            for m in modules:
                m.train()
            t0, seen = time.perf_counter(), 0
            loss_sum = torch.zeros((), device=self.device)
            for step, (idx, views_x, y) in enumerate(self.epoch_batches(indices, cfg.batch_size, views, shuffle,
                                                                        drop_last, frozen)):
                batch = Batch(views_x, y, idx, epoch, step, steps)
                with self.autocast():
                    loss = loss_fn(batch)
                if initial_loss is None:
                    initial_loss = float(loss.detach())   # one sync per phase
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if before_step is not None:
                    before_step(batch)
                if cfg.clip_norm:
                    torch.nn.utils.clip_grad_norm_(flat, cfg.clip_norm)
                optimizer.step()
                if after_step is not None:
                    after_step(batch)
                loss_sum += loss.detach().float()
                seen += len(idx)
            mean_loss = float(loss_sum) / max(steps, 1)   # one sync per epoch
            if not math.isfinite(mean_loss):
                raise TrainingDiverged(self.task, epoch, phase)
            self.check_divergence(mean_loss, initial_loss, epoch, phase)
            seconds = time.perf_counter() - t0
            result.history.append(mean_loss)
            result.images += seen
            extras = epoch_extras() if epoch_extras is not None else {}
            event = {"task": self.task, "phase": phase, "epoch": epoch, "epochs": epochs, "loss": mean_loss,
                     "lr": cfg.lr * factor, "seconds": seconds, "images_per_s": seen / max(seconds, 1e-9), **extras}
            if self.on_epoch is not None:
                self.on_epoch(event)
            if call is not None:
                start += self._hand_to_recorder(call, event)
        result.final_loss = result.history[-1] if result.history else float("nan")
        result.seconds = time.perf_counter() - start
        self.fit_seconds += result.seconds
        return result

    def _hand_to_recorder(self, call: FitCall, event: dict) -> float:
        """Show the recorder a finished epoch; its seconds, which the caller leaves out of the phase's."""
        t0 = time.perf_counter()
        self.recorder.after_epoch(self, call, event)
        seconds = time.perf_counter() - t0
        self.recorder_seconds += seconds
        return seconds

    def check_divergence(self, mean_loss: float, initial_loss: float | None, epoch: int, phase: str) -> None:
        """A finite loss that explodes (e.g. 1e28 with an lr too large) leaves chance accuracy behind, which
        must not be reported as a complete run. The floor of 1 keeps phases that start near zero loss from
        tripping on ordinary noise."""
        factor = self.options.divergence_factor
        if not factor or initial_loss is None or not math.isfinite(initial_loss):
            return
        reference = max(abs(initial_loss), 1.0)
        if mean_loss > factor * reference:
            raise TrainingDiverged(self.task, epoch, phase, loss=mean_loss, reference=reference, factor=factor)

    # --- inference ----------------------------------------------------------------------------------
    @torch.no_grad()
    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor | tuple], indices: torch.Tensor, split: str = "train",
              batch_size: int | None = None) -> torch.Tensor | tuple:
        """fn over test-transformed images of `split` at `indices`, batched, concatenated, computed in float32
        even where training uses bf16 autocast: bf16 scores tie (an exact top-1 tie goes to the lowest label,
        an old class) and bf16 features change which exemplars herding picks. A tuple from fn (several views of
        one forward) gives a tuple of concatenations; a None in it stays None."""
        data = getattr(self.stream, split)
        batch_size = self.inference_batch_size(batch_size)
        outs = []
        for start in range(0, len(indices), batch_size):
            idx = indices[start:start + batch_size]
            with full_precision(self.device):
                outs.append(fn(self.augmenter.test(data.images[idx])))
        if not outs:
            return torch.empty(0, device=self.device)
        if isinstance(outs[0], tuple):
            return tuple(None if part is None else torch.cat([out[i].float() for out in outs])
                         for i, part in enumerate(outs[0]))
        return torch.cat([out.float() for out in outs])


def phase_config(base: TrainConfig, **changes) -> TrainConfig:
    """A training phase derived from the protocol's budget (e.g. KD: weight_decay=0, epochs=130)."""
    return replace(base, **changes)


def _fp32_switches() -> list[tuple[object, str]]:
    """The backend flags that let CUDA run float32 convolutions and matmuls in TF32: torch's newer per-backend
    `fp32_precision` (cuDNN convolutions default to TF32), else the legacy `allow_tf32` pair."""
    conv = getattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision", None)
    if conv is not None:
        return [(torch.backends.cudnn.conv, "fp32_precision"), (torch.backends.cuda.matmul, "fp32_precision")]
    return [(torch.backends.cudnn, "allow_tf32"), (torch.backends.cuda.matmul, "allow_tf32")]


@contextlib.contextmanager
def full_precision(device: torch.device):
    """A region of true float32 maths for what is measured rather than trained (evaluation scores, herding
    features, Gaussian statistics, feature significance): autocast off, and TF32 off for cuDNN convolutions
    and CUDA matmuls (on Ampere and later, torch lets cuDNN run float32 convolutions in TF32 by default).
    The flags are restored afterwards, so training keeps its fast path. On the CPU the flags change nothing."""
    switches = _fp32_switches()
    saved = [getattr(obj, name) for obj, name in switches]
    try:
        for obj, name in switches:
            setattr(obj, name, "ieee" if name == "fp32_precision" else False)
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        for (obj, name), value in zip(switches, saved):
            setattr(obj, name, value)


@torch.no_grad()
def features_with_flips(engine: Engine, fn: Callable[[torch.Tensor], torch.Tensor], indices: torch.Tensor,
                        split: str = "train", batch_size: int | None = None) -> torch.Tensor:
    """fn over the test-transformed images of `split` at `indices` and over their horizontal flips, in float32
    with autocast off: 2N rows, the N originals first. The data SEED fits its class Gaussians on."""
    data = getattr(engine.stream, split)
    batch_size = engine.inference_batch_size(batch_size)
    plain, flipped = [], []
    with full_precision(engine.device):
        for start in range(0, len(indices), batch_size):
            x = engine.augmenter.test(data.images[indices[start:start + batch_size]]).float()
            plain.append(fn(x).float())
            flipped.append(fn(torch.flip(x, dims=(3,))).float())
    if not plain:
        return torch.empty(0, device=engine.device)
    return torch.cat(plain + flipped)
