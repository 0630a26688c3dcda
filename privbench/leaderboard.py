"""Stored rows -> leaderboards: one board per attack family, one line per defense configuration.

A line holds the defense's utility (accuracy on nonmembers, drop against the utility twin), its costs
(training time against the twin, bytes, energy, epsilon) and, per attack of the family, the attack's
success with n and a bootstrap interval. The **worst case** over the family's attacks is the line's
privacy score and the sort key (most private first). Flags (footnotes):

- ``adaptive``: an attack designed for this defense (``Attack.adaptive_for``) was run.
- ``no verdict``: an attack fails against the defense, but the same attack (same parameters, budget, data
  and model) does not beat its trivial baseline against the undefended target (``none``) of the same cell
  either, or there is no such undefended row: its failure says nothing about the defense.
- ``unreliable``: a naive attack fails while an adaptive one succeeds, or a non-differentiable defense was
  attacked only through gradients, without an adaptive (surrogate) attack.
- ``claim``: the defense's seed paper states a figure (``Defense.paper_claims``); ours is shown beside it.

"Beats its trivial baseline": reconstruction, the median PSNR and the median SSIM over victims both above
the medians of the baseline's (the auxiliary mean image); membership, the AUC interval lies above 0.5;
another family, the median of its key metric above its ``baseline_`` metric where one is stored.

Failed and unsupported rows are counted on every line and never averaged in. A missing number is n/a
with its reason. This module never imports the runner; the board is built with pandas.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from privbench import __version__
from privbench.metrics.family import HEADLINE
from privbench.store import RunResult, dumps
from privbench.views.rows import Components, Selection, attack_key, canonical, control_key, families_in_order, line_key
from privbench.views.stats import BOOTSTRAP_NOTE, estimate, finite, fmt_estimate, fmt_number, na, spread

RECOGNISABLE_SSIM = 0.5
SUCCESS_METRIC: dict[str, str] = {"reconstruction": "ssim", "membership": "auc", "model_inversion": "attack_accuracy"}
SUCCESS_TEXT: dict[str, str] = {
    "reconstruction": "median SSIM of the reconstruction over victims (higher: more leaked)",
    "membership": "ROC AUC, mean over runs (higher: more leaked; 0.5 is chance)",
    "model_inversion": "attack accuracy of the evaluation classifier on the inverted class representatives",
}
FAMILY_TITLE: dict[str, str] = {
    "reconstruction": "Gradient inversion and reconstruction",
    "model_inversion": "Model inversion",
    "membership": "Membership inference",
}
BYTES_KEYS = ("ciphertext_bytes_per_client_round", "bytes_per_client_round", "bytes_per_round",
              "bytes_per_image_morphed", "bytes_per_image", "bytes")
ENERGY_KEYS = ("snn_energy_pj", "energy_pj_per_inference", "energy_pj")
FLAG_ORDER = ("adaptive", "no verdict", "unreliable", "claim")


def family_title(family: str) -> str:
    return FAMILY_TITLE.get(family, family.replace("_", " ").capitalize())


def success_metric(family: str) -> str:
    return SUCCESS_METRIC.get(family) or HEADLINE.get(family, ("",))[0]


# -- per-attack entries ------------------------------------------------------------------------


def _per_victim(rows: list[RunResult], name: str) -> list[float]:
    """Per-victim values of an image metric: the run's per-image list where stored, else its batch mean."""
    out: list[float] = []
    for r in rows:
        per = (r.info.get("per_image") or {}).get(name)
        if isinstance(per, list) and per:
            out += finite(per)
        else:
            out += finite([r.metrics.get(name)])
    return out


def _reason(rows: list[RunResult], name: str) -> str | None:
    for r in rows:
        why = (r.info.get("unavailable_metrics") or {}).get(name)
        if why:
            return str(why)
    return None


def _no_rows_reason(entry: dict[str, Any]) -> str:
    parts = []
    if entry["n_failed"]:
        parts.append(f"{entry['n_failed']} run(s) failed")
    if entry["n_unsupported"]:
        parts.append(f"{entry['n_unsupported']} unsupported")
    return ("no ok run: " + ", ".join(parts)) if parts else "no ok run"


