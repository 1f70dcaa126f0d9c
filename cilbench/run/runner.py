"""One run: resolve the config, build stream/engine/memory/method, learn task by task, evaluate, store."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime as dt
import os
import platform
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cilbench import __version__
from cilbench.config import apply_override, build, flatten, parse_override, to_dict
from cilbench.data.datasets import image_channels, image_side, load_dataset
from cilbench.data.protocol import Protocol, build_protocol, card_path, load_card, order_for_seed, with_method_augment
from cilbench.data.stream import Stream, Task
from cilbench.errors import Terminated, TrainingDiverged, UserError
from cilbench.kit.backbone_card import check_backbone, check_backbone_config
from cilbench.kit.contract import Context, Method
from cilbench.kit.registry import Entry, get_method
from cilbench.kit.timm_backbones import is_timm
from cilbench.provenance import git_commit
from cilbench.run.lock import RunLock
from cilbench.run.metrics import summarize
from cilbench.run.rundir import RunStore, check_out_root, damaged, run_dir
from cilbench.safeio import check_component
from cilbench.train.engine import Engine, FitRecorder, RuntimeOptions, explain_device, set_deterministic, tune_malloc
from cilbench.train.memory import ExemplarMemory, make_memory


@dataclass
class RunRequest:
    method: str
    protocol: str
    seed: int = 0
    overrides: list[str] = field(default_factory=list)
    epochs: int | None = None
    device: str = "auto"
    data_root: str | None = None
    out: str = "results/runs"
    tag: str | None = None
    resume: bool = False
    force: bool = False
    deterministic: bool = False
    stop_after: int | None = None
    quiet: bool = False


@dataclass
class Resolved:
    entry: Entry
    protocol: Protocol
    method_cfg: Any
    runtime: RuntimeOptions
    run_name: str
    config: dict


def _deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _drop_factory_width(card: dict, overrides: list[str]) -> None:
    """`--set backbone.name=timm:<model>` swaps the card's ResNet for a timm model: the card's `width`, set for
    its ResNet, does not carry over (a width given with --set still does, and is refused for a timm model)."""
    keys = {".".join(parse_override(text)[0]) for text in overrides}
    backbone = card.get("backbone")
    if "backbone.name" in keys and "backbone.width" not in keys and isinstance(backbone, dict) \
            and is_timm(backbone.get("name")):
        backbone.pop("width", None)


def resolve(request: RunRequest) -> Resolved:
    entry = get_method(request.method)
    cls = entry.cls
    card = load_card(request.protocol)
    card_file = str(card_path(request.protocol))
    sections = {request.method, cls.family}
    method_cli: dict = {}
    runtime_cli: dict = {}
    for text in request.overrides:
        path, value = parse_override(text)
        if path[0] in sections:
            if len(path) < 2:
                raise UserError(f"--set {text}: name a key of {path[0]}, e.g. --set {path[0]}.<key>=<value>")
            apply_override(method_cli, path[1:], value)
        elif path[0] == "runtime":
            apply_override(runtime_cli, path[1:], value)
        elif path[0] == "methods":
            raise UserError(f"--set {text}: set method options as {request.method}.<key>=<value>")
        else:
            apply_override(card, path, value)
    _drop_factory_width(card, request.overrides)
    where = card_file if not request.overrides else f"{card_file} (with --set)"
    protocol = build_protocol(card, where)
    protocol, class_order = order_for_seed(protocol, request.seed, where)
    protocol = with_method_augment(protocol, [cls.family, request.method], where)
    if protocol.regime not in cls.regimes:
        raise UserError(f"method '{request.method}' supports the {'/'.join(cls.regimes)} regime, protocol "
                        f"'{protocol.name}' is {protocol.regime}; pick a protocol of a supported regime")
    from_card = _deep_merge(protocol.methods.get(cls.family, {}), protocol.methods.get(request.method, {}))
    build(cls.Config, _deep_merge(entry.defaults, from_card), card_file, prefix=f"methods.{cls.family}.")
    method_cfg = build(cls.Config, _deep_merge(_deep_merge(entry.defaults, from_card), method_cli), "--set",
                       prefix=f"{request.method}.")
    protocol = dataclasses.replace(protocol, augment=cls.augmentation(method_cfg, protocol.augment,
                                                                      image_side(protocol)))
    side = protocol.augment.resize or image_side(protocol)
    if protocol.augment.crop > side:
        raise UserError(f"{where}: augment.crop={protocol.augment.crop} is larger than the {side}-pixel images it "
                        f"crops; set augment.crop <= {side} (or augment.resize >= the crop)")
    runtime_base = {"device": request.device, "deterministic": request.deterministic,
                    "max_epochs": request.epochs}
    runtime = build(RuntimeOptions, _deep_merge(runtime_base, runtime_cli), "--set", prefix="runtime.")
    check_component(request.method, "method")
    if request.tag is not None:
        check_component(request.tag, "--tag")
    parts = [request.method, cls.run_tag(method_cfg), request.tag]
    run_name = "+".join(p for p in parts if p)
    check_component(run_name, "run name")
    backbone = check_backbone(protocol.backbone, image_channels(protocol), request.method,
                              cls.backbone_needs(method_cfg), where)
    config = {"method": request.method, "method_display": cls.display_name or request.method,
              "method_backbone": cls.architecture(method_cfg, protocol.backbone.name),
              "method_source": entry.source, "run_name": run_name, "seed": request.seed,
              "protocol": to_dict(protocol), "method_config": to_dict(method_cfg), "runtime": to_dict(runtime),
              "class_order": class_order, "backbone_provenance": backbone}
    return Resolved(entry, protocol, method_cfg, runtime, run_name, config)


def _job_info() -> dict:
    """The Slurm job this run executes in and its log files (set by the sweep's job): a sweep on another host
    asks Slurm whether that job is alive, and --status points at the log."""
    env = os.environ
    job = env.get("SLURM_JOB_ID")
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        job = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"   # the id squeue and sacct show
    logs = env.get("CILBENCH_JOB_LOGS")
    return {"slurm_job_id": job, "job_logs": logs.split(os.pathsep) if logs else None}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@torch.no_grad()
def evaluate(method: Method, stream: Stream, engine: Engine, task: Task):
    """Top-1/top-5 over all seen classes, one row of the accuracy matrices (percent) and, for a method with a
    task-aware view, {"top1_task_aware": ...}: every view from one forward of each network over the test set."""
    method.eval()
    idx = task.test_idx
    bounds = list(stream.bounds[: task.index + 2])
    scores, aware = engine.apply(lambda x: method.scores_with_task_aware(x, bounds), idx, split="test")
    if scores.shape[1] != task.n_seen or (aware is not None and aware.shape != scores.shape):
        raise RuntimeError(f"{method.name}.scores_with_task_aware returned {scores.shape[1]} columns, expected "
                           f"{task.n_seen} (and task-aware scores of the same shape)")
    labels = stream.test.labels[idx].to(scores.device)
    k = min(5, task.n_seen)
    topk = scores.topk(k, dim=1).indices
    correct1 = (topk[:, 0] == labels).float()
    correct5 = (topk == labels[:, None]).any(dim=1).float()
    task_ids = stream.task_of_label.to(scores.device)[labels]
    row, row5 = [], []
    for j in range(task.index + 1):
        mask = task_ids == j
        row.append(100 * float(correct1[mask].mean()))
        row5.append(100 * float(correct5[mask].mean()))
    extras = {} if aware is None else {"top1_task_aware": task_aware_top1(aware, labels, task_ids, bounds)}
    return 100 * float(correct1.mean()), 100 * float(correct5.mean()), row, row5, extras


def task_aware_top1(aware: torch.Tensor, labels: torch.Tensor, task_ids: torch.Tensor, bounds: list[int]) -> float:
    """Percent of samples whose best column within their own task's block is their label (ties: the lowest
    label, as an argmax over the block alone)."""
    edges = torch.tensor(bounds, device=aware.device)
    lo, hi = edges[task_ids], edges[task_ids + 1]
    columns = torch.arange(aware.shape[1], device=aware.device)
    own = (columns >= lo[:, None]) & (columns < hi[:, None])
    pred = aware.masked_fill(~own, float("-inf")).argmax(dim=1)
    correct = float((pred == labels).sum())
    return round(100 * correct / max(len(labels), 1), 4)


class Reporter:
    """Progress on the terminal: a bar per task and epoch when interactive, a line per task otherwise."""

    def __init__(self, quiet: bool, total_tasks: int):
        self.quiet = quiet
        self.interactive = sys.stderr.isatty() and not quiet
        self.progress = None
        self.bar = None
        if self.interactive:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                     TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                                     TextColumn("{task.fields[info]}"), transient=True)
            self.tasks_bar = self.progress.add_task("tasks", total=total_tasks, info="")
            self.progress.start()

    def epoch(self, event: dict) -> None:
        if not self.progress:
            return
        key = (event["task"], event["phase"])
        if self.bar is None or self.bar[0] != key:
            if self.bar is not None:
                self.progress.remove_task(self.bar[1])
            bar = self.progress.add_task(f"task {event['task'] + 1} {event['phase']}", total=event["epochs"], info="")
            self.bar = (key, bar)
        self.progress.update(self.bar[1], completed=event["epoch"] + 1,
                             info=f"loss {event['loss']:.3f} lr {event['lr']:.4f}")

    def message(self, line: str) -> None:
        """A method's progress message (ctx.log)."""
        if self.progress:
            self.progress.console.print(line, highlight=False)
        elif not self.quiet:
            print(line, file=sys.stderr, flush=True)

    def task_done(self, line: str) -> None:
        if self.progress:
            self.progress.advance(self.tasks_bar)
            self.progress.console.print(line)
        elif not self.quiet:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.progress:
            self.progress.stop()


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM (how Slurm and most schedulers pre-empt) raises Terminated, which the run handles like Ctrl-C:
    files finish writing, the run is marked interrupted and can be resumed. Later SIGTERMs are ignored while
    that happens; the previous handler comes back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def execute(request: RunRequest, recorder: FitRecorder | None = None) -> Path:
    """One run, in named steps: resolve, restore (on --resume), set up, learn task by task, finish. A
    `recorder` sees every epoch of every fit call (`cilbench bench --method`); runs have none."""
    resolved = resolve(request)
    root = check_out_root(request.out)
    store = RunStore(run_dir(root, resolved.protocol.name, resolved.run_name, request.seed), root=root)
    store.check_inside_root()   # before the lock file is written: a linked-away run directory is refused
    with RunLock(store.path), sigterm_as_interrupt():   # one process per run directory
        session = RunSession(request, resolved, store, recorder)
        checkpoint = session.restore()
        session.set_up(checkpoint)
        return session.learn_all()


