"""The ``stamen`` command: run federations, list plugins."""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Stamen: federated learning on Flower — simulation, deployment and trade-off studies.")
# soft_wrap: long lines (paths, messages) are not broken at the terminal's width, so they stay copyable
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.toml"


def _fail(err: BaseException, debug: bool) -> None:
    if debug:
        traceback.print_exception(err)
    err_console.print(f"[bold red]error:[/] {err}")
    raise typer.Exit(code=2)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (config, data, checkpoint), reported without a traceback."""
    from stamen.config import ConfigError
    from stamen.experiment import RunFailed
    from stamen.export import ExportError
    from stamen.trackers import TrackerError
    from stamen.server.results import CheckpointError
    from stamen.sketching.codec import PayloadError
    from stamen.strategies.registry import StrategyConfigError
    from stamen.tasks.data import DataError

    return (ConfigError, DataError, StrategyConfigError, CheckpointError, PayloadError, RunFailed, ExportError,
            TrackerError, ValueError)


@app.command()
def run(
    config: Optional[Path] = typer.Argument(None, help="Run config (TOML). Default: the embedded digits/FedAvg config."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a key: section.key=value (repeatable)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Results directory (default runs/<name>-<timestamp>)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in DIR from its last complete round."),
    log: Optional[str] = typer.Option(None, "--log", help="Also log every round to tensorboard, mlflow or wandb "
                                      "(needs that package; files under DIR/<tracker>)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check the config and the combination (the preflight), "
                                 "print what would run, start nothing."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and Flower's log."),
    engine: str = typer.Option("simulation", "--engine", help="simulation (Flower's simulation engine on Ray: "
                               "actors, GPUs, a Ray cluster) or inprocess (the same server loop and client code in "
                               "this process, the cohort trained as one computation: the fastest start and the "
                               "least memory on one machine; identical metrics)."),
) -> None:
    """Run one federation (simulated on Ray, or in this process: --engine inprocess); write its results directory."""
    from stamen import config as C
    from stamen.experiment import preflight, simulate
    from stamen.server.app import default_out_dir
    from stamen.server.results import ensure_writable_dir
    from stamen.trackers import check_tracker

    dropped: list[str] = []
    try:
        if resume is not None:
            if config is not None:
                raise C.ConfigError("--resume DIR takes its config from DIR/config.toml; drop the CONFIG argument")
            cfg = C.load(resume / "config.toml", set_)
            out_dir = resume
            if out is not None and out != resume:
                raise C.ConfigError("--out must be omitted or equal to the --resume directory")
            from stamen.server.results import RunDirectory

            RunDirectory(resume).load_checkpoint()  # a damaged checkpoint or metrics file fails here, not in Ray
            RunDirectory(resume).read_metrics()
        else:
            cfg = C.load(config or DEFAULT_CONFIG, set_, dropped=dropped)
            out_dir = out or default_out_dir(cfg)
            if (out_dir / "metrics.jsonl").exists():
                raise C.ConfigError(f"{out_dir} already holds a run; use --resume {out_dir} or another --out")
        if engine not in ("simulation", "inprocess"):
            raise C.ConfigError(f"--engine must be simulation or inprocess, got {engine!r}")
        if log:
            check_tracker(log)
        preflight(cfg)
        if not dry_run:
            ensure_writable_dir(out_dir)
    except user_errors() as err:
        _fail(err, debug)
    if dry_run:
        console.print(f"[bold]stamen[/] would run {cfg.strategy.name} on {cfg.task.dataset} "
                      f"({cfg.federation.clients} clients, {cfg.run.rounds} rounds, codec {cfg.compression.codec}, "
                      f"privacy {'on' if cfg.privacy.enabled else 'off'}) → {out_dir}: the preflight passed")
        return

    if dropped:
        console.print(f"[dim]strategy/codec switched by --set: dropped the file's options {', '.join(dropped)}[/]")
    console.print(f"[bold]stamen[/] {cfg.strategy.name} on {cfg.task.dataset} ({cfg.federation.clients} clients, "
                  f"{cfg.run.rounds} rounds, codec {cfg.compression.codec}) → {out_dir}")
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold blue]round"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[acc]}"),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        bar = progress.add_task("rounds", total=cfg.run.rounds, acc="starting Ray…" if engine == "simulation" else "")
        if resume is not None:
            from stamen.server.results import RunDirectory

            progress.update(bar, completed=len(RunDirectory(out_dir).read_metrics()))

        tracker = None
        if log:
            from stamen.trackers import make_tracker

            tracker = make_tracker(log, out_dir / log, out_dir.name, experiment=cfg.run.name)

        def on_round(row: dict) -> None:
            acc = row.get("test_accuracy")
            text = f"acc {acc:.4f}" if acc is not None else ""
            progress.update(bar, completed=row["round"], acc=text)
            if tracker is not None:
                tracker.log_round(row)

        from stamen.interrupt import Interrupt, kill_descendants
        from stamen.server.loop import request_stop

        hint = f"completed rounds are checkpointed in {out_dir}; continue with: stamen run --resume {out_dir}"
        with Interrupt(hint, on_first=request_stop) as interrupt:
            try:
                if engine == "simulation":
                    summary = simulate(cfg, out_dir, resume=resume is not None, on_round=on_round, verbose=debug)
                else:
                    from stamen.server.inprocess_grid import InProcessGrid
                    from stamen.server.loop import run_federation

                    summary = run_federation(InProcessGrid(cfg), cfg, out_dir, resume=resume is not None,
                                             on_round=on_round)
            except user_errors() as err:
                if interrupt.interrupted:
                    interrupt.force()
                _fail(err, debug)
        if interrupt.interrupted:
            kill_descendants(interrupt.family)
            err_console.print(f"stopped: {hint}")
            raise typer.Exit(code=130)
        if tracker is not None:
            tracker.finish({k: v for k, v in C.to_flat(cfg).items() if not isinstance(v, (dict, list))},
                           {k: float(summary[k]) for k in ("final_test_accuracy", "final_test_loss", "epsilon")
                            if isinstance(summary.get(k), (int, float))})
    _print_summary(summary, out_dir)


SUMMARY_KEYS = ("strategy", "codec", "dataset", "model", "parameters", "rounds", "final_test_accuracy",
                "best_test_accuracy", "final_test_loss", "total_uplink_bytes", "total_downlink_bytes",
                "total_rejected", "wall_s", "epsilon", "delta")


def summary_lines(summary: dict) -> list[str]:
    """What the console says after a run besides the table: privacy caveats, a stop reason."""
    lines = []
    privacy = summary.get("privacy") or {}
    if privacy and not privacy.get("epsilon_is_guarantee", False):
        lines.append("WARNING: epsilon is NOT a privacy guarantee for this run: " + str(privacy.get("note", "")))
    if privacy.get("calibrated_noise_multiplier") is not None:
        lines.append(f"noise multiplier chosen for privacy.target_epsilon={privacy['target_epsilon']:g}: "
                     f"z = {privacy['calibrated_noise_multiplier']:.4g}")
    if summary.get("stopped"):
        lines.append(f"stopped early: {summary['stopped']}")
    return lines


def _print_summary(summary: dict, out_dir: Path) -> None:
    table = Table(title=f"Run summary ({out_dir})", show_header=False)
    for key in SUMMARY_KEYS:
        if key in ("epsilon", "delta") and key not in summary:
            continue
        v = summary.get(key)
        small = isinstance(v, float) and 0 < abs(v) < 1e-3  # δ = 1e-5 is not "0.0000"
        table.add_row(key, (f"{v:.3g}" if small else f"{v:.4f}") if isinstance(v, float) else str(v))
    console.print(table)
    for line in summary_lines(summary):
        console.print(f"[bold yellow]{line}[/]" if line.startswith("WARNING") else line)


@app.command("convert-checkpoint")
def convert_checkpoint(
    run_dir: Path = typer.Argument(..., help="Run directory holding a checkpoint.pkl from an older Stamen."),
    trust: bool = typer.Option(False, "--trust", help="I trust this file: convert without asking."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Convert an old pickled checkpoint.pkl to checkpoint.npz (data only), keeping the old file as .converted."""
    from stamen.server.checkpoint import CONVERTED_SUFFIX, convert_legacy_checkpoint
    from stamen.server.results import RunDirectory

    rd = RunDirectory(run_dir)
    legacy = rd.legacy_checkpoint_path
    if legacy.is_file() and not rd.checkpoint_path.exists() and not trust:  # else the conversion refuses at once
        err_console.print(f"{legacy} is a pickle. Unpickling a file can run arbitrary code; Stamen reads it with an "
                          "allow-list of numpy arrays and torch tensors, but convert only a file you or your team "
                          "wrote.")
        if not typer.confirm("Do you trust this file and want to convert it?", default=False):
            err_console.print("not converted; nothing was changed")
            raise typer.Exit(code=1)
    try:
        new = convert_legacy_checkpoint(run_dir)
    except user_errors() as err:
        _fail(err, debug)
    console.print(f"wrote {new}; the old file is kept as {legacy.name}{CONVERTED_SUFFIX}. "
                  f"Resume with: stamen run --resume {run_dir}")


