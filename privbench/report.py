"""Stored rows -> one self-contained comparison report (HTML, figures inline) plus the figures as PNG and SVG.

Built with Jinja2 (autoescape on: every text from the store is escaped) and seaborn / matplotlib:

- the privacy-utility frontier per family (accuracy drop vs worst-case attack success, error bars, Pareto front);
- per reconstruction attack, PSNR and SSIM over victims per defense, the trivial baseline as a line;
- membership ROC curves on log-log axes (from each run's ``roc.json``) and TPR at 0.1%, 1% and 10% FPR;
- reconstruction galleries (each run's ``reconstruction.png``: original, reconstruction, baseline), unless
  turned off (``--no-gallery``: only for data you may show);
- the boards and the cost table; the DP curve when several epsilons were run;
- how to reproduce: the spec, privbench's version and commit, the commands.

No network is used and nothing is loaded from elsewhere: the HTML holds every image as a data URI. This
module never imports the runner.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from privbench import leaderboard
from privbench.store import RunResult
from privbench.views.rows import Selection
from privbench.views.stats import estimate, fmt_estimate, na

log = logging.getLogger(__name__)

ROC_FPRS = (0.001, 0.01, 0.1)
GALLERY_VICTIMS = 3
GALLERY_ATTACKS = 3


def _mpl():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.hashsalt": "privbench", "figure.dpi": 100, "font.size": 9})
    return plt


def mpl_text(text: Any) -> str:
    """Store text for a matplotlib label: '$' would start mathtext, so it is escaped."""
    return str(text).replace("$", r"\$")


class Figures:
    """Figures saved as PNG and SVG under ``folder`` and kept as data URIs for the HTML."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.items: list[dict[str, Any]] = []

    def add(self, fig, name: str, title: str, caption: str, section: str) -> dict[str, Any]:
        plt = _mpl()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight")
        (self.folder / f"{name}.png").write_bytes(buf.getvalue())
        fig.savefig(self.folder / f"{name}.svg", format="svg", bbox_inches="tight", metadata={"Date": None})
        plt.close(fig)
        item = {"name": name, "title": title, "caption": caption, "section": section,
                "src": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii"),
                "files": [f"figures/{name}.png", f"figures/{name}.svg"]}
        self.items.append(item)
        return item

    def of(self, section: str) -> list[dict[str, Any]]:
        return [f for f in self.items if f["section"] == section]


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:60] or "x"


# -- figures ---------------------------------------------------------------------------------------


def frontier(figs: Figures, board: dict, notes: list[str]) -> None:
    plt = _mpl()
    pts = []
    for ln in board["lines"]:
        drop, worst = ln["utility"]["accuracy_drop"], ln["worst_case"]
        if drop.get("value") is None or worst.get("value") is None:
            notes.append(f"{board['title']}: {ln['label']} ({ln['model']}, {ln['dataset']}) is not on the frontier: "
                         f"accuracy drop {fmt_estimate(drop)}, worst case {fmt_estimate(worst)}")
            continue
        pts.append((ln, drop, worst))
    if not pts:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = np.array([p[1]["value"] * 100 for p in pts])
    ys = np.array([p[2]["value"] for p in pts])
    xerr = np.array([[(p[1]["value"] - p[1]["ci"][0]) * 100, (p[1]["ci"][1] - p[1]["value"]) * 100]
                     if p[1].get("ci") else [0, 0] for p in pts]).T
    yerr = np.array([[p[2]["value"] - p[2]["ci"][0], p[2]["ci"][1] - p[2]["value"]]
                     if p[2].get("ci") else [0, 0] for p in pts]).T
    ax.errorbar(xs, ys, xerr=np.clip(xerr, 0, None), yerr=np.clip(yerr, 0, None), fmt="o", capsize=3,
                color="#1f77b4", ecolor="#999")
    for (ln, _, _), x, y in zip(pts, xs, ys, strict=True):
        ax.annotate(mpl_text(f"{ln['label']} ({ln['model']})"), (x, y), textcoords="offset points", xytext=(4, 4),
                    fontsize=7)
    order = np.lexsort((ys, xs))
    front, best = [], math.inf
    for i in order:  # lower drop and lower success are both better
        if ys[i] < best:
            front.append(i)
            best = ys[i]
    ax.step(xs[front], ys[front], where="post", color="#d62728", lw=1.2, label="Pareto front")
    ax.set_xlabel("accuracy drop against the utility twin (points; error bars: 95% bootstrap over targets)")
    ax.set_ylabel(mpl_text(f"worst-case {board['success_metric']} (95% bootstrap)"))
    ax.set_title(mpl_text(f"{board['title']}: privacy vs utility"))
    ax.legend(loc="best")
    ax.grid(alpha=0.3)
    figs.add(fig, f"frontier-{_slug(board['family'])}", f"{board['title']}: frontier",
             "Each defense configuration: accuracy drop vs its worst-case attack success; lower left is better; "
             "the red steps join the configurations no other beats on both axes.", "frontier")


