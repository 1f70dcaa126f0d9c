"""The `cilbench` command line."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
import yaml

from cilbench import __version__
from cilbench.errors import Terminated, TrainingDiverged, UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Class-incremental learning benchmark: one protocol, one trainer, one metric path.")


def _no_type_noise() -> None:
    """Help without a type column (`<str>`, `<list[str]>`, `<bool>`): each option's help says what it takes; an
    option or argument with a metavar (N, FILE) shows that instead."""
    from typer.core import TyperArgument, TyperOption
    for cls in (TyperOption, TyperArgument):
        cls.display_type_rich = lambda self, ctx: self.metavar or None


_no_type_noise()


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cilbench {__version__}")
        raise typer.Exit()


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


PLUGIN_HELP = "a method of your own: a .py file or package folder (repeatable; also $CILBENCH_PLUGINS)"


def _load_plugins(paths: list[str]) -> None:
    """Load --plugin paths (and $CILBENCH_PLUGINS); every process a run or sweep starts inherits them."""
    from cilbench.kit.registry import load_plugins
    try:
        load_plugins(paths)
    except UserError as exc:
        _fail(str(exc))


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print the version and exit"),
          plugin: List[str] = typer.Option([], "--plugin", help=PLUGIN_HELP)):
    """Class-incremental learning benchmark: one protocol, one trainer, one metric path."""
    if plugin:
        _load_plugins(plugin)


@app.command(epilog="Example: cilbench run --method der --protocol digits_b0s2 --epochs 1")
def run(
    method: str = typer.Option(..., "--method", "-m", help="method name (see `cilbench list`)"),
    protocol: str = typer.Option(..., "--protocol", "-p", help="card name from protocols/ or a YAML path"),
    seed: int = typer.Option(0, help="seed for initialisation, batch order and augmentation"),
    set_: List[str] = typer.Option([], "--set", help="override a config key: train.lr=0.05, der.aux_weight=0.5"),
    epochs: Optional[int] = typer.Option(None, metavar="N", help="cap every training phase at N epochs (quick tries)"),
    device: str = typer.Option("auto", help="auto | cpu | cuda (the run prints which it uses, and why)"),
    data_root: Optional[str] = typer.Option(None, help="data folder (else $CILBENCH_DATA, else a cache dir)"),
    out: str = typer.Option("results/runs", help="root of the run directories"),
    tag: Optional[str] = typer.Option(None, help="suffix of the run name: <method>+<tag>"),
    resume: bool = typer.Option(False, "--resume", help="continue an unfinished run after its last finished task"),
    force: bool = typer.Option(False, "--force", help="replace an existing run directory"),
    deterministic: bool = typer.Option(False, "--deterministic", help="deterministic algorithms (slower; exact "
                                       "replays)"),
    stop_after: Optional[int] = typer.Option(None, metavar="N", help="stop after N tasks, leaving a resumable run"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress output"),
    plugin: List[str] = typer.Option([], "--plugin", help=PLUGIN_HELP),
):
    """Run one method on one protocol; results go to <out>/<protocol>/<method>[+<tag>]/seed<k>/."""
    from cilbench.report.summary import print_run_summary
    from cilbench.run.runner import RunRequest, execute
    _load_plugins(plugin)
    if epochs is not None and epochs < 1:
        _fail(f"--epochs must be >= 1, got {epochs}")
    if seed < 0:
        _fail(f"--seed must be >= 0, got {seed}")
    if seed > 2 ** 32 - 1:
        _fail(f"--seed must be at most {2 ** 32 - 1}, got {seed}")
    if stop_after is not None and stop_after < 1:
        _fail(f"--stop-after must be >= 1, got {stop_after}")
    if device not in ("auto", "cpu", "cuda"):
        _fail(f"--device must be auto, cpu or cuda, got {device!r}")
    request = RunRequest(method=method, protocol=protocol, seed=seed, overrides=list(set_), epochs=epochs,
                         device=device, data_root=data_root, out=out, tag=tag, resume=resume, force=force,
                         deterministic=deterministic, stop_after=stop_after, quiet=quiet)
    try:
        path = execute(request)
    except UserError as exc:
        _fail(str(exc))
    except TrainingDiverged as exc:
        _fail(f"run failed: {exc}", code=1)
    except Terminated:
        _fail("terminated (SIGTERM); the run can be continued with --resume", code=143)
    except KeyboardInterrupt:
        _fail("interrupted; the run can be continued with --resume", code=130)
    print_run_summary(path)


@app.command("list", epilog="Example: cilbench list")
def list_():
    """Methods (regimes, exemplars) and protocols (task counts)."""
    from cilbench.data.protocol import known_protocols, load_protocol
    from cilbench.kit.registry import known_methods
    _load_plugins([])
    typer.echo("methods:")
    for name, entry in known_methods().items():
        cls = entry.cls
        memory = "exemplars" if cls.uses_exemplars else "no exemplars"
        alias = f" (= {cls.family} with {entry.defaults})" if entry.defaults else ""
        origin = "" if entry.source.get("kind") == "builtin" else f"  [plug-in: {_origin(entry.source)}]"
        typer.echo(f"  {name:<14} {'/'.join(cls.regimes):<15} {memory:<13} {cls.summary}{alias}{origin}")
    typer.echo("protocols:")
    for name in known_protocols():
        p = load_protocol(name)
        typer.echo(f"  {name:<26} {p.dataset:<11} {p.regime:<8} {p.tasks:>3} tasks  {p.description}")


def _origin(source: dict) -> str:
    if source.get("package"):
        return f"{source['package']} {source.get('version') or ''}".strip()
    return source.get("file") or source.get("module") or "?"


@app.command("show-method")
def show_method(method: str = typer.Argument(..., help="method name (see `cilbench list`)")):
    """A method's summary, where it comes from, and every option with its default, unit, bounds and help."""
    from cilbench.kit import describe_options
    from cilbench.kit.registry import get_method
    _load_plugins([])
    try:
        entry = get_method(method)
    except UserError as exc:
        _fail(str(exc))
    cls = entry.cls
    typer.echo(f"{method}: {cls.summary}")
    if cls.paper:
        typer.echo(f"paper: {cls.paper}")
    typer.echo(f"regimes: {'/'.join(cls.regimes)}; exemplars: {'yes' if cls.uses_exemplars else 'never'}; "
               f"options section: {cls.family} (--set {cls.family}.<option>=...)")
    if entry.source.get("kind") != "builtin":
        typer.echo(f"plug-in: {_origin(entry.source)}")
    if entry.defaults:
        typer.echo(f"alias of {cls.family} with {entry.defaults}")
    rows = describe_options(cls.Config)
    if not rows:
        typer.echo("no options")
    for row in rows:
        default = entry.defaults.get(row["name"], row["default"])
        extra = [f"unit: {row['unit']}"] if row["unit"] else []
        if row["bounds"]:
            low, high = row["bounds"]
            extra.append(f"range: [{'-inf' if low is None else low}, {'inf' if high is None else high}]")
        typer.echo(f"  {row['name']} = {default!r}  ({row['type']}{'; ' + '; '.join(extra) if extra else ''})")
        if row["help"]:
            typer.echo(f"      {row['help']}")


