"""The ``bench`` command line: parses, calls the API, prints with rich.

Exit codes: 0 ok, 1 the run failed (stored as failed), 2 bad input (nothing run),
3 the pair is unsupported (stored as such), 130 interrupted.

Text from users, files, plugins and the store (names, paths, error messages, stored rows) is printed
as written, in one place: both consoles are created with rich markup, emoji codes and highlighting
off, so no text they print is ever read as markup (``[/i]``, ``[red]``, ``:smile:`` print literally,
and cannot break a command). This module's own styling is applied through :func:`_text` (rich ``Text``
with explicit styles), never by markup inside a string.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from privbench import registry
from privbench.config import RunConfig
from privbench.metrics.family import headline

_DEFAULTS = RunConfig()  # every default of ``bench run`` is RunConfig's own

app = typer.Typer(
    help="privbench: benchmark privacy attacks against privacy defenses on medical images.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# Every string these consoles print is literal: no markup, no emoji codes, no highlighting (see the module doc).
console = Console(markup=False, emoji=False, highlight=False)
err_console = Console(stderr=True, markup=False, emoji=False, highlight=False)


def _text(*parts: object) -> Text:
    """Literal text for the consoles: each part a value (printed as its ``str``, as written) or a
    ``(value, style)`` pair whose style is this module's own (e.g. ``("error:", "bold red")``)."""
    out = Text()
    for part in parts:
        if isinstance(part, tuple):
            out.append(str(part[0]), style=str(part[1]))
        else:
            out.append(str(part))
    return out


def _say(*parts: object, err: bool = False) -> None:
    """Print ``_text(*parts)`` on stdout (or stderr); a long line is not broken, so commands in it copy whole."""
    (err_console if err else console).print(_text(*parts), soft_wrap=True)


def _input_errors() -> tuple[type[BaseException], ...]:
    from privbench.config import ConfigError
    from privbench.datasets import DatasetError
    from privbench.store import StoreError

    return (registry.RegistryError, ConfigError, DatasetError, StoreError)


def _fail_input(exc: BaseException) -> None:
    _say(("error:", "bold red"), " ", exc, err=True)
    raise typer.Exit(2)


def _open_store(store_path: Path | None, *, create: bool):
    """The store at ``store_path`` (default: the home's); for a reader (``create`` False) a store that does not
    exist is an error when named with --store, and None (nothing stored yet) for the default location."""
    from privbench.store import Store, StoreMissing

    try:
        return Store(store_path, create=create)
    except StoreMissing:
        if store_path is not None:
            raise
        return None


def _json(obj: object) -> str:
    """Strict JSON for --json output (non-finite floats as the store encodes them)."""
    from privbench.store import dumps

    return dumps(obj, indent=2, sort_keys=False)


class _LogLine(logging.Formatter):
    """``12:03:04 privbench: stage 'train' started``; warnings and errors name their level."""

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        line = f"{self.formatTime(record, '%H:%M:%S')} {record.name}: {level}{record.getMessage()}"
        return line + ("\n" + self.formatException(record.exc_info) if record.exc_info else "")


def _log_to_stderr(level: int, terminal: bool) -> None:
    """Log privbench's records at ``level`` and above to stderr until the command ends (``_stop_logging``):
    plain lines when stderr is not a terminal, through rich (above any progress bar) when it is."""
    logger = logging.getLogger("privbench")
    if terminal:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=err_console, show_time=False, show_path=False, markup=False)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_LogLine())
    handler.setLevel(level)
    _RESTORE.append((handler, logger.level))
    logger.addHandler(handler)
    logger.setLevel(level)


_RESTORE: list[tuple[logging.Handler, int]] = []  # handlers _log_to_stderr added, and the level before


def _stop_logging() -> None:
    logger = logging.getLogger("privbench")
    while _RESTORE:
        handler, level = _RESTORE.pop()
        logger.removeHandler(handler)
        logger.setLevel(level)


@app.callback()
def main(
    ctx: typer.Context,
    no_plugins: Annotated[bool, typer.Option("--no-plugins", help="Use built-in components only.")] = False,
) -> None:
    registry.PLUGINS_ENABLED = not no_plugins
    ctx.call_on_close(_stop_logging)  # a command's stderr log handler ends with the command