def distributions(figs: Figures, board: dict, grouped: dict[str, list[tuple[dict, list[RunResult]]]]) -> None:
    """Per reconstruction attack: PSNR and SSIM over victims per defense line, with the baseline's median."""
    import pandas as pd
    import seaborn as sns

    plt = _mpl()
    for label, items in grouped.items():
        records = []
        base = {"psnr": [], "ssim": []}
        for ln, rows in items:
            for r in rows:
                if r.status != "ok":
                    continue
                for metric in ("psnr", "ssim"):
                    vals = leaderboard._per_victim([r], metric)
                    records += [{"defense": mpl_text(f"{ln['label']} / {ln['model']}"), "metric": metric, "value": v}
                                for v in vals]
                    b = r.metrics.get(f"baseline_{metric}")
                    if isinstance(b, (int, float)) and math.isfinite(b):
                        base[metric].append(b)
        if not records:
            continue
        df = pd.DataFrame.from_records(records)
        n_def = df["defense"].nunique()
        fig, axes = plt.subplots(1, 2, figsize=(max(7, 1.0 * n_def + 4), 4))
        for ax, metric in zip(axes, ("psnr", "ssim"), strict=True):
            sub = df[df["metric"] == metric]
            with warnings.catch_warnings():  # seaborn's boxplot passes matplotlib's deprecated 'vert'
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.simplefilter("ignore", PendingDeprecationWarning)
                sns.boxplot(data=sub, x="defense", y="value", ax=ax, color="#cfe2f3", fliersize=0)
            sns.stripplot(data=sub, x="defense", y="value", ax=ax, size=2.5, color="#333", alpha=0.6, jitter=0.25)
            if base[metric]:
                ax.axhline(float(np.median(base[metric])), color="#d62728", ls="--", lw=1,
                           label="trivial baseline (auxiliary mean image), median")
                ax.legend(loc="best", fontsize=7)
            ax.set_ylabel(metric.upper() + (" (dB)" if metric == "psnr" else ""))
            ax.set_xlabel("")
            ax.tick_params(axis="x", rotation=45, labelsize=7)
            for t in ax.get_xticklabels():
                t.set_horizontalalignment("right")
        fig.suptitle(mpl_text(f"{label}: reconstruction quality over victims"))
        figs.add(fig, f"victims-{_slug(label)}", f"{label}: PSNR and SSIM over victims",
                 "One point per victim image; boxes: quartiles; dashed: the median of the trivial baseline.",
                 "distributions")


def _roc(store_root: Path, row: RunResult) -> dict | None:
    if not row.artifacts:
        return None
    path = store_root / row.artifacts / "roc.json"
    try:
        data = json.loads(path.read_text())
        fpr, tpr = np.asarray(data["fpr"], dtype=float), np.asarray(data["tpr"], dtype=float)
        if fpr.shape != tpr.shape or fpr.size < 2:
            return None
        return {"fpr": fpr, "tpr": tpr}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("run %s: its ROC (%s) cannot be read (%s); left out of the ROC figure", row.run_id, path, exc)
        return None


def _tpr_at(roc: dict, target: float) -> float:
    ok = roc["fpr"] <= target
    return float(roc["tpr"][ok].max()) if ok.any() else 0.0