def _metric(ok: list[RunResult], name: str, stat: str, what: str, fallback: str, per_victim: bool = False,
            ci_key: str | None = None) -> dict[str, Any]:
    if not ok:
        return na(fallback)
    values = _per_victim(ok, name) if per_victim else [r.metrics.get(name) for r in ok]
    reason = _reason(ok, name) or f"{name} not stored in the {len(ok)} ok run(s)"
    ci = ok[0].metrics.get(ci_key) if ci_key else None  # used when the runs give one value (n=1, or all equal)
    return estimate(values, stat, what=what, reason_if_empty=reason, ci=ci)


def _entry(rows: list[RunResult], family: str, cell_scores: list[dict]) -> dict[str, Any]:
    first = rows[0].config
    ok = [r for r in rows if r.status == "ok"]
    entry: dict[str, Any] = {
        "attack": first["attack"], "attack_params": first.get("attack_params") or {},
        "budget": first.get("budget"), "n_ok": len(ok),
        "n_failed": sum(r.status == "failed" for r in rows),
        "n_unsupported": sum(r.status == "unsupported" for r in rows),
        "errors": sorted({(r.error or "").splitlines()[0][:300] for r in rows if r.status != "ok" and r.error}),
        "run_ids": [r.run_id for r in rows], "config_hashes": sorted({r.config_hash for r in rows}),
        "seeds": sorted({r.config["seed"] for r in ok}),
    }
    fallback = _no_rows_reason(entry)
    metrics: dict[str, Any] = {}
    if family == "reconstruction":
        for name in ("psnr", "ssim"):
            metrics[name] = _metric(ok, name, "median", "victims", fallback, per_victim=True)
        for name in ("baseline_psnr", "baseline_ssim"):
            metrics[name] = _metric(ok, name, "median", "runs", fallback)
        metrics["label_accuracy"] = _metric(ok, "label_accuracy", "mean", "runs", fallback)
        perceptual = sorted({k for r in ok for k in r.metrics if k.startswith(("lpips", "fd_eval", "fid"))})
        for name in perceptual:
            metrics[name] = _metric(ok, name, "median", "runs", fallback)
        ssim = _per_victim(ok, "ssim")
        metrics["recognisable"] = (estimate([1.0 if s >= RECOGNISABLE_SSIM else 0.0 for s in ssim], "mean",
                                            what="victims") if ssim else na(fallback if not ok else "no SSIM stored"))
        for score in cell_scores:  # set metrics of this attack's cell (bench score), with their own n and interval
            if ok and set(score.get("run_ids") or ()) <= {r.run_id for r in ok} and score.get("score"):
                s = score["score"]
                metrics[f"set:{score['metric']}"] = {
                    "value": s.get("value"), "ci": s.get("interval"), "n": s.get("n"),
                    "reason": s.get("reason") if s.get("value") is None else None, "stat": "set"}
    elif family == "membership":
        metrics["auc"] = _metric(ok, "auc", "mean", "runs", fallback, ci_key="auc_ci")
        for name in ("tpr_at_0.01_fpr", "tpr_at_0.001_fpr"):
            metrics[name] = _metric(ok, name, "mean", "runs", fallback, ci_key=f"{name}_ci")
        metrics["advantage"] = _metric(ok, "advantage", "mean", "runs", fallback)
    else:  # another family (model inversion...): its headline metrics, or at least its success metric
        for name in HEADLINE.get(family) or (success_metric(family),):
            metrics[name] = _metric(ok, name, "mean", "runs", fallback)
            if any(f"baseline_{name}" in r.metrics for r in ok):
                metrics[f"baseline_{name}"] = _metric(ok, f"baseline_{name}", "mean", "runs", fallback)
    entry["metrics"] = metrics
    key = success_metric(family)
    entry["success"] = metrics.get(key) or na(fallback)
    entry["beats_baseline"] = _beats_baseline(family, metrics, key)
    return entry