@app.command()
def run(
    defense: Annotated[str, typer.Option(help="Defense name (see 'bench list').")] = _DEFAULTS.defense,
    attack: Annotated[str, typer.Option(help="Attack name (see 'bench list').")] = _DEFAULTS.attack,
    dataset: Annotated[str, typer.Option(help="synthetic-mri, brain-tumor-mri, imagefolder:<path>, medmnist:<flag>.")] = _DEFAULTS.dataset,
    data_root: Annotated[Path | None, typer.Option(help="Folder holding the dataset.")] = None,
    model: Annotated[str, typer.Option(help="Target model architecture.")] = _DEFAULTS.model,
    image_size: Annotated[int, typer.Option(help="Images are resized to this many pixels a side.")] = _DEFAULTS.image_size,
    channels: Annotated[int, typer.Option(help="1 (grayscale) or 3 (RGB).")] = _DEFAULTS.channels,
    seed: Annotated[int, typer.Option(help="Seed of the initialization, training, victim choice and attack.")] = _DEFAULTS.seed,
    seeds: Annotated[str | None, typer.Option(
        help="A cell: one target attacked through every seed of this list (\"0-63\", \"0,3,7\" or \"0-9,20\"), one row "
             "per seed; the target is --target-seed's, default the first seed. Replaces --seed.")] = None,
    batch_victims: Annotated[int, typer.Option(
        help="With --seeds: victims attacked together in one batched job (gradient inversion: one vectorised "
             "optimisation); 0 runs them one after another, as separate runs.")] = 64,
    split_seed: Annotated[int, typer.Option(help="Seed of the members / nonmembers / auxiliary split.")] = _DEFAULTS.split_seed,
    target_seed: Annotated[int | None, typer.Option(
        help="Seed of the trained target alone (initialization, training, defense secrets); --seed then picks only "
             "the victim and the attack, so several seeds attack one released model. Default: --seed.")] = _DEFAULTS.target_seed,
    defense_param: Annotated[list[str] | None, typer.Option("--defense-param", help="key=value, repeatable.")] = None,
    attack_param: Annotated[list[str] | None, typer.Option("--attack-param", help="key=value, repeatable.")] = None,
    model_param: Annotated[list[str] | None, typer.Option("--model-param", help="key=value, repeatable.")] = None,
    gradient_round: Annotated[str, typer.Option("--round", help="Gradients at 'init' (seed's initialization) or 'trained'.")] = _DEFAULTS.gradient_round,
    victim_batch: Annotated[int, typer.Option(help="Images in the victim's batch.")] = _DEFAULTS.victim_batch,
    bn_mode: Annotated[str, typer.Option(help="BatchNorm mode of the client's update: 'train' (batch statistics, a "
                                         "FedAvg local step) or 'eval' (global running statistics).")] = _DEFAULTS.bn_mode,
    bn_buffers: Annotated[str, typer.Option(help="Whether the client shares its updated BatchNorm buffers with the "
                                            "update ('shared', as FedAvg averages them) or not ('private').")] = _DEFAULTS.bn_buffers,
    members: Annotated[int | None, typer.Option(help="Members (target training set) count; default half the data.")] = _DEFAULTS.split.members,
    nonmembers: Annotated[int | None, typer.Option(help="Nonmembers count; default a quarter of the data.")] = _DEFAULTS.split.nonmembers,
    auxiliary: Annotated[int | None, typer.Option(help="Auxiliary count; default the rest.")] = _DEFAULTS.split.auxiliary,
    max_grad_evals: Annotated[int | None, typer.Option(help="Cap on the attack's gradient evaluations.")] = _DEFAULTS.budget.max_grad_evals,
    force: Annotated[bool, typer.Option("--force", help="Recompute even if a stored result exists.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result row as JSON.")] = False,
    store_path: Annotated[Path | None, typer.Option("--store", help="SQLite results file.")] = None,
    threads: Annotated[int | None, typer.Option(help="Torch intra-op threads (default $PRIVBENCH_THREADS, else 1; a "
                                                 "batched cell, --seeds, uses every core).")] = None,
    allow_download: Annotated[bool, typer.Option("--allow-download", help="Let datasets download missing files.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress or stage lines: only the result, warnings "
                                        "and errors.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging from privbench: cache hits, misses "
                                          "and writes; with output that is not a terminal, progress every 30 s.")] = False,
) -> None:
    """Run one defense x attack pair (or return its stored result) and store one row.

    In a terminal, each stage shows a progress bar with the elapsed and the estimated remaining time;
    otherwise (piped, nohup) each stage logs one line when it starts and one when it ends, with its
    seconds, to stderr, and the result is logged too."""
    from privbench.config import Budget, ConfigError, parse_assignments
    from privbench.datasets.splits import SplitSpec
    from privbench.provenance import resolve_threads
    from privbench.runner import RunOptions, lookup
    from privbench.stages import StageTracker
    from privbench.store import ResultNotStored, Store

    if quiet and verbose:
        _fail_input(ConfigError("--quiet and --verbose exclude each other; pass one of them"))
    show = not quiet and (verbose or not as_json)  # --json alone prints the row only, as --quiet does
    terminal = err_console.is_terminal
    _log_to_stderr(logging.DEBUG if verbose else logging.INFO if show else logging.WARNING, terminal)
    tracker = StageTracker()
    try:
        resolve_threads(threads)
        if data_root is not None and not data_root.is_dir():
            raise ConfigError(f"--data-root {data_root} does not exist or is not a folder; pass the folder that holds the dataset")
        config = RunConfig(
            defense=defense, attack=attack, dataset=dataset, model=model, image_size=image_size,
            channels=channels, seed=seed, split_seed=split_seed, target_seed=target_seed,
            defense_params=parse_assignments(defense_param, "--defense-param"),
            attack_params=parse_assignments(attack_param, "--attack-param"),
            model_params=parse_assignments(model_param, "--model-param"),
            gradient_round=gradient_round, victim_batch=victim_batch, bn_mode=bn_mode, bn_buffers=bn_buffers,
            budget=Budget(max_grad_evals), split=SplitSpec(members=members, nonmembers=nonmembers, auxiliary=auxiliary),
        )
        options = RunOptions(
            data_root=str(data_root) if data_root else None, force=force,
            allow_download=allow_download, threads=threads, batch_victims=batch_victims,
        )
        store = Store(store_path)
        if seeds is not None:
            if seed != _DEFAULTS.seed:
                raise ConfigError("--seed and --seeds exclude each other; --seeds lists every victim's seed")
            _run_cell(config, seeds, store, options, tracker, as_json, show, terminal)
            return
        result = None if force else lookup(config, store, options)
        if result is None:
            result = _compute(config, store, options, tracker, bar=show and terminal, lines=show and not terminal)
    except ResultNotStored as exc:  # finished but not stored: show what was computed, then where it is kept
        _say(_result_line(exc.result), err=True)
        _fail_input(exc)
    except _input_errors() as exc:
        _fail_input(exc)
    except KeyboardInterrupt:
        _interrupted(tracker)
        raise typer.Exit(130) from None
    if as_json:
        typer.echo(_json(result.to_dict()))
    else:
        _print_result(result, store, model_chosen_by_defense=config.model is None)
        if tracker.stages and show:
            _say(f"stage times: {tracker.timings()}; wall time {result.wall_time_s:.1f} s")
    if show and not terminal:
        logging.getLogger("privbench").info("%s", _result_line(result))
    raise typer.Exit({"ok": 0, "failed": 1, "unsupported": 3}[result.status])