class RunSession:
    """The state of one run while it executes. The manifest's status changes only in `mark`."""

    def __init__(self, request: RunRequest, resolved: Resolved, store: RunStore, recorder: FitRecorder | None = None):
        self.request, self.resolved, self.store = request, resolved, store
        self.recorder = recorder
        self.started = time.perf_counter()
        self.device, self.device_reason = explain_device(resolved.runtime.device)
        if not request.quiet:
            print(f"device: {self.device_reason}", file=sys.stderr, flush=True)
        self.steps: list[dict] = []
        self.acc: list[list[float]] = []
        self.acc5: list[list[float]] = []
        self.start_task = 0
        self.timing = dict.fromkeys(TIME_PARTS, 0.0)     # seconds over the run, resumed parts included
        self.wall_before = 0.0                           # wall seconds of the processes before a resume
        self.manifest: dict = {}

    # --- restore ------------------------------------------------------------------------------------
    def restore(self) -> dict | None:
        """On --resume: the stored config must match and the checkpoint must be this run's; else the
        directory must be free (or --force)."""
        request, store = self.request, self.store
        if not (request.resume and store.exists()):
            store.check_free(force=request.force)
            return None
        _check_same_config(store.read_config(), self.resolved.config)
        checkpoint = store.load_checkpoint(self.device)
        manifest = store.read_manifest() if (store.path / "manifest.json").exists() else {}
        if manifest.get("status") == "complete":
            raise UserError(f"run {store.path} is already complete; use --force to run it again")
        if checkpoint is None and manifest.get("tasks_done"):
            raise damaged(store.path / "checkpoint.pt", f"missing, but manifest.json says "
                          f"{manifest['tasks_done']} task(s) are done")
        if checkpoint is not None and checkpoint.get("run_name", self.resolved.run_name) != self.resolved.run_name:
            raise damaged(store.path / "checkpoint.pt", f"written by run '{checkpoint['run_name']}', "
                          f"not '{self.resolved.run_name}'")
        return checkpoint

    # --- set up -------------------------------------------------------------------------------------
    def set_up(self, checkpoint: dict | None) -> None:
        """Runtime switches, data, stream, memory, engine, method; then the method's and memory's state
        from the checkpoint. Data and method come before any file is written: missing data or options the
        method rejects leave nothing behind."""
        request, resolved, store = self.request, self.resolved, self.store
        runtime, cls = resolved.runtime, resolved.entry.cls
        set_deterministic(runtime.deterministic)
        if runtime.tune_malloc and self.device.type == "cpu":
            tune_malloc()
        if runtime.threads:
            torch.set_num_threads(runtime.threads)
        dataset = load_dataset(resolved.protocol, request.data_root)
        self.stream = stream = Stream(resolved.protocol, dataset, self.device)
        self.storage = stream.train.labels.device          # memory indices live where the images do
        self.memory = make_memory(resolved.protocol.memory, self.storage) if cls.uses_exemplars else None
        self.reporter = Reporter(request.quiet, stream.num_tasks)
        self.engine = Engine(stream, runtime, self.device, on_epoch=self._on_epoch)
        self.engine.recorder = self.recorder
        self.ctx = Context(resolved.protocol, stream, self.engine, self.memory, self.device, request.seed,
                           log_sink=self._on_message)
        self.engine.begin_task(request.seed, 0)
        try:
            self.method = cls(resolved.method_cfg, self.ctx)
        except UserError:
            self.reporter.close()
            raise
        if checkpoint is None:   # a new run, or one interrupted before its first task finished: start afresh
            store.create(force=request.force or request.resume)
            store.write_config(resolved.config)
        else:
            self._load(checkpoint)
        self.manifest = self._new_manifest()
        store.write_manifest(self.manifest)

    def _load(self, checkpoint: dict) -> None:
        try:
            self.method.load_state_dict(checkpoint["method"])
            if self.memory is not None and checkpoint["memory"] is not None:
                self.memory.load_state_dict(checkpoint["memory"], self.storage)
        except Exception as exc:   # another method's or another configuration's state
            self.reporter.close()
            raise damaged(self.store.path / "checkpoint.pt", f"does not fit method '{self.request.method}' "
                          f"({type(exc).__name__})") from None
        self.steps, self.acc, self.acc5 = checkpoint["steps"], checkpoint["acc"], checkpoint["acc5"]
        self.start_task = checkpoint["next_task"]
        self.timing.update(checkpoint.get("timing", {}))
        self.wall_before = self.timing["wall"]
        self.store.truncate_events(self.start_task)

    def _new_manifest(self) -> dict:
        request, device = self.request, self.device
        return {
            "status": "running", "method": request.method, "run_name": self.resolved.run_name,
            "protocol": self.resolved.protocol.name, "seed": request.seed, "tag": request.tag,
            "cilbench_version": __version__, "cilbench_commit": git_commit(Path(__file__)) or "unknown",
            "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "device_reason": self.device_reason,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or "cpu",
            "deterministic": self.resolved.runtime.deterministic, "started": _now(), "finished": None,
            "host": socket.gethostname(), "pid": os.getpid(),   # lets `cilbench sweep` tell a dead run from a live one
            "tasks_done": self.start_task, "tasks_total": self.stream.num_tasks, "error": None, **_job_info(),
        }

    def _on_epoch(self, event: dict) -> None:
        self.store.append_event(event)
        self.reporter.epoch(event)

    def _on_message(self, message: str) -> None:
        self.store.append_event({"task": self.engine.task, "kind": "message", "message": message})
        self.reporter.message(message)

    # --- status -------------------------------------------------------------------------------------
    def mark(self, status: str, error: str | None = None, finished: bool = False, **fields) -> None:
        """The one place a run's status changes: running -> interrupted | failed | complete."""
        self.manifest.update(status=status, error=error, **fields)
        if finished:
            self.manifest["finished"] = _now()
        self.store.write_manifest(self.manifest)

    # --- the task loop ------------------------------------------------------------------------------
    def learn_all(self) -> Path:
        request, stream = self.request, self.stream
        try:
            for t in range(self.start_task, stream.num_tasks):
                self.run_task(t)
                if request.stop_after and t + 1 >= request.stop_after and t + 1 < stream.num_tasks:
                    self.mark("interrupted", f"stopped after task {t + 1} (--stop-after)")
                    return self.store.path
        except TrainingDiverged as exc:
            self.mark("failed", str(exc), finished=True)
            raise
        except KeyboardInterrupt as exc:
            how = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
            self.mark("interrupted", f"{how}; continue with --resume")
            raise
        except Exception as exc:   # out of memory, a method's error, ...: never leave the run marked running
            self.mark("failed", f"{type(exc).__name__}: {exc}", finished=True)
            raise
        finally:
            self.reporter.close()
        self.finish()
        return self.store.path

    def run_task(self, t: int) -> None:
        """Learn task t, let the harness select exemplars, evaluate, record the step and checkpoint."""
        stream, engine, memory, method, store = self.stream, self.engine, self.memory, self.method, self.store
        task = stream.task(t)
        engine.begin_task(self.request.seed, t)
        t0, fit0, aside0 = time.perf_counter(), engine.fit_seconds, engine.recorder_seconds
        select0 = self.ctx.selection_seconds
        method.learn(task, self.ctx)
        aside = engine.recorder_seconds - aside0       # a recorder's bare windows (bench) are not the run's time
        self.started += aside
        t0 += aside
        selected_s = self.ctx.selection_seconds - select0    # exemplars the method selected inside learn()
        learn_s, fit_s = time.perf_counter() - t0 - selected_s, engine.fit_seconds - fit0
        if isinstance(memory, ExemplarMemory):
            method.eval()
            if not memory.holds(task.classes):     # unless the method selected them in learn()
                memory.update(task.classes, stream.class_indices,
                              lambda idx: engine.apply(method.features, idx), engine.order_gen)
            method.after_memory_update(task, self.ctx)
        train_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        top1, top5, row, row5, aware = evaluate(method, stream, engine, task)
        extras = {**aware, **method.step_record()}
        eval_s = time.perf_counter() - t1
        parts = {"fit": fit_s, "statistics": learn_s - fit_s, "herding": train_s - learn_s, "eval": eval_s}
        footprint = method.inference_footprint()
        self.steps.append(self._step_row(task, top1, top5, footprint, train_s, eval_s, parts, extras))
        self.acc.append(row)
        self.acc5.append(row5)
        t2 = time.perf_counter()
        for key, value in parts.items():
            self.timing[key] += value
        self.timing["wall"] = self.wall_before + t2 - self.started
        store.write_steps(self.steps)
        store.write_matrix("acc_matrix.csv", self.acc)
        store.write_matrix("acc_matrix_top5.csv", self.acc5)
        store.save_checkpoint({"next_task": t + 1, "run_name": self.resolved.run_name,
                               "method": method.state_dict(),
                               "memory": memory.state_dict() if memory is not None else None,
                               "steps": self.steps, "acc": self.acc, "acc5": self.acc5,
                               "timing": dict(self.timing)})
        self.timing["checkpoint"] += time.perf_counter() - t2
        self.manifest["tasks_done"] = t + 1
        store.write_manifest(self.manifest)
        self.reporter.task_done(f"task {t + 1}/{stream.num_tasks}: {task.n_seen} classes, top-1 {top1:.2f}, "
                                f"top-5 {top5:.2f}, {footprint.extractors} extractor(s), "
                                f"{footprint.params / 1e6:.3f}M params, train {train_s:.1f}s")

    def _step_row(self, task: Task, top1: float, top5: float, footprint, train_s: float, eval_s: float,
                  parts: dict, extras: dict) -> dict:
        memory = self.memory
        bytes_per_sample = int(torch.tensor(self.stream.image_shape).prod())
        return {"step": task.index, "classes_seen": task.n_seen, "top1": round(top1, 4), "top5": round(top5, 4),
                "extractors": footprint.extractors, "params": footprint.params,
                "memory_size": len(memory) if memory is not None else 0,
                "memory_bytes": memory.nbytes(bytes_per_sample) if memory is not None else 0,
                "memory_payload_bytes": memory.payload_nbytes() if memory is not None else 0,
                "train_seconds": round(train_s, 3), "eval_seconds": round(eval_s, 3),
                "params_backbone": footprint.params_backbone, "params_total": footprint.params,
                **{f"{k}_seconds": round(v, 3) for k, v in parts.items()}, **extras}

    # --- finish -------------------------------------------------------------------------------------
    def finish(self) -> None:
        steps = self.steps
        metrics = summarize([s["top1"] for s in steps], [s["top5"] for s in steps], self.acc, self.acc5)
        metrics.update(params_avg=sum(s["params"] for s in steps) / len(steps), params_last=steps[-1]["params"],
                       extractors_last=steps[-1]["extractors"], **param_counts(steps),
                       train_seconds=sum(s["train_seconds"] for s in steps),
                       eval_seconds=sum(s["eval_seconds"] for s in steps),
                       time_split=time_split(self.timing, self.wall_before + time.perf_counter() - self.started,
                                             self.engine.first_step_age))
        self.store.write_metrics(metrics)
        self.mark("complete", finished=True)