@app.command("show-protocol", epilog="Example: cilbench show-protocol digits_b0s2 --method der --set memory.total=100")
def show_protocol(protocol: str = typer.Argument(..., metavar="PROTOCOL", help="card name or YAML path"),
                  method: Optional[str] = typer.Option(None, "--method", "-m",
                                                       help="also resolve this method's options and augmentation"),
                  set_: List[str] = typer.Option([], "--set", help="override a key, as in `cilbench run`"),
                  seed: int = typer.Option(0, help="the seed whose class order to show")):
    """Print the resolved protocol card: the actual class order, the task sizes and only the fields that apply."""
    from cilbench.run.runner import resolved_card
    try:
        resolved = resolved_card(protocol, method, list(set_), seed)
    except UserError as exc:
        _fail(str(exc))
    typer.echo(yaml.safe_dump(resolved, sort_keys=False, default_flow_style=None, width=110,
                              allow_unicode=True).rstrip())


@app.command(epilog="Example: cilbench download cifar100 --data-root /data/cil")
def download(dataset: str = typer.Argument(..., metavar="DATASET", help="cifar10 | cifar100"),
             data_root: Optional[str] = typer.Option(None, help="target folder")):
    """Download a data set in torchvision's format (needs internet)."""
    from cilbench.data.datasets import default_data_root
    from cilbench.data.datasets import download as fetch
    try:
        root = fetch(dataset, Path(data_root) if data_root else default_data_root())
    except UserError as exc:
        _fail(str(exc))
    typer.echo(f"{dataset} is in {root}")