def _run_cell(config, seeds: str, store, options, tracker, as_json: bool, show: bool, terminal: bool) -> None:
    """``bench run --seeds``: the cell's rows (stored or computed), a summary, and the exit code of the worst
    row (1 if any failed, else 3 if any is unsupported, else 0)."""
    import statistics

    from privbench import runner
    from privbench.suite.spec import parse_seeds

    seed_list = parse_seeds([part.strip() for part in seeds.split(",") if part.strip()])
    configs = runner.cell_configs(config, seed_list)
    with _shown(tracker, bar=show and terminal, lines=show and not terminal):
        results = runner.run_cell(configs, store, options, tracker)
        tracker.close("done")
    statuses = [r.status for r in results]
    if as_json:
        typer.echo(_json([r.to_dict() for r in results]))
    else:
        first = results[0].config
        cell_ids = sorted({r.info.get("cell", {}).get("id") for r in results if not r.cached} - {None})
        _say((f"{first['defense']} x {first['attack']} on {first['dataset']} ({first['model']}, "
              f"{first['image_size']}px, target seed {configs[0].target_seed}): a cell of {len(results)} victims, "
              f"seeds {seeds}", "bold"))
        table = Table("metric", "median over victims", "baseline median", "n")
        ok = [r for r in results if r.status == "ok"]
        for name in ("psnr", "ssim", "label_accuracy"):
            values = [r.metrics[name] for r in ok if isinstance(r.metrics.get(name), (int, float))]
            base = [r.metrics[f"baseline_{name}"] for r in ok if isinstance(r.metrics.get(f"baseline_{name}"),
                                                                              (int, float))]
            if values:
                table.add_row(name, _fmt(statistics.median(values)), _fmt(statistics.median(base)) if base else "n/a",
                              str(len(values)))
        console.print(table)
        counts = {s: statuses.count(s) for s in ("ok", "failed", "unsupported")}
        served = sum(r.cached for r in results)
        _say(f"{counts['ok']} ok, {counts['failed']} failed, {counts['unsupported']} unsupported; {served} served "
             f"from the store; computed as {', '.join(cell_ids) or 'nothing new'} (batch size "
             f"{options.batch_victims or 'sequential'}); wall time "
             f"{sum(r.wall_time_s for r in results if not r.cached):.1f} s")
        for r in results:
            if r.status != "ok":
                _say((f"seed {r.config['seed']}: {r.status}:", "red"), " ", r.error)
        if tracker.stages and show:
            _say(f"stage times: {tracker.timings()}")
    raise typer.Exit(1 if "failed" in statuses else 3 if "unsupported" in statuses else 0)