TIME_PARTS = ("wall", "fit", "statistics", "herding", "eval", "checkpoint")


def time_split(timing: dict, wall: float, first_step: float | None = None) -> dict:
    """Where a run's wall time went (seconds): fit (training phases), statistics (the rest of learn():
    Gaussians, significance, prototypes, pruning), herding (exemplar selection and payload), eval,
    checkpoint (state, steps and matrices written), other (data loading, set-up, reporting). Beside the parts,
    not one of them: first_step, seconds from the start of the process (the last one, on a resume) to its first
    training step (imports, data, set-up, the first optimiser; None where the OS does not say)."""
    split = {k: round(timing[k], 3) for k in TIME_PARTS if k != "wall"}
    split["other"] = round(max(wall - sum(timing[k] for k in split), 0.0), 3)
    split["wall"] = round(wall, 3)
    split["first_step"] = first_step
    return split


def param_counts(steps: list[dict]) -> dict:
    """params_total_* (backbones + classifier, = params_*) and params_backbone_* (extractors only, the papers'
    #Params; None when the method does not say) over the steps."""
    out = {}
    for key in ("params_total", "params_backbone"):
        values = [s.get(key) for s in steps]
        known = None not in values and "" not in values
        out[f"{key}_avg"] = sum(values) / len(values) if known else None
        out[f"{key}_last"] = values[-1] if known else None
    return out