@app.command("list")
def list_(
    capabilities: bool = typer.Option(False, "--capabilities", help="Print each strategy's declared capabilities "
                                      "(what it aggregates, codecs, privacy sites, …) as a markdown table."),
) -> None:
    """List the registered strategies, aggregators, datasets, partitions, models and codecs."""
    from stamen.sketching.codec import CODECS, make_codec
    from stamen.strategies.registry import STRATEGIES, capability_table, load_strategy_plugins
    from stamen.tasks.data import DATASETS, PARTITIONS
    from stamen.tasks.models import MODELS

    if capabilities:
        typer.echo(capability_table(), nl=False)
        return

    load_strategy_plugins()
    make_codec("dense")  # loads the codec modules
    t = _table("strategies (strategy.name) and their strategy.* options", "name", "options (default)", "what it is")
    for name, spec in sorted(STRATEGIES.items()):
        opts = ", ".join(f"{k}={f.default!r}" for k, f in spec.options.model_fields.items())
        t.add_row(name, opts or "-", spec.summary)
    console.print(t)
    t = _table("datasets (task.dataset)", "name", "what it is")
    for name, fn in sorted(DATASETS.items()):
        t.add_row(name, (fn.__doc__ or "").strip().splitlines()[0])
    console.print(t)
    from stamen.strategies.robust import AGGREGATORS

    console.print("aggregators (strategy.aggregator, any strategy whose clients send model updates, except the "
                  "sketch-space and coefficient ones): " + ", ".join(AGGREGATORS))
    console.print("partitions (task.partition): " + ", ".join(["auto", "natural", *sorted(PARTITIONS)]))
    console.print("models (task.model): " + ", ".join(sorted(MODELS)))
    t = _table("codecs (compression.codec) and their compression.* options", "name", "linear", "options (default)",
               "what it is")
    for name, cls in sorted(CODECS.items()):
        if getattr(cls, "general_purpose", True):
            t.add_row(name, str(cls.linear), codec_options(cls) or "-", (cls.__doc__ or "").strip().splitlines()[0])
    console.print(t)
    console.print("strategies' capabilities (what each aggregates, accepts and declares): stamen list --capabilities")