@contextlib.contextmanager
def _shown(tracker, bar: bool, lines: bool):
    """Show ``tracker``'s progress as bars (``bar``) or log lines (``lines``) while the block runs; an error
    in it (Ctrl-C aside) closes the tracker as failed. On leaving, the bar stops: what follows prints below it."""
    from privbench.stages import BarSink, LogSink

    with contextlib.ExitStack() as stack:
        if bar:
            tracker.sinks.append(stack.enter_context(BarSink(err_console)))
        elif lines:
            tracker.sinks.append(LogSink())
        try:
            yield
        except KeyboardInterrupt:
            raise
        except BaseException:
            tracker.close("failed")
            raise
        tracker.sinks.clear()


def _compute(config, store, options, tracker, bar: bool, lines: bool):
    """``runner.run`` with ``tracker`` as its progress, shown as bars (``bar``) or log lines (``lines``)."""
    from privbench import runner

    with _shown(tracker, bar, lines):
        result = runner.run(config, store, options, tracker)
        tracker.close({"ok": "done", "failed": "failed"}.get(result.status, "stopped"))
    return result


def _interrupted(tracker) -> None:
    """After Ctrl-C: nothing was stored; which finished stages were cached and will be reused."""
    from privbench.stages import interrupted_summary
    from privbench.store import home

    summary = interrupted_summary(tracker, home() / "cache")
    tracker.close("interrupted")
    _say(("interrupted: nothing was stored for this run", "yellow"), err=True)
    for line in summary:
        _say(line, err=True)


def _result_line(result) -> str:
    """The result in one log line: run id, status, wall time and the headline metrics beside their baselines."""
    stored = "stored result: " if result.cached else ""
    if result.status != "ok":
        return f"{stored}run {result.run_id} {result.status}: {result.error}"
    metrics = result.metrics
    shown = "; ".join(f"{name} {_fmt(metrics[name])}" + (f" (baseline {_fmt(metrics[f'baseline_{name}'])})"
                                                         if f"baseline_{name}" in metrics else "")
                      for name in headline(metrics, result.info))
    return f"{stored}run {result.run_id} ok in {result.wall_time_s:.1f} s: {shown}"


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _print_result(result, store, model_chosen_by_defense: bool = False) -> None:
    cfg = result.config
    model = f"{cfg['model']}, the {cfg['defense']} defense's default" if model_chosen_by_defense else cfg["model"]
    head = f"{cfg['defense']} x {cfg['attack']} on {cfg['dataset']} ({model}, {cfg['image_size']}px, seed {cfg['seed']}"
    head += f", target seed {cfg['target_seed']})" if cfg.get("target_seed") is not None else ")"
    _say((head, "bold"), "  run ", result.run_id, ("  (stored result)", "dim") if result.cached else "")
    if result.status != "ok":
        colour = "red" if result.status == "failed" else "yellow"
        _say((f"{result.status}:", colour), " ", result.error)
        return
    metrics = result.metrics
    unavailable = result.info.get("unavailable_metrics", {})
    table = Table("metric", "attack", "baseline")
    for name in headline(metrics, result.info):
        note = " (see below)" if name in unavailable else ""
        table.add_row(name, _fmt(metrics[name]) + note, _fmt(metrics.get(f"baseline_{name}")))
    console.print(table)
    for name, reason in unavailable.items():
        _say((f"{name}: n/a ({reason})", "yellow"))
    _say(_utility_line(result))
    _say(f"{result.grad_evals} gradient evaluations; {result.wall_time_s:.1f} s; "
         f"artifacts: {store.root / result.artifacts if result.artifacts else '-'}")