@app.command(epilog="Example: cilbench report --protocol digits_b0s2 --out results/report/digits")
def report(runs: Optional[str] = typer.Option(None, help="root of the run directories [default: results/runs, "
                                              "or the sweep's out]"),
           out: Optional[str] = typer.Option(None, help="where tables, plots and index.html go [default: "
                                             "results/report, or results/report/<sweep name>]"),
           protocol: List[str] = typer.Option([], "--protocol", help="only these protocols"),
           methods: List[str] = typer.Option([], "--methods", help="only these run names / methods"),
           metric: List[str] = typer.Option([], "--metric", help="only these metric columns (avg, last, bwt, ...)"),
           sweep: Optional[str] = typer.Option(None, "--sweep", help="only the runs of this sweep file"),
           workers: Optional[int] = typer.Option(None, "--workers", min=1,
                                                 help="processes drawing the figures [default: one per core "
                                                      "when there are enough figures; 1: this process only]")):
    """Paper-style tables, plots and an HTML report from every run found."""
    from cilbench.report import build_report
    include = None
    try:
        if sweep is not None:
            from cilbench.sweep import grid
            spec = grid.load_sweep(sweep, out=runs)
            include = grid.include_filter(grid.prepare(spec))
            runs, out = spec.out, out or str(grid.default_report_dir(spec))
        index = build_report(Path(runs or "results/runs"), Path(out or "results/report"), protocols=protocol or None,
                             methods=methods or None, metrics=metric or None, include=include,
                             plot_workers=workers)
    except UserError as exc:
        _fail(str(exc))
    typer.echo(f"report written: {index}")


def _csv(values: List[str]) -> List[str]:
    return [v.strip() for text in values for v in text.split(",") if v.strip()]


def _sweep_again(file, methods, protocols, seeds, sets, out, name) -> str:
    """The command that selects this sweep again (for the printed follow-up, e.g. `... --status`)."""
    import shlex
    args = ["cilbench", "sweep"] + ([file] if file else [])
    for flag, values in (("--methods", methods), ("--protocols", protocols), ("--seeds", seeds)):
        if values:
            args += [flag, ",".join(map(str, values))]
    for text in sets:
        args += ["--set", text]
    args += (["--out", out] if out else []) + (["--name", name] if name else [])
    return shlex.join(args)


