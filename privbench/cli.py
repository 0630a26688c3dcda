"""The ``bench`` command line: parses, calls the API, prints with rich.

Exit codes: 0 ok, 1 the run failed (stored as failed), 2 bad input (nothing run),
3 the pair is unsupported (stored as such), 130 interrupted.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from privbench import registry

app = typer.Typer(
    help="privbench: benchmark privacy attacks against privacy defenses on medical images.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)


def _input_errors() -> tuple[type[BaseException], ...]:
    from privbench.config import ConfigError
    from privbench.datasets import DatasetError
    from privbench.store import StoreError

    return (registry.RegistryError, ConfigError, DatasetError, StoreError)


def _fail_input(exc: BaseException) -> None:
    err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
    raise typer.Exit(2)


@app.callback()
def main(
    no_plugins: Annotated[bool, typer.Option("--no-plugins", help="Use built-in components only.")] = False,
) -> None:
    registry.PLUGINS_ENABLED = not no_plugins


@app.command()
def run(
    defense: Annotated[str, typer.Option(help="Defense name (see 'bench list').")] = "none",
    attack: Annotated[str, typer.Option(help="Attack name (see 'bench list').")] = "dlg",
    dataset: Annotated[str, typer.Option(help="synthetic-mri, brain-tumor-mri, imagefolder:<path>, medmnist:<flag>.")] = "synthetic-mri",
    data_root: Annotated[Path | None, typer.Option(help="Folder holding the dataset.")] = None,
    model: Annotated[str, typer.Option(help="Target model architecture.")] = "lenet",
    image_size: Annotated[int, typer.Option(help="Images are resized to this many pixels a side.")] = 32,
    channels: Annotated[int, typer.Option(help="1 (grayscale) or 3 (RGB).")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of the initialization, training, victim choice and attack.")] = 0,
    split_seed: Annotated[int, typer.Option(help="Seed of the members / nonmembers / auxiliary split.")] = 0,
    defense_param: Annotated[list[str] | None, typer.Option("--defense-param", help="key=value, repeatable.")] = None,
    attack_param: Annotated[list[str] | None, typer.Option("--attack-param", help="key=value, repeatable.")] = None,
    model_param: Annotated[list[str] | None, typer.Option("--model-param", help="key=value, repeatable.")] = None,
    gradient_round: Annotated[str, typer.Option("--round", help="Gradients at 'init' (seed's initialization) or 'trained'.")] = "init",
    victim_batch: Annotated[int, typer.Option(help="Images in the victim's batch.")] = 1,
    max_grad_evals: Annotated[int | None, typer.Option(help="Cap on the attack's gradient evaluations.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Recompute even if a stored result exists.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result row as JSON.")] = False,
    store_path: Annotated[Path | None, typer.Option("--store", help="SQLite results file.")] = None,
    threads: Annotated[int | None, typer.Option(help="Torch intra-op threads (default $PRIVBENCH_THREADS or 1).")] = None,
    allow_download: Annotated[bool, typer.Option("--allow-download", help="Let datasets download missing files.")] = False,
) -> None:
    """Run one defense x attack pair (or return its stored result) and store one row."""
    from privbench.config import Budget, ConfigError, RunConfig, parse_assignments
    from privbench.runner import RunOptions, lookup
    from privbench.store import Store

    try:
        if data_root is not None and not data_root.is_dir():
            raise ConfigError(f"--data-root {data_root} does not exist or is not a folder; pass the folder that holds the dataset")
        config = RunConfig(
            defense=defense, attack=attack, dataset=dataset, model=model, image_size=image_size,
            channels=channels, seed=seed, split_seed=split_seed,
            defense_params=parse_assignments(defense_param, "--defense-param"),
            attack_params=parse_assignments(attack_param, "--attack-param"),
            model_params=parse_assignments(model_param, "--model-param"),
            gradient_round=gradient_round, victim_batch=victim_batch, budget=Budget(max_grad_evals),
        )
        options = RunOptions(
            data_root=str(data_root) if data_root else None, force=force,
            allow_download=allow_download, threads=threads,
        )
        store = Store(store_path)
        result = None if force else lookup(config, store, options)
        if result is None:
            result = _compute(config, store, options, quiet=as_json)
    except _input_errors() as exc:
        _fail_input(exc)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted: nothing was stored for this run[/]")
        raise typer.Exit(130) from None
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        _print_result(result, store)
    raise typer.Exit({"ok": 0, "failed": 1, "unsupported": 3}[result.status])


def _compute(config, store, options, quiet: bool):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from privbench import runner

    with Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), console=err_console, transient=True, disable=quiet,
    ) as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        return runner.run(config, store, options, progress)


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _print_result(result, store) -> None:
    cfg = result.config
    head = f"{cfg['defense']} x {cfg['attack']} on {cfg['dataset']} ({cfg['model']}, {cfg['image_size']}px, seed {cfg['seed']})"
    console.print(f"[bold]{head}[/]  run {result.run_id}" + ("  [dim](stored result)[/]" if result.cached else ""))
    if result.status != "ok":
        colour = "red" if result.status == "failed" else "yellow"
        console.print(f"[{colour}]{result.status}:[/] {result.error}", highlight=False)
        return
    metrics = result.metrics
    table = Table("metric", "attack", "baseline")
    for name in ("psnr", "ssim", "mse", "label_accuracy"):
        if name in metrics:
            table.add_row(name, _fmt(metrics[name]), _fmt(metrics.get(f"baseline_{name}")))
    console.print(table)
    console.print(
        f"target accuracy on nonmembers {_fmt(metrics.get('target_accuracy'))}; "
        f"{result.grad_evals} gradient evaluations; {result.wall_time_s:.1f} s; "
        f"artifacts: {store.root / result.artifacts if result.artifacts else '-'}"
    )


@app.command("list")
def list_components(
    kind: Annotated[str | None, typer.Argument(help="defenses, attacks, datasets, models or metrics.")] = None,
) -> None:
    """Every registered component with its kind, origin and description."""
    kinds = [kind] if kind else list(registry.ALL)
    table = Table("kind", "name", "origin", "description")
    try:
        for k in kinds:
            if k not in registry.ALL:
                raise registry.UnknownNameError("kinds", k, list(registry.ALL))
            for entry in registry.ALL[k].entries():
                extra = ""
                for attr in ("surface", "family"):
                    value = getattr(entry.obj, attr, None)
                    if value is not None and not callable(value):
                        extra += f" [{attr}: {getattr(value, 'value', value)}]"
                table.add_row(k, entry.name, entry.origin.describe(), entry.description + extra)
    except registry.RegistryError as exc:
        _fail_input(exc)
    console.print(table)


@app.command()
def runs(
    limit: Annotated[int, typer.Option(help="How many rows.")] = 20,
    status: Annotated[str | None, typer.Option(help="Only rows with this status (ok, failed, unsupported).")] = None,
    store_path: Annotated[Path | None, typer.Option("--store", help="SQLite results file.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print rows as JSON.")] = False,
) -> None:
    """Recent stored runs."""
    from privbench.store import Store, StoreError

    try:
        store = Store(store_path)
    except StoreError as exc:
        _fail_input(exc)
    rows = store.recent(limit, status)
    if as_json:
        typer.echo(json.dumps([r.to_dict() for r in rows], indent=2, default=str))
        return
    table = Table("run", "status", "defense", "attack", "dataset", "model", "seed", "psnr", "ssim", "baseline psnr", "time s")
    for r in rows:
        c = r.config
        table.add_row(
            r.run_id, r.status, c["defense"], c["attack"], c["dataset"], c["model"], str(c["seed"]),
            _fmt(r.metrics.get("psnr")), _fmt(r.metrics.get("ssim")), _fmt(r.metrics.get("baseline_psnr")),
            f"{r.wall_time_s:.1f}",
        )
    console.print(table)
    counts = store.counts()
    console.print(", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "no runs stored yet")


def entrypoint() -> None:  # pragma: no cover - console script
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    entrypoint()