def _utility_line(result) -> str:
    """The released model's utility, and whether the attack's result depends on it."""
    metrics, cfg = result.metrics, result.config
    line = f"released model: accuracy on nonmembers {_fmt(metrics.get('target_accuracy'))}"
    if metrics.get("twin_accuracy") is not None:
        line += f" (undefended twin {_fmt(metrics['twin_accuracy'])}, drop {_fmt(metrics.get('accuracy_drop'))})"
    if result.costs.get("teacher_accuracy") is not None:  # a defense that distils a teacher it keeps (gascnn)
        line += (f"; its teacher {_fmt(result.costs['teacher_accuracy'])}, gap "
                 f"{_fmt(result.costs.get('accuracy_gap_teacher_minus_snn'))}")
    observation = result.info.get("observation", {})
    if observation.get("surface") == "gradients" and cfg.get("gradient_round") == "init":
        line += ("; the attack saw the update at the model's initialisation (--round init), so this accuracy is not "
                 "part of its result (--round trained attacks the trained model)")
    return line


@app.command("list")
def list_components(
    kind: Annotated[str | None, typer.Argument(help="defenses, attacks, datasets, models or metrics.")] = None,
) -> None:
    """Every registered component with its kind, origin and description; then each plugin that cannot be used, and why."""
    kinds = [kind] if kind else list(registry.ALL)
    table = Table("kind", "name", "origin", "description")
    broken = Table("kind", "name", "error", title="plugins that cannot be used (fix or uninstall them, or run with --no-plugins)")
    try:
        for k in kinds:
            if k not in registry.ALL:
                raise registry.UnknownNameError("kinds", k, list(registry.ALL))
            loaded, failed = registry.ALL[k].survey()
            for name, error in failed.items():
                broken.add_row(k, _text(name), _text(error))
            for entry in loaded:
                extra = ""
                for attr in ("surface", "family"):
                    value = getattr(entry.obj, attr, None)
                    if value is not None and not callable(value):
                        extra += f" [{attr}: {getattr(value, 'value', value)}]"
                table.add_row(k, _text(entry.name), _text(entry.origin.describe()), _text(entry.description + extra))
    except registry.RegistryError as exc:
        _fail_input(exc)
    console.print(table)
    if broken.row_count:
        console.print(broken)