def _beats_baseline(family: str, metrics: dict[str, Any], key: str) -> bool | None:
    """Does the attack beat its trivial baseline (None: cannot tell from what is stored)?"""
    if family == "reconstruction":
        pairs = [(metrics["psnr"], metrics["baseline_psnr"]), (metrics["ssim"], metrics["baseline_ssim"])]
        if any(a.get("value") is None or b.get("value") is None for a, b in pairs):
            return None
        return all(a["value"] > b["value"] for a, b in pairs)
    if family == "membership":
        auc = metrics["auc"]
        if auc.get("value") is None or not auc.get("ci"):
            return None
        return auc["ci"][0] > 0.5
    own, base = metrics.get(key) or {}, metrics.get(f"baseline_{key}") or {}
    if own.get("value") is None or base.get("value") is None:
        return None
    return own["value"] > base["value"]


# -- lines -----------------------------------------------------------------------------------------


def _targets(ok: list[RunResult]) -> list[RunResult]:
    """One row per trained target (rows sharing a target seed share the target and its utility)."""
    seen: dict[Any, RunResult] = {}
    for r in ok:
        ts = r.config.get("target_seed")
        seen.setdefault(("target", ts) if ts is not None else ("seed", r.config["seed"]), r)
    return list(seen.values())


def _utility(ok: list[RunResult], fallback: str) -> dict[str, Any]:
    targets = _targets(ok)
    acc = [r.metrics.get("target_accuracy") for r in targets]
    undefended = bool(ok) and ok[0].config["defense"] == "none" and not any("accuracy_drop" in r.metrics for r in ok)
    out = {
        "accuracy": estimate(acc, "mean", what="targets", reason_if_empty=fallback if not ok else
                             "target accuracy not stored"),
        "accuracy_spread": spread(acc),
        "accuracy_drop": ({"value": 0.0, "ci": None, "n": len(targets), "reason": None,
                           "ci_reason": "undefended: the reference itself (drop 0 by definition)"} if undefended else
                          estimate([r.metrics.get("accuracy_drop") for r in targets], "mean", what="targets",
                                   reason_if_empty=fallback if not ok else "no utility twin (no drop measured)")),
        "n_targets": len(targets),
    }
    return out


def _cost(ok: list[RunResult], fallback: str) -> dict[str, Any]:
    targets = _targets(ok)
    if not targets:
        return {k: na(fallback) for k in ("train_time_ratio", "bytes", "energy_pj", "energy_ratio", "epsilon")}
    ratios = []
    for r in targets:
        t, twin = r.costs.get("train_time_s"), r.costs.get("twin_train_time_s")
        if finite([t, twin]) == [t, twin] and twin:
            ratios.append(t / twin)
    out = {"train_time_ratio": estimate(ratios, "median", what="targets",
                                        reason_if_empty="no utility twin to compare with" if not any(
                                            "twin_train_time_s" in r.costs for r in targets) else
                                        "training time not stored")}
    key = next((k for k in BYTES_KEYS if any(k in r.costs for r in targets)), None)
    out["bytes"] = (estimate([r.costs.get(key) for r in targets], "median", what="targets") if key
                    else na("the defense sends no data of its own"))
    out["bytes"]["key"] = key
    ekey = next((k for k in ENERGY_KEYS if any(k in r.costs for r in targets)), None)
    out["energy_pj"] = (estimate([r.costs.get(ekey) for r in targets], "median", what="targets") if ekey
                        else na("energy per inference not measured for this defense"))
    out["energy_pj"]["key"] = ekey
    out["energy_ratio"] = (estimate([r.costs.get("energy_ratio_ann_over_snn") for r in targets], "median",
                                    what="targets")
                           if any("energy_ratio_ann_over_snn" in r.costs for r in targets)
                           else na("energy not measured for this defense"))
    out["epsilon"] = (estimate([r.costs.get("epsilon_spent") for r in targets], "median", what="targets",
                               reason_if_empty="epsilon not stored")
                      if any("epsilon_spent" in r.costs for r in targets) else na("no privacy accountant"))
    return out