# runtime options that change only speed, never a result: a run may be resumed with other values; and what
# only describes the run (where the method's code came from, its display name)
SPEED_ONLY = {"runtime.device", "runtime.tune_malloc"}
# where the weights file lies and which timm built the model: provenance only (the file's sha256 is compared)
PROVENANCE_ONLY = {"protocol.backbone.pretrained", "backbone_provenance.pretrained", "backbone_provenance.timm_version"}
DESCRIPTIVE = ("method_source", "method_display", "method_backbone")


def _check_same_config(stored: dict, current: dict) -> None:
    a, b = flatten(stored), flatten(current)
    defaults = flatten({"runtime": to_dict(RuntimeOptions())})
    for key in sorted(set(a) | set(b)):
        if key in SPEED_ONLY or key in PROVENANCE_ONLY or key.split(".")[0] in DESCRIPTIVE:
            continue
        if key not in a and key in defaults and b.get(key) == defaults[key]:
            continue    # a runtime option added after the run started, at its default: nothing changed
        if a.get(key) != b.get(key):
            raise UserError(f"--resume: '{key}' is {b.get(key)!r} now but {a.get(key)!r} in the stored run; "
                            "resume with the same options or start over with --force")


# What each memory policy and data set reads; `show-protocol` prints only these.
_MEMORY_KEYS = {"fixed_total": ("policy", "total", "selection"), "per_class": ("policy", "per_class", "selection"),
                "reservoir": ("policy", "size"), "none": ("policy",)}