@app.command()
def runs(
    limit: Annotated[int, typer.Option(help="How many rows (1 or more).")] = 20,
    status: Annotated[str | None, typer.Option(help="Only rows with this status (ok, failed, unsupported, "
                                                    "superseded).")] = None,
    store_path: Annotated[Path | None, typer.Option("--store", help="SQLite results file.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print rows as JSON.")] = False,
) -> None:
    """Recent stored runs. A damaged row is skipped with a warning naming it."""
    from privbench.config import ConfigError
    from privbench.store import STATUSES

    _log_to_stderr(logging.WARNING, err_console.is_terminal)
    try:
        if status is not None and status not in STATUSES:
            raise ConfigError(f"--status must be one of {', '.join(STATUSES)}, got {status!r}")
        if not 1 <= limit <= 10**9:
            raise ConfigError(f"--limit must be an integer in [1, 10^9], got {limit}")
        store = _open_store(store_path, create=False)
        rows = store.recent(limit, status) if store else []
        counts = store.counts() if store else {}
    except _input_errors() as exc:
        _fail_input(exc)
    if as_json:
        typer.echo(_json([r.to_dict() for r in rows]))
        return
    table = Table("run", "status", "defense", "attack", "dataset", "model", "seed", "metrics (attack / baseline)",
                  "time s")
    for r in rows:
        c = r.config
        shown = "; ".join(f"{name} {_fmt(r.metrics[name])}" + (f" / {_fmt(r.metrics[f'baseline_{name}'])}"
                                                                if f"baseline_{name}" in r.metrics else "")
                          for name in headline(r.metrics, r.info)[:3])
        table.add_row(*(str(v) for v in (r.run_id, r.status, c["defense"], c["attack"], c["dataset"], c["model"],
                                         c["seed"])), shown, f"{r.wall_time_s:.1f}")
    console.print(table)
    if store is None:
        _say(f"no runs stored yet (no results store at {_default_store()})")
    else:
        _say(", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "no runs stored yet")


@app.command("import")
def import_run(
    path: Annotated[Path, typer.Argument(help="A folder a run kept (it holds result.json and the run's artifacts), "
                                              "or such a result.json.")],
    store_path: Annotated[Path | None, typer.Option("--store", help="SQLite results file.")] = None,
    force: Annotated[bool, typer.Option("--force", help="If an ok row of the same config is stored, make the "
                                        "imported one current (the other is kept, marked superseded).")] = False,
) -> None:
    """Store a finished run's result that could not be stored when it finished ('bench run' names the folder)."""
    from privbench.store import Store

    _log_to_stderr(logging.WARNING, err_console.is_terminal)
    try:
        store = Store(store_path)
        row = store.import_run(path, replace=force)
    except _input_errors() as exc:
        _fail_input(exc)
    if row.cached:
        _say(f"run {row.run_id} is already stored in {store.path}; nothing to import")
    elif row.status == "superseded":
        _say(f"stored run {row.run_id} in {store.path} as superseded: an ok row of the same config was stored "
             f"already (--force makes the imported one current)")
    else:
        _say(f"stored run {row.run_id} ({row.status}) in {store.path}"
             + (f"; artifacts: {store.root / row.artifacts}" if row.artifacts else ""))


def _default_store() -> Path:
    from privbench.store import default_store_path

    return default_store_path()


@app.command()
def score(
    defense: Annotated[str | None, typer.Option(help="Only cells with this defense.")] = None,
    attack: Annotated[str | None, typer.Option(help="Only cells with this attack.")] = None,
    dataset: Annotated[str | None, typer.Option(help="Only cells on this dataset.")] = None,
    model: Annotated[str | None, typer.Option(help="Only cells with this model.")] = None,
    data_root: Annotated[Path | None, typer.Option(help="Folder holding the dataset.")] = None,
    store_path: Annotated[Path | None, typer.Option("--store", help="SQLite results file.")] = None,
    allow_download: Annotated[bool, typer.Option("--allow-download", help="Let metrics download missing weights.")] = False,
    threads: Annotated[int | None, typer.Option(help="Torch intra-op threads.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the cell scores as JSON.")] = False,
) -> None:
    """Set metrics (fd_eval, FID, KID) over every cell of stored reconstruction runs, written to the store.

    A run whose reconstruction artifact is missing or unreadable, or a damaged row, is skipped with a
    warning naming it; the other runs and cells are scored."""
    from privbench.provenance import configure_threads, resolve_threads

    _log_to_stderr(logging.WARNING, err_console.is_terminal)
    try:
        resolve_threads(threads)
        store = _open_store(store_path, create=False)
        from privbench import scoring

        filters = {k: v for k, v in (("defense", defense), ("attack", attack), ("dataset", dataset), ("model", model)) if v}
        cells = scoring.reconstruction_cells(store, filters) if store else {}
        if cells:
            store.check_writable()  # the scores are written to the store: checked before computing them
            configure_threads(threads)
        reports = [
            report for rows in cells.values()
            if (report := scoring.score_cell(store, rows, str(data_root) if data_root else None, allow_download))
        ]
    except _input_errors() as exc:
        _fail_input(exc)
    if as_json:
        typer.echo(_json([r.__dict__ for r in reports]))
        return
    if not reports:
        console.print("no stored reconstruction runs match; run 'bench run' first")
        return
    table = Table("cell", "runs", "metric", "n", "value [95% CI or spread]", "baseline (random auxiliary images)")
    reasons = []
    for report in reports:
        c = report.config
        label = f"{c['defense']} x {c['attack']} / {c['dataset']} / {c['model']} {c['image_size']}px"
        for entry in report.scores:
            sc, base = entry["score"], entry["baseline"]
            table.add_row(label, str(report.n_runs), sc["name"], str(sc["n"]), _fmt_set(sc),
                          _fmt_set(base) if base else "-")
            if sc["reason"]:
                reasons.append(f"{sc['name']}: {sc['reason']}")
        acc = (report.eval_classifier or {}).get("heldout_accuracy")
        _say(f"{label}: evaluation classifier held-out accuracy {_fmt(acc)}; per-run medians "
             + ", ".join(f"{k} {_fmt(v)}" for k, v in report.per_run_medians.items()))
    console.print(table)
    for reason in dict.fromkeys(reasons):
        _say((f"n/a ({reason})", "yellow"))


def _fmt_set(score: dict) -> str:
    if score["value"] is None:
        return "n/a (see below)"
    if score.get("interval"):
        low, high = score["interval"]
        return f"{score['value']:.4g} [{low:.4g}, {high:.4g}]"
    if score.get("spread") is not None:
        return f"{score['value']:.4g} +- {score['spread']:.2g}"
    return _fmt(score["value"])


@app.command()
def doctor(as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False) -> None:
    """What is available here, offline: data, metric weights, libraries, threads, devices, store."""
    from privbench.doctor import collect

    report = collect()
    if as_json:
        typer.echo(_json(report))
        return
    for section, rows in report.items():
        if isinstance(rows, list):
            table = Table(title=section)
            for column in rows[0].keys() if rows else ():
                table.add_column(column, overflow="fold")
            for row in rows:
                table.add_row(*(str(v) for v in row.values()))
            console.print(table)
        else:
            _say((section, "bold"), ": ", ", ".join(f"{k} {v}" for k, v in rows.items()))


weights_app = typer.Typer(help="Pretrained weights for perceptual metrics.", no_args_is_help=True)
app.add_typer(weights_app, name="weights")


@weights_app.command("list")
def weights_list() -> None:
    """Every weights file privbench can use and whether it is on this machine."""
    from privbench.doctor import weights_rows

    table = Table("key", "file", "used by", "status")
    for row in weights_rows():
        table.add_row(*(str(row[k]) for k in ("key", "file", "used by", "status")))
    console.print(table)


@weights_app.command("fetch")
def weights_fetch(
    keys: Annotated[list[str] | None, typer.Argument(help="Which files (default: all); see 'bench weights list'.")] = None,
) -> None:
    """Download weights into the torch hub cache (needs network access)."""
    from privbench.metrics import weights

    for key in keys or list(weights.KNOWN):
        if key not in weights.KNOWN:
            _fail_input(registry.UnknownNameError("weights", key, list(weights.KNOWN)))
        try:
            path = weights.locate(key)
            _say(f"{key}: already present at {path}")
        except weights.WeightsMissing:
            try:
                _say(f"{key}: downloaded to {weights.fetch(key)}")
            except Exception as exc:  # network errors are the user's to see, with the file they were after
                _say((f"{key}: download of {weights.KNOWN[key].url} failed: {exc}", "red"), err=True)
                raise typer.Exit(1) from None


ledger_app = typer.Typer(help="The he defense's hash-chained ledger of aggregation rounds.", no_args_is_help=True)
app.add_typer(ledger_app, name="ledger")


@ledger_app.command("verify")
def ledger_verify(
    source: Annotated[str, typer.Argument(help="A run id (its ledger artifacts) or the path of a ledger.jsonl.")],
    store_path: Annotated[Path | None, typer.Option("--store", help="SQLite results file.")] = None,
) -> None:
    """Recompute a ledger's hash chain; for a run id, also compare its head and block count with those the run
    recorded. Exit 0 if everything matches, 1 naming the first mismatch."""
    from privbench.defenses.he.ledger import verify
    from privbench.store import Store

    path = Path(source)
    if path.is_file():
        result = verify(path.read_bytes())
        _print_ledger(path, result)
        _say("no stored head to compare: truncation cannot be detected (give the run id to compare the "
             "chain with the head and block count its row recorded)")
        raise typer.Exit(0 if result.ok else 1)
    try:
        store = Store(store_path, create=False)
        row = store.get(source)
    except _input_errors() as exc:
        _fail_input(exc)
    if row is None:
        _fail_input(ValueError(f"{source!r} is neither a ledger file nor a run id in {store.path}; "
                               f"give a path to ledger.jsonl or a run id from 'bench runs'"))
    # the target's ledger, and the utility twin's (its plaintext federation keeps one too)
    recorded = [(name, (row.info.get(part) or {}).get("training") or {})
                for name, part in (("ledger.jsonl", "target"), ("twin-ledger.jsonl", "twin"))]
    recorded = [(name, training) for name, training in recorded
                if "ledger_head" in training or name in (training.get("artifacts") or ())]
    if not recorded:
        _fail_input(ValueError(f"run {source} has no ledger (only the he defense writes one; "
                               f"its defense is {row.config.get('defense')!r})"))
    failed = False
    for name, training in recorded:
        path = store.root / (row.artifacts or "") / name
        head, blocks = training.get("ledger_head"), training.get("ledger_blocks")
        if not path.is_file():
            _say((f"{path}: missing", "bold red"), f": run {source} recorded a ledger of {_fmt(blocks)} blocks with "
                 f"head {_fmt(head)}", err=True)
            failed = True
            continue
        if head is None or blocks is None:
            result = verify(path.read_bytes())
            _say(f"run {source} stored no ledger head for {name}: truncation cannot be detected")
        else:
            result = verify(path.read_bytes(), expected_head=head, expected_blocks=blocks)
        _print_ledger(path, result)
        failed = failed or not result.ok
    raise typer.Exit(1 if failed else 0)


def _print_ledger(path: Path, result) -> None:
    if result.ok:
        matched = f", ending in the recorded head {result.head}" if result.compared else ""
        _say(f"{path}: {result.blocks} block{'' if result.blocks == 1 else 's'}, hash chain intact{matched}")
        return
    where = "" if result.chain_intact else f" (block {result.bad_block} of {result.blocks}; every later block is unverified)"
    _say((f"{path}: tampered", "bold red"), f": {result.reason}{where}", err=True)


# -- views: leaderboard and report (they read the store; they never import the runner) -----------------


def _view_selection(store_path: Path | None, suite: Path | None, data_root: Path | None):
    """The rows a view shows, or exit 2 with the reason (no store, a bad spec, nothing selected)."""
    from privbench.suite.spec import SpecError
    from privbench.views.rows import SelectionError, select

    try:
        store = _open_store(store_path, create=False)
        if store is None:
            raise SelectionError(f"there is no results store at {_default_store()} (nothing has been stored there); "
                                 f"run 'bench run' or 'bench suite' first, or pass --store PATH")
        if suite is not None and not suite.is_file():
            raise SelectionError(f"--suite {suite}: no such spec file")
        selection = select(store, suite, str(data_root) if data_root else None)
        return store, selection
    except (*_input_errors(), SpecError, SelectionError) as exc:
        _fail_input(exc)


def _view_command(name: str, **options: object) -> str:
    """The command line that regenerates a view, as written into it (no --store: the store is the user's)."""
    parts = [f"bench {name}"]
    for key, value in options.items():
        if value is True:
            parts.append(f"--{key.replace('_', '-')}")
        elif value not in (None, False):
            parts.append(f"--{key.replace('_', '-')} {value}")
    return " ".join(parts)


@app.command("leaderboard")
def leaderboard_cmd(
    suite: Annotated[Path | None, typer.Option("--suite", help="Only the rows of this suite spec's jobs.")] = None,
    fmt: Annotated[str | None, typer.Option("--format", help="md, html, json or csv (default: md on stdout; "
                                                             "with --out, all four files).")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write README.md, leaderboard.json, .csv and .html "
                                                           "into this folder.")] = None,
    store_path: Annotated[Path | None, typer.Option("--store", help="SQLite results file.")] = None,
    data_root: Annotated[Path | None, typer.Option(help="Folder holding the suite's dataset (for its request keys).")] = None,
) -> None:
    """Boards per attack family from stored rows: one line per defense configuration, worst case first-class.

    Every ok, failed and unsupported row (superseded never), or with --suite the rows of that spec's jobs.
    Exit 2 when there is no store, the spec is bad or nothing is selected."""
    from privbench import leaderboard

    _log_to_stderr(logging.WARNING, err_console.is_terminal)
    if fmt is not None and fmt not in leaderboard.FORMATS:
        _fail_input(ValueError(f"--format must be one of {', '.join(leaderboard.FORMATS)}, got {fmt!r}"))
    store, selection = _view_selection(store_path, suite, data_root)
    command = _view_command("leaderboard", suite=suite, format=fmt, out=out)
    try:
        data = leaderboard.build(selection, store.cell_scores(), command=command)
    except _input_errors() as exc:
        _fail_input(exc)
    if out is None:
        typer.echo(leaderboard.render(data, fmt or "md"), nl=False)
        return
    try:
        written = leaderboard.write(data, out, (fmt,) if fmt else leaderboard.FORMATS)
    except OSError as exc:
        _fail_input(exc)
    rows = data["rows"]
    _say(f"leaderboard of {rows['total']} rows ({rows.get('ok', 0)} ok, {rows.get('failed', 0)} failed, "
         f"{rows.get('unsupported', 0)} unsupported) written to: " + ", ".join(str(p) for p in written))