@app.command(epilog="Example: cilbench sweep protocols/sweeps/ci_tiny.yaml --status")
def sweep(
    file: Optional[str] = typer.Argument(None, metavar="FILE",
                                         help="sweep file (protocols/sweeps/*.yaml); or give the grid below"),
    methods: List[str] = typer.Option([], "--methods", help="grid: methods (comma-separated or repeated)"),
    protocols: List[str] = typer.Option([], "--protocols", help="grid: protocols"),
    seeds: List[str] = typer.Option([], "--seeds", help="grid: seeds, e.g. 0,1,2"),
    set_: List[str] = typer.Option([], "--set", help="key=value for every run, key=[v1,v2] for an axis"),
    epochs: Optional[int] = typer.Option(None, metavar="N", help="cap every training phase at N epochs"),
    deterministic: Optional[bool] = typer.Option(None, "--deterministic/--fast", help="deterministic runs"),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda"),
    data_root: Optional[str] = typer.Option(None, help="data folder"),
    out: Optional[str] = typer.Option(None, help="root of the run directories [default: the file's, or results/runs]"),
    name: Optional[str] = typer.Option(None, help="sweep name (log folder) [default: the file's stem]"),
    backend: str = typer.Option("local", help="local | slurm"),
    jobs: Optional[int] = typer.Option(None, help="local: runs at once [default: one per GPU slot, else 1]"),
    gpus: Optional[str] = typer.Option(None, help="local: GPU ids to pin runs to, e.g. 0,1,2,3 [default: all]"),
    runs_per_gpu: Optional[int] = typer.Option(None, help="local: runs packed on each GPU [default: 1]"),
    cpus_per_run: Optional[int] = typer.Option(None, help="CPU threads of each run (torch threads; on Slurm also "
                                               "--cpus-per-task) [default: torch's]"),
    time_: Optional[str] = typer.Option(None, "--time", help="time limit per run, [D-]HH:MM:SS or minutes"),
    partition: Optional[str] = typer.Option(None, help="slurm: partition"),
    account: Optional[str] = typer.Option(None, help="slurm: account"),
    qos: Optional[str] = typer.Option(None, help="slurm: quality of service"),
    constraint: Optional[str] = typer.Option(None, help="slurm: node features, e.g. a100"),
    gpus_per_run: Optional[int] = typer.Option(None, help="slurm: GPUs per run [default: 1; 0 for device cpu]"),
    mem_gb: Optional[float] = typer.Option(None, help="slurm: memory per run (GB)"),
    array_parallelism: Optional[int] = typer.Option(None, help="slurm: array tasks running at once"),
    setup: List[str] = typer.Option([], "--setup", help="slurm: job script line before the run, e.g. "
                                    "'module load cuda' (repeatable)"),
    sbatch: List[str] = typer.Option([], "--sbatch", help="slurm: other sbatch option, key=value or a bare flag "
                                     "such as requeue (repeatable)"),
    status: bool = typer.Option(False, "--status", help="print each run's state (read from the run directories)"),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="also rerun (resume) failed runs"),
    skip_invalid: bool = typer.Option(False, "--skip-invalid", help="skip and list cells that do not validate "
                                      "(as skip_invalid: true in the file) instead of refusing the grid"),
    report_: bool = typer.Option(True, "--report/--no-report", help="local: build the sweep's report at the end"),
    plugin: List[str] = typer.Option([], "--plugin", help=PLUGIN_HELP),
):
    """Run a grid of runs (methods x protocols x seeds x --set values) here or on Slurm, skipping complete runs."""
    from cilbench.sweep import backends, grid, launch, state
    _load_plugins(plugin)
    if backend not in ("local", "slurm"):
        _fail(f"--backend must be local or slurm, got {backend!r}")
    if device is not None and device not in ("auto", "cpu", "cuda"):
        _fail(f"--device must be auto, cpu or cuda, got {device!r}")
    try:
        seed_list = [int(s) for s in _csv(seeds)]
    except ValueError:
        _fail(f"--seeds must be integers, e.g. --seeds 0,1,2; got {seeds}")
    if gpus and not all(g.isdigit() for g in _csv([gpus])):
        _fail(f"--gpus must be GPU ids, e.g. --gpus 0,1,2,3; got {gpus!r}")
    options = backends.Backend(
        kind=backend, jobs=jobs, gpus=[int(g) for g in _csv([gpus])] if gpus else None, runs_per_gpu=runs_per_gpu,
        time=time_, partition=partition, account=account, qos=qos, constraint=constraint, gpus_per_run=gpus_per_run,
        cpus_per_run=cpus_per_run, mem_gb=mem_gb, array_parallelism=array_parallelism, setup=list(setup),
        sbatch=list(sbatch))
    try:
        spec = grid.load_sweep(file, _csv(methods), _csv(protocols), seed_list, set_, epochs=epochs,
                               deterministic=deterministic, device=device, data_root=data_root, out=out, name=name,
                               skip_invalid=skip_invalid or None)
        cells = grid.prepare(spec)
        for label, reason in spec.skipped:
            typer.echo(f"skipped (invalid): {label}: {reason}", err=True)
        if status:
            typer.echo(state.status_table(spec, cells))
            return
        backends.check_applicable(options)
        if cpus_per_run is not None and cpus_per_run < 1:
            _fail(f"--cpus-per-run must be >= 1, got {cpus_per_run}")
        options = backends.with_file_options(options, spec) if backend == "slurm" else options
        backends.parse_time(options.time)
        outcome = launch.run_sweep(spec, cells, options, retry_failed, echo=typer.echo)
    except UserError as exc:
        _fail(str(exc))
    index = None
    if report_ and backend == "local" and outcome.complete and not outcome.interrupted:
        from cilbench.report import build_report
        try:
            index = build_report(Path(spec.out), grid.default_report_dir(spec), include=grid.include_filter(cells))
        except UserError as exc:
            typer.echo(f"report not written: {exc}", err=True)
    again = _sweep_again(file, _csv(methods), _csv(protocols), seed_list, set_, out, name)
    typer.echo(launch.summary(spec, cells, outcome, index, again))
    if outcome.interrupted:
        raise typer.Exit(130)
    if outcome.failed:
        raise typer.Exit(1)


@app.command(epilog="Example: cilbench bench --method der --device cpu")
def bench(device: str = typer.Option("auto", help="auto | cpu | cuda"),
          images: int = typer.Option(10000, help="images per pipeline test"),
          steps: int = typer.Option(30, help="training steps per timing"),
          compile: bool = typer.Option(False, help="torch.compile the networks (CUDA)"),
          online_steps: int = typer.Option(200, help="HPCR steps per online timing"),
          method: list[str] = typer.Option([], "--method", "-m",
                                           help="bench these methods' training phases against bare loops "
                                                "(repeat the option; 'all' for every method)"),
          per_class: int = typer.Option(32, help="--method: training images per class of the generated set"),
          epochs: int = typer.Option(6, help="--method: epochs per phase; the first is warm-up, each later one is a "
                                                       "harness window followed by a bare window")):
    """Throughput of the engine's data pipeline and training step against reference paths; with --method, each
    method's training phases against bare loops of the same phases (its own loss and networks), with median
    and spread over interleaved windows, and a short run's time split."""
    try:
        if method:
            from cilbench.bench.methods import run_method_bench
            run_method_bench(method, device, per_class, epochs)
        else:
            from cilbench.bench.pipeline import run_bench
            run_bench(device, images, steps, compile=compile, online_steps=online_steps)
    except UserError as exc:
        _fail(str(exc))
    except TrainingDiverged as exc:   # the bench's short run (generated data) went non-finite
        _fail(f"bench run failed: {exc}", code=1)


def main() -> None:
    try:
        app()
    except UserError as exc:   # errors raised outside a command body
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