def membership(figs: Figures, grouped: dict[str, list[tuple[dict, list[RunResult]]]], store_root: Path,
               tables: list[dict]) -> None:
    plt = _mpl()
    grid = np.logspace(-4, 0, 200)
    for label, items in grouped.items():
        fig, ax = plt.subplots(figsize=(5.5, 5))
        drawn = 0
        for ln, rows in items:
            ok = [r for r in rows if r.status == "ok"]
            rocs = [(r, roc) for r in ok if (roc := _roc(store_root, r)) is not None]
            row_out = {"defense": ln["label"], "model": ln["model"] or "", "dataset": ln["dataset"] or "",
                       "attack": label, "runs": f"{len(ok)} ok / {len(rows) - len(ok)} failed or unsupported"}
            for target in ROC_FPRS:
                key = f"TPR at {target * 100:g}% FPR"
                vals = []
                short = []
                for r, roc in rocs:
                    n_out = r.metrics.get("n_nonmembers_scored")
                    if isinstance(n_out, int) and n_out < 10 / target:
                        short.append(n_out)
                        continue
                    vals.append(_tpr_at(roc, target))
                if vals:
                    row_out[key] = fmt_estimate(estimate(vals, "mean", what="runs"))
                elif short:
                    row_out[key] = fmt_estimate(na(f"needs {10 / target:,.0f} nonmembers scored, got {max(short)}"))
                elif not ok:
                    row_out[key] = fmt_estimate(na("no ok run"))
                else:
                    row_out[key] = fmt_estimate(na("no ROC artifact (roc.json) stored with the runs"))
            tables.append(row_out)
            if not rocs:
                continue
            curves = np.array([np.interp(grid, roc["fpr"], roc["tpr"]) for _, roc in rocs])
            ax.plot(grid, np.clip(curves.mean(0), 1e-4, 1),
                    label=mpl_text(f"{ln['label']} / {ln['model']} (n={len(rocs)})"))
            drawn += 1
        if not drawn:
            _mpl().close(fig)
            continue
        ax.plot(grid, grid, color="#999", ls=":", lw=1, label="chance")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(1e-4, 1)
        ax.set_ylim(1e-4, 1.05)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title(mpl_text(f"{label}: ROC (log-log), mean over runs"))
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(alpha=0.3, which="both")
        figs.add(fig, f"roc-{_slug(label)}", f"{label}: membership ROC",
                 "ROC on log-log axes, one line per defense (the mean TPR over runs at each FPR).", "membership")


def dp_curve(figs: Figures, data: dict, notes: list[str]) -> None:
    plt = _mpl()
    series = []
    for board in data["families"]:
        pts = []
        for ln in board["lines"]:
            if ln["defense"] != "dp":
                continue
            eps = ln["defense_params"].get("epsilon")
            if not isinstance(eps, (int, float)):
                continue
            pts.append((float(eps), ln))
        if len({(p[0], p[1]["model"], p[1]["dataset"]) for p in pts}) >= 2:
            series.append((board, sorted(pts, key=lambda p: p[0])))
    if not series:
        notes.append("No DP curve: the suite has fewer than two epsilons of the dp defense.")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    finite_eps = [e for _, pts in series for e, _ in pts if math.isfinite(e)]
    inf_at = (max(finite_eps) * 4) if finite_eps else 1.0

    def x_of(e: float) -> float:
        return e if math.isfinite(e) else inf_at

    board0, pts0 = series[0]
    acc = [(x_of(e), ln["utility"]["accuracy"]) for e, ln in pts0 if ln["utility"]["accuracy"].get("value") is not None]
    if acc:
        axes[0].errorbar([a[0] for a in acc], [a[1]["value"] * 100 for a in acc],
                         yerr=np.array([[(a[1]["value"] - a[1]["ci"][0]) * 100, (a[1]["ci"][1] - a[1]["value"]) * 100]
                                        if a[1].get("ci") else [0, 0] for a in acc]).T.clip(0), fmt="o-", capsize=3)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("epsilon (target; inf plotted at the right edge)")
    axes[0].set_ylabel("accuracy on nonmembers (%)")
    for board, pts in series:
        ws = [(x_of(e), ln["worst_case"]) for e, ln in pts if ln["worst_case"].get("value") is not None]
        if ws:
            axes[1].errorbar([w[0] for w in ws], [w[1]["value"] for w in ws],
                             yerr=np.array([[w[1]["value"] - w[1]["ci"][0], w[1]["ci"][1] - w[1]["value"]]
                                            if w[1].get("ci") else [0, 0] for w in ws]).T.clip(0),
                             fmt="o-", capsize=3, label=mpl_text(f"{board['title']} ({board['success_metric']})"))
    axes[1].set_xscale("log")
    axes[1].set_xlabel("epsilon (target; inf plotted at the right edge)")
    axes[1].set_ylabel("worst-case attack success")
    axes[1].legend(fontsize=7)
    ticks = sorted({x_of(e) for _, pts in series for e, _ in pts})
    labels = [("inf" if t == inf_at and not any(math.isfinite(e) and e == t for _, p in series for e, _ in p)
               else f"{t:g}") for t in ticks]
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        ax.set_xticks(ticks, labels)
        ax.minorticks_off()
    fig.suptitle("DP-SGD: accuracy and attack success vs epsilon")
    figs.add(fig, "dp-epsilon", "DP: accuracy and attack success vs epsilon",
             "Each point a dp configuration; error bars: 95% bootstrap intervals.", "dp")


