"""The ``kdpipe`` command. Maps every KdpipeError to its exit code (DESIGN.md §3) with a one-line message:
0 ok, 2 config/usage error, 3 data error, 4 gate failed, 5 stage crashed, 130 interrupted (resumable)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgressBar
from rich.table import Table

import kdpipe
from kdpipe.errors import GateFailed, Interrupted, KdpipeError, handle_errors

console = Console(stderr=True)
stdout = Console()
F = TypeVar("F", bound=Callable[..., Any])


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose < 0 else logging.INFO if verbose == 0 else logging.DEBUG
    handler = RichHandler(console=console, show_path=verbose > 0, show_time=verbose > 0, markup=False)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(message)s", force=True)
    logging.getLogger("kdpipe").setLevel(level)


class _RichTask:
    def __init__(self, bar: RichProgressBar, task_id: Any) -> None:
        self.bar, self.task_id = bar, task_id

    def advance(self, n: int = 1, **fields: object) -> None:
        loss = fields.get("loss")
        if isinstance(loss, float):
            self.bar.update(self.task_id, advance=n, status=f"loss {loss:.4f}")
        else:
            self.bar.update(self.task_id, advance=n)

    def close(self) -> None:
        self.bar.remove_task(self.task_id)


class RichProgress:
    """kdpipe.progress.Progress on a rich progress bar (drawn only on a terminal)."""

    def __init__(self, bar: RichProgressBar) -> None:
        self.bar = bar

    def task(self, description: str, total: int | None) -> _RichTask:
        return _RichTask(self.bar, self.bar.add_task(description, total=total, status=""))


def _load(config: Path, overrides: tuple[str, ...]) -> Any:
    """The config with ``KDPIPE_SET_*`` environment overrides applied first, then ``--set`` (which wins)."""
    import kdpipe.stages  # noqa: F401  (registers stage types and methods before the config model is built)
    from kdpipe.config import load_config
    from kdpipe.overrides import from_env

    return load_config(config, [*from_env(os.environ), *overrides])


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Point file descriptor 1 at stderr for the duration, so that whatever a library prints (Python or C) lands on
    stderr and ``--json`` leaves exactly one document on stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):  # for a sys.stdout that is not file descriptor 1
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(kdpipe.__version__, prog_name="kdpipe")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def cli(verbose: int, quiet: bool) -> None:
    """Distill a compact student from a timm teacher, verify it, export it, benchmark it, document it.

    Exit codes: 0 ok, 2 config or usage error, 3 data error, 4 gate failed, 5 stage crashed, 130 interrupted.
    """
    _setup_logging(-1 if quiet else verbose)


_set_option = click.option(
    "--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE", help="Override a config value (repeatable)."
)


@cli.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    envvar="KDPIPE_OUT",
    show_envvar=True,
    help="Run directory (default: runs/<name>).",
)
@click.option("--from", "from_stage", metavar="STAGE", help="Rerun STAGE and every stage that depends on it.")
@click.option("--only", metavar="STAGE", help="Run only STAGE if out of date (with --force: always).")
@click.option("--force", is_flag=True, help="Rerun every stage even when up to date.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="At the end, print the run summary (summary.json) as one JSON document on stdout; logs stay on stderr.",
)
@_set_option
@handle_errors
def run(
    config: Path,
    out: Path | None,
    from_stage: str | None,
    only: str | None,
    force: bool,
    as_json: bool,
    overrides: tuple[str, ...],
) -> None:
    """Run the pipeline in CONFIG, skipping stages that are up to date.

    KDPIPE_SET_<KEY__PATH>=VALUE environment variables override config values before --set does (the path after the
    prefix is lower-cased, __ separates keys): KDPIPE_SET_STAGES__DISTILL__TRAIN__EPOCHS=3.
    """
    state: dict[str, Any] = {"run_dir": out}
    if not as_json:
        _run(config, out, from_stage, only, force, overrides, state)
        return
    error: BaseException | None = None
    try:
        with _stdout_to_stderr():
            _run(config, out, from_stage, only, force, overrides, state)
    except BaseException as exc:
        error = exc
        raise
    finally:
        if state.get("is_main", True):
            click.echo(json.dumps(_json_document(config, state, error), indent=2, default=str))


def _json_document(config: Path, state: dict[str, Any], error: BaseException | None) -> dict[str, Any]:
    """The runner's summary when the run got that far; else the same keys with the error and no stage results."""
    from kdpipe.pipeline import summary

    runner = state.get("runner")
    if runner is not None and runner.summary_document is not None:
        return dict(runner.summary_document)
    return summary.document(name=state.get("name"), config=config, run_dir=state.get("run_dir"), stages=[], error=error)


def _run(
    config: Path,
    out: Path | None,
    from_stage: str | None,
    only: str | None,
    force: bool,
    overrides: tuple[str, ...],
    state: dict[str, Any],
) -> None:
    from kdpipe import distributed
    from kdpipe.pipeline.runner import Runner, default_run_dir

    loaded = _load(config, overrides)
    run_dir = out or default_run_dir(loaded)
    state.update(name=loaded.config.name, run_dir=run_dir)
    world = distributed.init_from_env(loaded.config.device)  # under torchrun: join the group; else a no-op
    state["is_main"] = world.is_main
    try:
        if not world.is_main:  # rank 0 reports; the others train their shards quietly
            Runner(loaded, run_dir, force=force, from_stage=from_stage, only=only).run()
            return
        _run_main(loaded, config, out, run_dir, from_stage, only, force, overrides, state)
    finally:
        distributed.shutdown()