def _claims(claims: list[dict], line: dict[str, Any], fd_ratio: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for claim in claims:
        q = claim.get("quantity")
        if q == "accuracy_drop":
            ours = line["utility"]["accuracy_drop"]
        elif q == "energy_ratio":
            ours = line["cost"]["energy_ratio"]
        elif q == "reconstruction_fd_ratio":
            ours = fd_ratio
        else:
            ours = na(f"privbench measures no {q!r}")
        out.append({**claim, "ours": ours})
    return out


def _fd_ratio(entries: list[dict], controls: dict[str, dict], line_rows: dict[str, list[RunResult]]) -> dict:
    """Reconstruction set distance (FID, else fd_eval) against the defense over the same attack's against
    ``none``, for the attack that gives the smallest ratio (the paper's claim is a lower bound)."""
    best = None
    for e in entries:
        ck = control_key(line_rows[e["_key"]][0])
        control = controls.get(ck)
        if control is None:
            continue
        for name in sorted(e["metrics"]):
            if not name.startswith(("set:fid", "set:fd_eval")):
                continue
            ours, base = e["metrics"][name].get("value"), control["metrics"].get(name, {}).get("value")
            if ours is None or not base:
                continue
            ratio = {"value": ours / base, "ci": None, "n": e["metrics"][name].get("n"), "reason": None,
                     "ci_reason": "ratio of two set scores", "detail": f"{name[4:]} of {e['attack']}"}
            if best is None or ratio["value"] < best["value"]:
                best = ratio
    return best or na("no set score (FID / fd_eval) of this defense's and none's reconstructions; run "
                      "'bench score' on both cells")


def build(selection: Selection, cell_scores: list[dict] | None = None, command: str | None = None) -> dict[str, Any]:
    """The boards of ``selection`` as one JSON-ready dict (see the module doc)."""
    rows = selection.rows
    comps = Components(rows)
    grouped: dict[str, dict[str, dict[str, list[RunResult]]]] = {}
    unassigned: list[RunResult] = []
    for r in rows:
        fam = comps.family(r.config["attack"])
        if fam is None:
            unassigned.append(r)
            continue
        grouped.setdefault(fam, {}).setdefault(line_key(r), {}).setdefault(attack_key(r), []).append(r)
    families = []
    for fam in families_in_order(set(grouped)):
        families.append(_board(fam, grouped[fam], comps, cell_scores or []))
    return {
        "privbench_version": __version__,
        "command": command or "bench leaderboard",
        "suite": selection.suite,
        "rows": {"total": len(rows), **selection.counts},
        "unassigned_rows": [{"run_id": r.run_id, "attack": r.config["attack"], "status": r.status}
                            for r in unassigned],
        "statistics": {"bootstrap": BOOTSTRAP_NOTE, "recognisable": f"per-victim SSIM >= {RECOGNISABLE_SSIM}",
                       "beats_baseline": "reconstruction: median PSNR and median SSIM over victims above the "
                                         "baseline's (the auxiliary mean image); membership: the AUC interval "
                                         "above 0.5"},
        "families": families,
    }


def _board(family: str, lines_in: dict[str, dict[str, list[RunResult]]], comps: Components,
           cell_scores: list[dict]) -> dict[str, Any]:
    # per attack entries, and an index of the undefended controls by cell
    line_rows: dict[str, list[RunResult]] = {}
    entries_of: dict[str, list[dict]] = {}
    controls: dict[str, dict] = {}
    for lk, attacks in lines_in.items():
        entries_of[lk] = []
        for ak, rows in attacks.items():
            e = _entry(rows, family, cell_scores)
            e["_key"] = ak + lk
            line_rows[e["_key"]] = rows
            entries_of[lk].append(e)
            if rows[0].config["defense"] == "none":
                controls[control_key(rows[0])] = e
    # parameters that vary between lines of one defense name: those are shown in its label
    varying: dict[str, list[str]] = {}
    by_name: dict[str, list[dict]] = {}
    for lk in lines_in:
        cfg = next(iter(lines_in[lk].values()))[0].config
        by_name.setdefault(cfg["defense"], []).append(cfg.get("defense_params") or {})
    for name, params in by_name.items():
        keys = sorted({k for p in params for k in p})
        varying[name] = [k for k in keys if len({canonical(p.get(k)) for p in params}) > 1]
    attack_labels: dict[str, str] = {}
    lines = []
    for lk, attacks in lines_in.items():
        rows = [r for rs in attacks.values() for r in rs]
        cfg = rows[0].config
        defense = cfg["defense"]
        ok = [r for r in rows if r.status == "ok"]
        entries = sorted(entries_of[lk], key=lambda e: (e["attack"], canonical(e["attack_params"])))
        for e in entries:
            e["label"] = _attack_label(e, entries_of)
            attack_labels.setdefault(e["label"], e["attack"])
        n_failed, n_unsupported = sum(r.status == "failed" for r in rows), sum(r.status == "unsupported" for r in rows)
        fallback = "no ok run" + (f": {n_failed} failed, {n_unsupported} unsupported" if rows else "")
        dparams = cfg.get("defense_params") or {}
        label = defense + (f"[{', '.join(f'{k}={dparams[k]}' for k in varying[defense])}]" if varying[defense] else "")
        line: dict[str, Any] = {
            "defense": defense, "defense_params": dparams, "label": label, "model": cfg.get("model"),
            "dataset": cfg.get("dataset"), "image_size": cfg.get("image_size"), "channels": cfg.get("channels"),
            "config": {k: v for k, v in cfg.items() if k not in ("attack", "attack_params", "budget", "seed")},
            "n_ok": len(ok), "n_failed": n_failed, "n_unsupported": n_unsupported,
            "run_ids": [r.run_id for r in rows], "config_hashes": sorted({r.config_hash for r in rows}),
            "utility": _utility(ok, fallback), "cost": _cost(ok, fallback),
        }
        flags = _flags(defense, entries, controls, line_rows, comps)
        measured = [e for e in entries if e["success"].get("value") is not None]
        if measured:
            worst = max(measured, key=lambda e: e["success"]["value"])
            line["worst_case"] = {**worst["success"], "attack": worst["label"]}
            nv = next((f for f in flags if f["flag"] == "no verdict" and f.get("attack") == worst["label"]), None)
            if nv:
                flags.append({"flag": "no verdict", "attack": None,
                              "text": f"the worst case ({worst['label']}) carries no verdict, so the line's privacy "
                                      f"score says nothing about {label}"})
        else:
            line["worst_case"] = {**na(f"no attack of this family has a number ({fallback})"), "attack": None}
        claims = comps.defense(defense).get("paper_claims") or []
        if claims:
            line["claims"] = _claims(claims, line, _fd_ratio(entries, controls, line_rows))
            for c in line["claims"]:
                flags.append({"flag": "claim", "attack": None,
                              "text": f"paper: {c['text']} ({c['quantity']} {c['relation']} {fmt_number(c['value'])}); "
                                      f"ours: {fmt_estimate(c['ours'])}"})
        else:
            line["claims"] = []
        line["flags"] = flags
        for e in entries:
            e.pop("_key", None)
        line["attacks"] = entries
        lines.append(line)
    lines.sort(key=lambda ln: (ln["worst_case"]["value"] is None, ln["worst_case"]["value"] or 0.0, ln["label"],
                               ln["model"] or "", ln["dataset"] or ""))
    for i, ln in enumerate(lines, 1):
        ln["rank"] = i if ln["worst_case"]["value"] is not None else None
    return {"family": family, "title": family_title(family), "success_metric": success_metric(family),
            "success_text": SUCCESS_TEXT.get(family, f"{success_metric(family)} (higher: more leaked)"),
            "attacks": sorted(attack_labels), "lines": lines}


def _attack_label(entry: dict, entries_of: dict[str, list[dict]]) -> str:
    """The attack's name, with its parameters where the same attack runs with several parameter sets."""
    name, params = entry["attack"], entry["attack_params"] or {}
    variants = {canonical(e["attack_params"]) for es in entries_of.values() for e in es if e["attack"] == name}
    if len(variants) <= 1 or not params:
        return name
    others = [e["attack_params"] or {} for es in entries_of.values() for e in es if e["attack"] == name]
    keys = sorted({k for p in others for k in p if len({canonical(o.get(k)) for o in others}) > 1})
    shown = [f"{k}={params[k]}" for k in keys if k in params]
    return f"{name}[{', '.join(shown)}]" if shown else name


def _flags(defense: str, entries: list[dict], controls: dict[str, dict], line_rows: dict[str, list[RunResult]],
           comps: Components) -> list[dict[str, Any]]:
    flags: list[dict[str, Any]] = []
    adaptive = [e for e in entries if defense in comps.attack(e["attack"]).get("adaptive_for", ())]
    if [e for e in adaptive if e["n_ok"]]:
        flags.append({"flag": "adaptive", "attack": None,
                      "text": f"attack(s) designed for {defense} were run: "
                              + ", ".join(e["label"] for e in adaptive if e["n_ok"])})
    for e in entries:
        if e["beats_baseline"] is not False:
            continue
        control = controls.get(control_key(line_rows[e["_key"]][0]))
        if control is None:
            flags.append({"flag": "no verdict", "attack": e["label"],
                          "text": f"no verdict: no undefended control ({e['label']} was not run against none on "
                                  f"the same data and model)"})
        elif control["beats_baseline"] is False:
            flags.append({"flag": "no verdict", "attack": e["label"],
                          "text": f"no verdict: {e['label']} does not beat its trivial baseline against the "
                                  f"undefended target either, so its failure says nothing"})
    naive = [e for e in entries if e not in adaptive]
    failing = [e for e in naive if e["beats_baseline"] is False]
    winning = [e for e in adaptive if e["beats_baseline"] is True]
    if failing and winning:
        flags.append({"flag": "unreliable", "attack": None,
                      "text": f"naive {', '.join(e['label'] for e in failing)} fail(s) while adaptive "
                              f"{', '.join(e['label'] for e in winning)} succeed(s): a naive evaluation of "
                              f"{defense} overstates its protection"})
    if not comps.defense(defense).get("differentiable", True):
        gradient = [e for e in entries if e["n_ok"] and comps.attack(e["attack"]).get("surface") == "gradients"]
        if gradient and not [e for e in adaptive if e["n_ok"]]:
            flags.append({"flag": "unreliable", "attack": None,
                          "text": f"{defense} is not differentiable and was attacked only through gradients "
                                  f"without a surrogate (no adaptive attack): "
                                  + ", ".join(e["label"] for e in gradient)})
    return flags


# -- outputs -----------------------------------------------------------------------------------------


def frame(board: dict[str, Any]):
    """One family's board as a pandas DataFrame: one row per defense configuration (the CSV's rows)."""
    import pandas as pd

    records = []
    for ln in board["lines"]:
        rec: dict[str, Any] = {
            "family": board["family"], "rank": ln["rank"], "defense": ln["label"], "model": ln["model"],
            "dataset": ln["dataset"], "runs_ok": ln["n_ok"], "runs_failed": ln["n_failed"],
            "runs_unsupported": ln["n_unsupported"],
        }
        _flat(rec, "accuracy", ln["utility"]["accuracy"])
        rec["accuracy_spread"] = ln["utility"]["accuracy_spread"]
        _flat(rec, "accuracy_drop", ln["utility"]["accuracy_drop"])
        for key in ("train_time_ratio", "bytes", "energy_pj", "epsilon"):
            _flat(rec, key, ln["cost"][key])
        by_label = {e["label"]: e for e in ln["attacks"]}
        for label in board["attacks"]:
            e = by_label.get(label)
            _flat(rec, f"{board['success_metric']}:{label}", e["success"] if e else na("not run on this line"))
        _flat(rec, "worst_case", ln["worst_case"])
        rec["worst_case_attack"] = ln["worst_case"].get("attack")
        rec["flags"] = "; ".join(sorted({f["flag"] for f in ln["flags"]}, key=FLAG_ORDER.index))
        rec["run_ids"] = " ".join(ln["run_ids"])
        rec["config_hashes"] = " ".join(ln["config_hashes"])
        records.append(rec)
    return pd.DataFrame.from_records(records)


def _flat(rec: dict, key: str, est: dict) -> None:
    rec[key] = est.get("value")
    ci = est.get("ci") or [None, None]
    rec[f"{key}_ci_low"], rec[f"{key}_ci_high"] = ci[0], ci[1]
    rec[f"{key}_n"] = est.get("n")
    rec[f"{key}_na_reason"] = est.get("reason") if est.get("value") is None else None


def to_csv(data: dict[str, Any]) -> str:
    import pandas as pd

    frames = [frame(b) for b in data["families"]]
    return pd.concat(frames, ignore_index=True).to_csv(index=False) if frames else ""


def to_json(data: dict[str, Any]) -> str:
    return dumps(data, indent=1, sort_keys=False) + "\n"


def md_escape(text: Any) -> str:
    """Store text for a Markdown table cell: HTML-significant characters as entities, pipes escaped."""
    s = "" if text is None else str(text)
    s = s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
    return " ".join(s.split())


def _pct(est: dict, digits: int = 3) -> str:
    return fmt_estimate(_scaled(est, 100.0), digits) if est.get("value") is not None else fmt_estimate(est)


def _scaled(est: dict, k: float) -> dict:
    out = dict(est)
    if est.get("value") is not None:
        out["value"] = est["value"] * k
        out["ci"] = [c * k for c in est["ci"]] if est.get("ci") else None
    return out


def cells(line: dict, board: dict) -> dict[str, str]:
    """The text of one board line's cells (shared by Markdown, HTML and the report)."""
    u, c = line["utility"], line["cost"]
    acc = _pct(u["accuracy"])
    if u.get("accuracy_spread") is not None and u["accuracy"].get("value") is not None:
        acc += f" (sd {u['accuracy_spread'] * 100:.2g})"
    out = {
        "rank": str(line["rank"]) if line["rank"] else "-",
        "defense": line["label"], "model": line["model"] or "", "dataset": line["dataset"] or "",
        "runs": f"{line['n_ok']} ok / {line['n_failed']} failed / {line['n_unsupported']} unsupported",
        "accuracy %": acc, "drop vs twin (points)": _pct(u["accuracy_drop"]),
        "train time vs twin (x)": fmt_estimate(c["train_time_ratio"]),
        "bytes": fmt_estimate(c["bytes"]) + (f" ({c['bytes']['key']})" if c["bytes"].get("key") else ""),
        "energy / inference (pJ)": fmt_estimate(c["energy_pj"]),
        "epsilon": fmt_estimate(c["epsilon"]),
    }
    by_label = {e["label"]: e for e in line["attacks"]}
    for label in board["attacks"]:
        e = by_label.get(label)
        out[f"{label}"] = fmt_estimate(e["success"]) if e else "not run"
    out["worst case"] = fmt_estimate(line["worst_case"]) + (f" ({line['worst_case']['attack']})"
                                                            if line["worst_case"].get("attack") else "")
    return out


def detail_cells(line: dict, entry: dict) -> dict[str, str]:
    metrics = entry["metrics"]
    out = {"defense": line["label"], "model": line["model"] or "", "dataset": line["dataset"] or "",
           "attack": entry["label"],
           "runs": f"{entry['n_ok']} ok / {entry['n_failed']} failed / {entry['n_unsupported']} unsupported"}
    for name, est in metrics.items():
        out[name] = fmt_estimate(est)
    out["beats baseline"] = {True: "yes", False: "no", None: "n/a"}[entry["beats_baseline"]]
    out["errors"] = "; ".join(entry["errors"])
    return out


def footnotes(board: dict) -> tuple[dict[int, list[tuple[str, list[int]]]], list[str]]:
    """Per line index, its flags each with its footnote numbers, and the footnotes' texts in order."""
    notes: list[str] = []
    marks: dict[int, list[tuple[str, list[int]]]] = {}
    for i, ln in enumerate(board["lines"]):
        grouped: dict[str, list[int]] = {}
        for f in sorted(ln["flags"], key=lambda f: FLAG_ORDER.index(f["flag"])):
            notes.append(f"{f['flag']}: {f['text']}" if not f["text"].startswith(f["flag"]) else f["text"])
            grouped.setdefault(f["flag"], []).append(len(notes))
        marks[i] = list(grouped.items())
    return marks, notes


def header_lines(data: dict[str, Any]) -> list[str]:
    rows = data["rows"]
    out = [f"Generated by `{data['command']}` (privbench {data['privbench_version']}) from {rows['total']} stored "
           f"rows: {rows.get('ok', 0)} ok, {rows.get('failed', 0)} failed, {rows.get('unsupported', 0)} unsupported "
           f"(failed and unsupported rows are counted, never averaged in)."]
    if data.get("suite"):
        s = data["suite"]
        out.append(f"Suite {s['name']} (spec {s['path']}, hash {str(s['spec_hash'])[:12]}): {s['jobs']} jobs, "
                   f"{s.get('missing', 0)} without a stored row.")
    out.append(f"Intervals: {data['statistics']['bootstrap']}. Recognisable: {data['statistics']['recognisable']}. "
               f"Beats its trivial baseline: {data['statistics']['beats_baseline']}.")
    if data.get("unassigned_rows"):
        out.append(f"{len(data['unassigned_rows'])} row(s) of attacks whose family is unknown here are not on any "
                   f"board: " + ", ".join(f"{r['run_id']} ({r['attack']}, {r['status']})"
                                         for r in data["unassigned_rows"][:10]))
    return out


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(md_escape(h) for h in header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(md_escape(c) for c in row) + " |" for row in rows]
    return out


def to_markdown(data: dict[str, Any]) -> str:
    """The board as Markdown: a pure function of the JSON (``leaderboard.json`` renders to ``README.md``)."""
    out = ["# privbench leaderboard", "",
           "Generated from stored rows only: never edit by hand. Regenerate with the command below.", ""]
    for line in header_lines(data):
        out += [md_escape(line), ""]
    for board in data["families"]:
        out += ["", f"## {md_escape(board['title'])}", "",
                md_escape(f"Success: {board['success_text']}. Worst case: the attack with the highest success; it "
                          f"is the line's privacy score and the sort key (most private first)."), ""]
        marks, notes = footnotes(board)
        header = None
        rows = []
        for i, ln in enumerate(board["lines"]):
            c = cells(ln, board)
            c["flags"] = " ".join(f"{flag}[{', '.join(map(str, ns))}]" for flag, ns in marks.get(i, []))
            header = header or list(c)
            rows.append([c[h] for h in header])
        out += _md_table(header or ["defense"], rows)
        if notes:
            out += [""] + [f"{n}. {md_escape(text)}" for n, text in enumerate(notes, 1)]
        out += ["", f"### {md_escape(board['title'])}: per attack", ""]
        details = [detail_cells(ln, e) for ln in board["lines"] for e in ln["attacks"]]
        keys: list[str] = []
        for d in details:
            keys += [k for k in d if k not in keys]
        out += _md_table(keys, [[d.get(k, "") for k in keys] for d in details])
    return "\n".join(out) + "\n"


def to_html(data: dict[str, Any]) -> str:
    from privbench.views.html import render

    return render("leaderboard.html.j2", data=data, **html_context(data))


def html_context(data: dict[str, Any]) -> dict[str, Any]:
    boards = []
    for board in data["families"]:
        marks, notes = footnotes(board)
        lines = [cells(ln, board) for ln in board["lines"]]
        details = [detail_cells(ln, e) for ln in board["lines"] for e in ln["attacks"]]
        keys: list[str] = []
        for d in details:
            keys += [k for k in d if k not in keys]
        boards.append({"board": board, "header": list(lines[0]) if lines else [], "lines": lines,
                       "marks": [marks.get(i, []) for i in range(len(lines))], "notes": notes,
                       "detail_keys": keys, "details": details})
    return {"boards": boards, "header_lines": header_lines(data)}


FORMATS = ("md", "html", "json", "csv")
FILES = {"md": "README.md", "json": "leaderboard.json", "csv": "leaderboard.csv", "html": "leaderboard.html"}


def render(data: dict[str, Any], fmt: str) -> str:
    return {"md": to_markdown, "json": to_json, "csv": to_csv, "html": to_html}[fmt](data)


def write(data: dict[str, Any], out: Path, formats: tuple[str, ...] = FORMATS) -> list[Path]:
    """Write the board in ``formats`` into ``out`` (README.md, leaderboard.json / .csv / .html)."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        path = out / FILES[fmt]
        path.write_text(render(data, fmt), encoding="utf-8")
        written.append(path)
    return written


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