_DATA_KEYS = {"cifar10": ("verify_checksums", "resident"), "cifar100": ("verify_checksums", "resident"),
              "imagenet100": ("image_size", "resident"), "digits": ("test_fraction", "resident"),
              "synthetic": ("synthetic", "resident")}


def resolved_card(protocol_name: str, method: str | None = None, overrides: list[str] | None = None,
                  seed: int = 0) -> dict:
    """The card as a run with `method` and `seed` would use it: overrides and method augmentation applied,
    the class order resolved to its class ids, and only the fields that apply to its memory policy, regime
    and data set; with a method, its resolved options."""
    from cilbench.data.protocol import DATASET_CLASSES, resolve_class_order
    from cilbench.kit.registry import known_methods
    overrides = list(overrides or [])
    method_cfg = None
    if method:
        resolved = resolve(RunRequest(method=method, protocol=protocol_name, seed=seed, overrides=overrides))
        protocol, order, method_cfg = resolved.protocol, resolved.config["class_order"], resolved.method_cfg
    else:
        card = load_card(protocol_name)
        where = str(card_path(protocol_name)) + (" (with --set)" if overrides else "")
        for text in overrides:
            path, value = parse_override(text)
            if path[0] == "runtime" or path[0] in known_methods():
                raise UserError(f"--set {text}: a method or runtime option; add --method to show-protocol")
            apply_override(card, path, value)
        _drop_factory_width(card, overrides)
        protocol, order = order_for_seed(build_protocol(card, where), seed, where)
        check_backbone_config(protocol.backbone, where)
    out = to_dict(protocol)
    out["memory"] = {k: out["memory"][k] for k in _MEMORY_KEYS[protocol.memory.policy]}
    out["data"] = {k: out["data"][k] for k in _DATA_KEYS.get(protocol.dataset, ())}
    if protocol.regime != "online":
        out.pop("online")
    if not protocol.class_orders:
        out.pop("class_orders")
    dataset_classes = DATASET_CLASSES.get(protocol.dataset, protocol.data.synthetic.classes)
    classes = resolve_class_order(protocol.class_order, protocol.num_classes, dataset_classes)
    out["class_order"] = {"name": order["name"], "rule": order["rule"] + (f" (seed {seed})" if seed else ""),
                          "classes": classes}
    out["task_sizes"] = protocol.task_sizes
    out.pop("method_augment")
    if method_cfg is not None:
        out.pop("methods")
        out["method"] = method
        out["method_config"] = to_dict(method_cfg)
    elif not out["methods"]:
        out.pop("methods")
    return out