def _run_main(
    loaded: Any,
    config: Path,
    out: Path | None,
    run_dir: Path,
    from_stage: str | None,
    only: str | None,
    force: bool,
    overrides: tuple[str, ...],
    state: dict[str, Any],
) -> None:
    from kdpipe.pipeline.outcome import StageOutcome
    from kdpipe.pipeline.runner import Runner

    resume = ["kdpipe", "run", str(config), *(["--out", str(out)] if out else []), *(f"--set={s}" for s in overrides)]

    def on_stage(o: StageOutcome) -> None:
        if o.status == "skipped":
            console.print(f"[dim]- {o.name}: up to date, skipped[/]", highlight=False)
        else:
            console.print(f"[green]✓[/] {o.name} ({o.seconds:.1f}s): {o.summary}", highlight=False)

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
    )
    try:
        # validation before the progress bar: a config error prints as a single clean line
        runner = Runner(loaded, run_dir, force=force, from_stage=from_stage, only=only, on_stage=on_stage)
        state["runner"] = runner
        console.print(f"[bold]kdpipe[/] {loaded.path} -> {run_dir}", highlight=False)
        with RichProgressBar(*columns, console=console, transient=True) as bar:
            runner.progress = RichProgress(bar)
            summary = runner.run()
    except GateFailed:
        console.print(f"[red]a gate failed[/]; results so far are in {run_dir}", highlight=False)
        raise
    except (Interrupted, KdpipeError) as exc:
        if exc.exit_code in (5, 130):
            console.print(f"to resume: [bold]{shlex.join(resume)}[/]", highlight=False, soft_wrap=True)
        raise
    except KeyboardInterrupt:
        console.print(f"interrupted; to resume: [bold]{shlex.join(resume)}[/]", highlight=False)
        sys.exit(130)
    ran = sum(o.status == "ran" for o in summary.stages)
    console.print(
        f"[bold green]done[/] in {summary.seconds:.1f}s: {ran} ran, {len(summary.stages) - ran} up to date; "
        f"results in {summary.run_dir}",
        highlight=False,
    )


@cli.command()
@click.argument("config", type=click.Path(path_type=Path))
@_set_option
@click.option(
    "--sub-runs",
    is_flag=True,
    help="Print the sub-runs (a sweep's candidates) one per line, for kdpipe run --only on a cluster.",
)
@handle_errors
def validate(config: Path, overrides: tuple[str, ...], sub_runs: bool) -> None:
    """Check CONFIG (schema, stage graph, paths) without running anything."""
    from kdpipe.pipeline.runner import preflight

    loaded = _load(config, overrides)
    nodes = preflight(loaded)
    if sub_runs:
        for scope in dict.fromkeys(n.scope for n in nodes if n.scope is not None):
            stdout.print(scope, highlight=False)
        return
    chain = ", ".join(f"{n.name} ({n.type}{' <- ' + '+'.join(n.needs) if n.needs else ''})" for n in nodes)
    stdout.print(f"{config}: ok — {len(nodes)} stages: {chain}", highlight=False, soft_wrap=True)


@cli.command()
def schema() -> None:
    """Print the JSON Schema of stages.yaml (for editors: yaml-language-server)."""
    import kdpipe.stages  # noqa: F401
    from kdpipe.config import get_pipeline_model

    click.echo(json.dumps(get_pipeline_model().model_json_schema(), indent=2))


@cli.command("list")
@click.argument("what", type=click.Choice(["methods", "models", "formats", "stages", "backends"]))
@click.option("--all", "show_all", is_flag=True, help="models: every timm architecture, not only kdpipe's.")
def list_(what: str, show_all: bool) -> None:
    """List registered KD methods, models, export formats or stage types."""
    import kdpipe.stages
    from kdpipe.models.factory import list_kdpipe_models, list_models
    from kdpipe.registry import BACKENDS, FORMATS, METHODS, STAGES

    if what == "models":
        names = list_models() if show_all else list_kdpipe_models()
        for name in names:
            stdout.print(name, highlight=False)
        if not show_all:
            console.print("[dim]any timm model name works too (kdpipe list models --all)[/]")
        return
    registry = {"methods": METHODS, "formats": FORMATS, "stages": STAGES, "backends": BACKENDS}[what]
    if len(registry) == 0:
        console.print(f"no {registry.kind}s are registered in kdpipe {kdpipe.__version__}")
        return
    table = Table(show_header=True, header_style="bold", box=None)
    table.add_column(registry.kind)
    extra = {"formats": "file", "backends": "runs"}.get(what)
    if extra:
        table.add_column(extra)
    table.add_column("summary")
    for entry in registry:
        if what == "formats":
            table.add_row(entry.name, entry.obj.suffix, entry.summary)
        elif what == "backends":
            runs = "the PyTorch module" if entry.obj.needs == "module" else ", ".join(entry.obj.consumes)
            table.add_row(entry.name, runs, entry.summary)
        else:
            table.add_row(entry.name, entry.summary)
    stdout.print(table)


def _add_commands() -> None:
    from kdpipe.bench.standalone import bench_command
    from kdpipe.doctor import doctor_command

    cli.add_command(bench_command, "bench")
    cli.add_command(doctor_command, "doctor")


_add_commands()


def main() -> None:
    cli(prog_name="kdpipe")


if __name__ == "__main__":
    main()