@app.command("report")
def report_cmd(
    suite: Annotated[Path, typer.Option("--suite", help="The suite spec whose rows the report compares.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for index.html and figures/ (PNG and SVG).")],
    no_gallery: Annotated[bool, typer.Option("--no-gallery", help="No reconstruction galleries (for data you may "
                                                                  "not show).")] = False,
    store_path: Annotated[Path | None, typer.Option("--store", help="SQLite results file.")] = None,
    data_root: Annotated[Path | None, typer.Option(help="Folder holding the suite's dataset (for its request keys).")] = None,
) -> None:
    """One self-contained HTML comparison report (figures inline) of a suite's stored rows, plus the figures."""
    from privbench import leaderboard, report

    _log_to_stderr(logging.WARNING, err_console.is_terminal)
    store, selection = _view_selection(store_path, suite, data_root)
    command = _view_command("report", suite=suite, out=out, no_gallery=no_gallery)
    try:
        data = leaderboard.build(selection, store.cell_scores(), command=command)  # its header names this command
        path = report.build(selection, data, out, gallery=not no_gallery, command=command)
    except (*_input_errors(), OSError) as exc:
        _fail_input(exc)
    _say(f"report of {data['rows']['total']} rows written to {path} (figures in {path.parent / 'figures'})")
from privbench import cli_suite  # noqa: E402,F401  (registers "bench suite")


def entrypoint() -> None:  # pragma: no cover - console script
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    entrypoint()