def _table(title: str, *columns: str) -> Table:
    """A table that wraps long cells instead of cutting them at the terminal's width."""
    t = Table(title=title)
    for c in columns:
        t.add_column(c, overflow="fold")
    return t


def codec_options(cls) -> str:
    """A codec's ``compression.*`` options with their defaults, from its constructor's signature."""
    import inspect

    params = [p for p in inspect.signature(cls.__init__).parameters.values()
              if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    names = [f"{p.name}={p.default!r}" if p.default is not p.empty else p.name for p in params]
    return ", ".join(names + list(getattr(cls, "OPERATOR_OPTIONS", ())))


@app.command()
def sweep(
    study: Path = typer.Argument(..., help="Study file (TOML): a base config, [grid] axes, [[points]], seeds."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Study directory (default sweeps/<study name>); "
                                       "rerunning into it skips finished points and resumes interrupted ones."),
    jobs: int = typer.Option(1, "--jobs", "-j", min=1, help="Points run in parallel, each in its own process."),
    engine: str = typer.Option("simulation", "--engine", help="simulation (Flower's engine on Ray) or inprocess "
                               "(the same server loop and clients in one process: fast, same metrics)."),
    log: Optional[str] = typer.Option(None, "--log", help="Also log every point to tensorboard or mlflow "
                                      "(needs that package)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate the study and list its points; run nothing."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and Flower's log."),
) -> None:
    """Run a trade-off study: every point of a grid / list of configs, results.csv and study.json."""
    from stamen import sweep as S

    try:
        st = S.load_study(study)
        out_dir = out or Path("sweeps") / st.name
        S.fit_jobs(st, engine, jobs)
        if log:
            S.make_logger(log, out_dir, st)
        plans = [S.plan_point(p, out_dir / "runs" / p.id) for p in st.runs]
    except user_errors() as err:
        _fail(err, debug)

    todo = sum(p.action != "skip" for p in plans)
    console.print(f"[bold]stamen sweep[/] {st.name}: {len(st.runs)} points ({todo} to run, "
                  f"{len(st.runs) - todo} finished), engine {engine}, {jobs} job(s) → {out_dir}")
    if dry_run:
        t = Table(title=f"study {st.name}")
        t.add_column("point"), t.add_column("overrides"), t.add_column("action")
        for p in plans:
            t.add_row(p.point.id, p.point.label, p.action + (f" ({p.reason})" if p.reason else ""))
        console.print(t)
        return
    from stamen.interrupt import Interrupt, kill_descendants
    from stamen.server.loop import request_stop

    hint = f"rerun the same command to continue: finished points are skipped, interrupted ones resumed ({out_dir})"
    with Interrupt(hint, on_first=request_stop) as interrupt:
        try:
            with S.RichSweepReporter(console) as reporter:
                result = S.run_study(st, out_dir, engine=engine, jobs=jobs, reporter=reporter, log_to=log,
                                     verbose=debug)
        except user_errors() as err:
            if interrupt.interrupted:
                interrupt.force()
            _fail(err, debug)
    if interrupt.interrupted:
        kill_descendants(interrupt.family)
        err_console.print(f"stopped: {hint}")
        raise typer.Exit(code=130)
    console.print(f"ran {len(result.ran)} ({len(result.resumed)} resumed), skipped {len(result.skipped)} finished, "
                  f"failed {len(result.failed)} → {result.csv_path}")
    if result.failed:
        for pid, error in result.failed.items():
            err_console.print(f"[bold red]failed:[/] {pid}: {error} (see {out_dir / 'runs' / pid / 'error.txt'})")
        err_console.print("rerun the same command to retry the failed points (finished ones are skipped)")
        raise typer.Exit(code=1)
    console.print(f"next: stamen report {out_dir}")


@app.command()
def report(
    dirs: list[Path] = typer.Argument(..., help="Run directories and/or study directories (from stamen sweep)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Report directory (default: STUDY/report for "
                                       "one study, else ./report)."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Compare runs: a table (mean ± std over seeds), accuracy per round, Pareto fronts; PNG, markdown, HTML."""
    from stamen.report import build_report

    try:
        rep = build_report(dirs, out)
    except user_errors() as err:
        _fail(err, debug)
    t = Table(title=f"{sum(len(g.runs) for g in rep.groups)} runs in {len(rep.groups)} groups (mean ± std over seeds)")
    for h in rep.table.headers:
        t.add_column(h, justify="left" if h in rep.table.headers[:1] else "right")
    for row in rep.table.rows:
        t.add_row(*row)
    console.print(t)
    for path in [rep.markdown, rep.html, *rep.figures.values()]:
        console.print(f"wrote {path}")


from stamen.deploy.cli import deploy_app  # noqa: E402  (typer-only module: keeps `stamen --help` fast)

app.add_typer(deploy_app, name="deploy")


@app.command()
def attack(
    attack_: str = typer.Option("ig", "--attack", help="dlg (Zhu et al. 2019, iDLG labels) | ig (Geiping et al. 2020)."),
    sketch: str = typer.Option("gaussian", "--sketch", help="Sketch codec the attacker knows: gaussian, rademacher, "
                               "countsketch, sparsejl."),
    sketch_ratio: list[float] = typer.Option([0.0], "--sketch-ratio", help="s/d of the sketch; 0 = raw update "
                                             "(repeatable)."),
    noise_multiplier: list[float] = typer.Option([0.0], "--noise-multiplier", "-z",
                                                 help="z: noise std z·C on the observed update (repeatable)."),
    clip: float = typer.Option(1.0, "--clip", help="C: L2 clip norm of the observed update (sketch space when sketched)."),
    inputs: int = typer.Option(4, "--inputs", help="How many digits to reconstruct (one example per update)."),
    seeds: list[int] = typer.Option([0], "--seeds", help="Attack seeds (repeatable)."),
    iterations: int = typer.Option(300, "--iterations", help="Optimizer iterations of the attack."),
    hidden: int = typer.Option(16, "--hidden", help="Hidden width of the sigmoid MLP under attack."),
    rows: int = typer.Option(1, "--rows", help="CountSketch rows (with --sketch countsketch)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the results as JSON here."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Gradient inversion against raw, sketched and noised single-example updates (8×8 digits)."""
    import json

    import torch

    from stamen.privacy.attacks.study import leakage_study

    torch.set_num_threads(1)  # tiny model: extra threads only contend
    try:
        if inputs < 1 or iterations < 1 or clip <= 0:
            raise ValueError("--inputs and --iterations must be positive and --clip > 0")
        if any(z < 0 for z in noise_multiplier):
            raise ValueError(f"--noise-multiplier must be non-negative, got {noise_multiplier}")
        results = leakage_study(attack=attack_, sketch=sketch, sketch_ratios=sketch_ratio,
                                noise_multipliers=noise_multiplier, clip=clip, inputs=inputs, seeds=seeds,
                                iterations=iterations, hidden=hidden,
                                sketch_options={"rows": rows} if sketch == "countsketch" else None)
    except user_errors() as err:
        _fail(err, debug)
    table = Table(title=f"{attack_.upper()} reconstruction of single-example updates "
                        f"({inputs} digits × {len(seeds)} seeds, d={results[0]['d']})")
    for col in ("observed", "size", "z", "noise std", "PSNR dB", "± std", "MSE", "label acc"):
        table.add_column(col, justify="left" if col == "observed" else "right", no_wrap=col == "observed")
    for r in results:
        kind = "raw" if r["sketch"] == "none" else f"{r['sketch']} s/d={r['sketch_ratio']:g}"
        kind += ", noised" if r["noise_multiplier"] > 0 else ""
        table.add_row(kind, str(r["observed_size"]), f"{r['noise_multiplier']:g}", f"{r['noise_std']:.3g}",
                      f"{r['psnr']:.1f}", f"{r['psnr_std']:.1f}", f"{r['mse']:.4f}", f"{r['label_accuracy']:.2f}")
    console.print(table)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        console.print(f"results → {out}")


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="A run directory (its model.safetensors, or its checkpoint)."),
    format: str = typer.Option("torchscript", "--format", "-f", help="torchscript or onnx (onnx needs "
                               "'pip install stamen[export]')."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output file (default DIR/model.<format>)."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Export a run's final model as TorchScript or ONNX (checked against PyTorch on a test example)."""
    from stamen.export import export_model

    try:
        path = export_model(run_dir, format, out)
    except user_errors() as err:
        _fail(err, debug)
    console.print(f"exported {run_dir} → {path}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