def galleries(selection: Selection, board: dict | None, store_root: Path) -> tuple[list[dict], list[str]]:
    """Per reconstruction attack (a few), a table: rows = victims (seeds), columns = defense lines; each cell the
    run's reconstruction grid (original | reconstruction | baseline)."""
    out, notes = [], []
    if board is None:
        return out, notes
    for label in board["attacks"][:GALLERY_ATTACKS]:
        cols = []
        for ln in board["lines"]:
            e = next((e for e in ln["attacks"] if e["label"] == label), None)
            if e and e["n_ok"]:
                cols.append((ln, e))
        if not cols:
            continue
        by_run = {r.run_id: r for r in selection.rows}
        seeds = sorted(set.intersection(*[set(e["seeds"]) for _, e in cols]))[:GALLERY_VICTIMS] or \
            sorted(cols[0][1]["seeds"])[:GALLERY_VICTIMS]
        table = []
        missing = 0
        for seed in seeds:
            cells = []
            for _ln, e in cols:
                row = next((by_run[i] for i in e["run_ids"] if i in by_run and by_run[i].status == "ok"
                            and by_run[i].config["seed"] == seed), None)
                src = None
                if row is not None and row.artifacts:
                    path = store_root / row.artifacts / "reconstruction.png"
                    if path.is_file():
                        src = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
                missing += src is None
                cells.append({"src": src, "run_id": row.run_id if row else None})
            table.append({"seed": seed, "cells": cells})
        if all(c["src"] is None for t in table for c in t["cells"]):
            notes.append(f"{label}: no reconstruction.png artifact stored with its runs; no gallery")
            continue
        out.append({"attack": label, "columns": [f"{ln['label']} / {ln['model']}" for ln, _ in cols], "rows": table,
                    "missing": missing})
    return out, notes


def _grouped(board: dict, selection: Selection) -> dict[str, list[tuple[dict, list[RunResult]]]]:
    by_run = {r.run_id: r for r in selection.rows}
    out: dict[str, list[tuple[dict, list[RunResult]]]] = {}
    for ln in board["lines"]:
        for e in ln["attacks"]:
            out.setdefault(e["label"], []).append((ln, [by_run[i] for i in e["run_ids"] if i in by_run]))
    return out


def cost_table(data: dict) -> list[dict[str, str]]:
    seen, out = set(), []
    for board in data["families"]:
        for ln in board["lines"]:
            key = (ln["label"], ln["model"], ln["dataset"])
            if key in seen:
                continue
            seen.add(key)
            c, u = ln["cost"], ln["utility"]
            out.append({"defense": ln["label"], "model": ln["model"] or "", "dataset": ln["dataset"] or "",
                        "accuracy %": leaderboard._pct(u["accuracy"]),
                        "drop vs twin (points)": leaderboard._pct(u["accuracy_drop"]),
                        "train time vs twin (x)": fmt_estimate(c["train_time_ratio"]),
                        "bytes": fmt_estimate(c["bytes"]) + (f" ({c['bytes']['key']})" if c["bytes"].get("key") else ""),
                        "energy / inference (pJ)": fmt_estimate(c["energy_pj"]),
                        "ANN / defense energy (x)": fmt_estimate(c["energy_ratio"]),
                        "epsilon spent": fmt_estimate(c["epsilon"])})
    return out


def build(selection: Selection, data: dict, out: Path, *, gallery: bool = True, command: str = "") -> Path:
    """Write ``out/index.html`` and ``out/figures/*.png|svg``; return the HTML's path."""
    from privbench.provenance import git_commit
    from privbench.views.html import render

    store_root = Path(selection.store_path).parent
    figs = Figures(out / "figures")
    notes: list[str] = []
    roc_tables: list[dict] = []
    for board in data["families"]:
        frontier(figs, board, notes)
        grouped = _grouped(board, selection)
        if board["family"] == "reconstruction":
            distributions(figs, board, grouped)
        elif board["family"] == "membership":
            membership(figs, grouped, store_root, roc_tables)
    dp_curve(figs, data, notes)
    recon = next((b for b in data["families"] if b["family"] == "reconstruction"), None)
    gal, gal_notes = galleries(selection, recon, store_root) if gallery else ([], ["Galleries turned off (--no-gallery)."])
    notes += gal_notes
    suite = data.get("suite") or {}
    html = render("report.html.j2", data=data, figures=figs, notes=notes, roc_tables=roc_tables, galleries=gal,
                  costs=cost_table(data), git=git_commit(), command=command, suite=suite,
                  spec_text=_spec_text(suite.get("path")), **leaderboard.html_context(data))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "index.html"
    path.write_text(html, encoding="utf-8")
    return path


def _spec_text(path: str | None) -> str | None:
    if not path:
        return None
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError:
        return None

