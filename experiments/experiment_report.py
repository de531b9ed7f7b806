"""The report of ``run_experiments.py``: per-setting aggregates over seeds, ``results.md``,
``results.json`` and PNG curves (mean over seeds with a +-1 std band), all written atomically.

A setting is a dict ``{"group", "label", "slug", "algorithm", "run", "runs": [{"seed", "dir"}]}``;
each run dir holds the trainer's ``metrics.jsonl``. Missing or unfinished seeds are left out
and the table says how many seeds each line averages.

Comparisons are paired by seed (a seed fixes the prompts, their order and the reward noise for
every method): per seed the difference of final held-out accuracy and of the area under the
validation curve (AUC: trapezoid mean of held-out accuracy over the evaluated steps), then the
mean difference with a 95 % Student-t interval over seeds.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from icpo._io import atomic_path, atomic_write_text

KEPT = "drop_mixed_groups/kept_group_frac"
"""Logged by the trainer under ``reward.drop_mixed_groups`` (not the paper's coarse protocol)."""
BONUS = "icpo/bonus"
"""Derived per step: reward/final/mean - reward/mean, the mean reward ICPO added (0 for GRPO)."""
DIAG_KEYS = (
    ("confidence/group_std", "within-group conf. std"),
    ("confidence/std", "batch conf. std"),
    ("icpo/score/mean", "score mean"),
    ("icpo/score/std", "score std"),
    (BONUS, "ICPO bonus"),
    ("zero_std_group_frac", "zero-std groups"),
    ("advantage/std", "adv. std"),
    (KEPT, "kept groups"),
    ("premise/correct_less_confident", "correct less conf."),
    ("premise/bonus_at_cap", "bonus at cap"),
    ("accuracy", "train acc."),
)
"""Diagnostics averaged over the steps of each run, then over seeds; a column whose key no run
logged is left out of the table."""
CURVE_PANELS = (("val/accuracy", "held-out accuracy"), ("entropy", "entropy"))
DIAG_PANELS = (("confidence/std", "confidence std (batch)"), ("icpo/score/mean", "ICPO score mean"),
               (BONUS, "ICPO bonus (mean reward added)"), ("omega", "omega"),
               ("zero_std_group_frac", "zero-std group fraction"),
               ("advantage/std", "advantage std"),
               ("premise/correct_less_confident", "premise: correct is less confident"),
               ("premise/bonus_at_cap", "bonus at its cap |R|/tau"))
COMPARED_GROUPS = ("main", "noisy", "coarse")
"""Groups holding a GRPO and an ICPO line: ICPO - GRPO within the group."""
BASELINE = ("main", "grpo")
"""The ablation groups' lines (omega schedules, delta) are compared with GRPO of ``main``."""
ABLATION_REFERENCES = {"omega": "icpo_omega_constant", "delta": "icpo_delta0.5"}
"""And with one line of their own group, as the paper compares them: every omega schedule with
no decay (Table 4's "No decay", schedule ``constant``), every delta with 0.5 (Table 6's value
for models under 4B, the preset's)."""
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042)
"""Two-sided 95 % Student-t quantiles for 1..30 degrees of freedom (1.96 beyond)."""


# ------------------------------------------------------------------------------- reading runs
def read_rows(path: str | Path) -> list[dict]:
    """The rows of a ``metrics.jsonl`` plus the derived :data:`BONUS`; a bad line raises
    ValueError."""
    from icpo.trainer.plots import read_metrics

    rows = read_metrics(path)
    for r in rows:
        final, base = r.get("reward/final/mean"), r.get("reward/mean")
        # Under reward.drop_mixed_groups reward/final covers only the kept groups, reward/mean
        # all of them: their difference is not the bonus, so it is not derived there.
        if _num(final) and _num(base) and KEPT not in r:
            r[BONUS] = final - base
    return rows


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    """``(step, value)`` for every row holding a finite number under ``key``, by step."""
    pts = {int(r["step"]): float(r[key]) for r in rows if "step" in r and _num(r.get(key))}
    return sorted(pts.items())


def final_value(rows: list[dict], key: str) -> float | None:
    """``key`` at the last step that logged it (None if never logged)."""
    pts = series(rows, key)
    return pts[-1][1] if pts else None


def step_mean(rows: list[dict], key: str) -> float | None:
    """Mean of ``key`` over the training steps (step >= 1) that logged it."""
    vals = [v for s, v in series(rows, key) if s >= 1]
    return sum(vals) / len(vals) if vals else None


def mean_std(values: list[float | None]) -> dict:
    """Mean and sample std (n-1) over the non-None values; std is 0 for a single value."""
    v = [x for x in values if x is not None]
    if not v:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
            "n": len(v)}


def auc(rows: list[dict], key: str = "val/accuracy") -> float | None:
    """Area under ``key``'s curve over the steps it was logged at (trapezoids), divided by the
    step span: the curve's average height, comparable across runs of the same schedule."""
    pts = series(rows, key)
    if len(pts) < 2:
        return pts[0][1] if pts else None
    area = sum((s1 - s0) * (v0 + v1) / 2 for (s0, v0), (s1, v1) in zip(pts, pts[1:]))
    return area / (pts[-1][0] - pts[0][0])


def t_interval(values: list[float]) -> dict:
    """Mean, sample std, n and the 95 % Student-t interval ``[lo, hi]`` of the mean (None when
    n < 2)."""
    out = mean_std(values)
    n = out["n"]
    if n < 2:
        return {**out, "ci95": None}
    half = (T975[n - 2] if n - 1 <= len(T975) else 1.96) * out["std"] / math.sqrt(n)
    return {**out, "ci95": [out["mean"] - half, out["mean"] + half]}


def band(runs: list[list[dict]], key: str) -> dict:
    """Mean and std over runs of ``key`` at the steps every run logged it."""
    per_run = [dict(series(rows, key)) for rows in runs]
    steps = sorted(set.intersection(*(set(p) for p in per_run))) if per_run else []
    stats = [mean_std([p[s] for p in per_run]) for s in steps]
    return {"steps": steps, "mean": [m["mean"] for m in stats], "std": [m["std"] for m in stats]}


def load_setting(setting: dict) -> dict[int, list[dict]]:
    """``seed -> rows`` for the seeds of ``setting`` whose metrics file exists and parses."""
    out = {}
    for run in setting["runs"]:
        path = Path(run["dir"]) / "metrics.jsonl"
        if path.is_file():
            out[int(run["seed"])] = read_rows(path)
    return out


# ------------------------------------------------------------------------------- aggregation
def summarize(setting: dict, by_seed: dict[int, list[dict]]) -> dict:
    """Final held-out accuracy / entropy and step-mean diagnostics of one setting over seeds."""
    seeds = sorted(by_seed)
    per_seed = [{"seed": k,
                 "initial_val_acc": dict(series(by_seed[k], "val/accuracy")).get(0),
                 "final_val_acc": final_value(by_seed[k], "val/accuracy"),
                 "final_entropy": final_value(by_seed[k], "entropy"),
                 "val_auc": auc(by_seed[k]),
                 "last_step": max((int(r.get("step", 0)) for r in by_seed[k]), default=0),
                 "diagnostics": {key: step_mean(by_seed[k], key) for key, _ in DIAG_KEYS}}
                for k in seeds]
    pick = lambda name: [p[name] for p in per_seed]  # noqa: E731  (a one-line helper)
    return {**{k: setting[k] for k in ("group", "label", "slug", "algorithm", "run")},
            "per_seed": per_seed,
            "final_val_acc": mean_std(pick("final_val_acc")),
            "final_entropy": mean_std(pick("final_entropy")),
            "val_auc": mean_std(pick("val_auc")),
            "initial_val_acc": mean_std(pick("initial_val_acc")),
            "diagnostics": {key: mean_std([p["diagnostics"][key] for p in per_seed])["mean"]
                            for key, _ in DIAG_KEYS},
            "curves": {key: band([by_seed[k] for k in seeds], key)
                       for key, _ in CURVE_PANELS + DIAG_PANELS}}


def paired(a: dict, b: dict) -> dict:
    """``a - b`` paired by seed, for final held-out accuracy, validation AUC and final entropy."""
    out = {"label": a["label"], "group": a["group"], "baseline": f"{b['group']} {b['label']}"}
    for key in ("final_val_acc", "val_auc", "final_entropy"):
        va = {p["seed"]: p[key] for p in a["per_seed"] if p[key] is not None}
        vb = {p["seed"]: p[key] for p in b["per_seed"] if p[key] is not None}
        seeds = sorted(set(va) & set(vb))
        diffs = [va[k] - vb[k] for k in seeds]
        out[key] = {"seeds": seeds, "diffs": diffs, **t_interval(diffs),
                    "wins": sum(d > 0 for d in diffs), "ties": sum(d == 0 for d in diffs)}
    return out


def compare(summaries: list[dict]) -> list[dict]:
    """Paired differences: ICPO - GRPO within each of :data:`COMPARED_GROUPS`; every line of
    the other groups (omega schedules, delta) minus :data:`BASELINE` (GRPO on clean rewards),
    then minus its group's line named in :data:`ABLATION_REFERENCES`."""
    out = []
    base = next((s for s in summaries if (s["group"], s["algorithm"]) == BASELINE), None)
    for group in dict.fromkeys(s["group"] for s in summaries):
        lines = [s for s in summaries if s["group"] == group]
        if group in COMPARED_GROUPS:
            by_algo = {s["algorithm"]: s for s in lines}
            if set(by_algo) == {"grpo", "icpo"}:
                out.append(paired(by_algo["icpo"], by_algo["grpo"]))
        else:
            if base is not None:
                out += [paired(s, base) for s in lines]
            ref = next((s for s in lines if s["slug"] == ABLATION_REFERENCES.get(group)), None)
            if ref is not None:
                out += [paired(s, ref) for s in lines if s is not ref]
    return out


# ------------------------------------------------------------------------------- rendering
def _pm(stat: dict, scale: float = 1.0, digits: int = 3) -> str:
    if stat["mean"] is None:
        return "n/a"
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


def _ci(stat: dict, scale: float = 100.0, digits: int = 1) -> str:
    """``+1.2 [-0.3, +2.7]``, in points by default (no interval under two seeds)."""
    if stat["mean"] is None:
        return "n/a"
    f = lambda v: f"{scale * v:+.{digits}f}"  # noqa: E731  (a one-line helper)
    if stat["ci95"] is None:
        return f(stat["mean"])
    lo, hi = stat["ci95"]
    return f"{f(stat['mean'])} [{f(lo)}, {f(hi)}]"


def _cell(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def render_markdown(summaries: list[dict], comparisons: list[dict], meta: dict) -> str:
    """``results.md``: results table, ICPO - GRPO comparisons, diagnostics table, how to read it."""
    lines = ["# Experiments: GRPO vs ICPO", "",
             f"Mode `{meta.get('mode')}`, preset `{meta.get('preset')}`, seeds {meta.get('seeds')}"
             + (f", mode overrides `{' '.join(meta['mode_overrides'])}`"
                if meta.get("mode_overrides") else "")
             + ". Mean ± sample std over seeds; *final* = the last step that logged the value; "
             "*AUC* = mean held-out accuracy over the evaluated steps (trapezoids).", ""]
    coarse = meta.get("coarse_data")
    if coarse:
        lines += [f"Coarse data (paper protocol): {coarse['model']} sampled G={coarse['n']} per "
                  f"training prompt once; kept {coarse['kept']} of {coarse['judged']} prompts "
                  f"({coarse['all_correct']} all correct, {coarse['all_wrong']} all wrong).", ""]
    lines += ["## Results", "",
             "| group | setting | algorithm | final held-out acc. | val. AUC | final entropy "
             "| initial acc. | seeds |",
             "|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        lines.append(f"| {s['group']} | {s['label']} | {s['algorithm'].upper()} "
                     f"| {_pm(s['final_val_acc'])} | {_pm(s['val_auc'])} "
                     f"| {_pm(s['final_entropy'])} | {_cell(s['initial_val_acc']['mean'])} "
                     f"| {s['final_val_acc']['n']} |")
    if comparisons:
        lines += ["", "## Paired differences (points; mean over seeds [95 % t-interval])", "",
                  "| group | setting | minus | final acc. | better in | val. AUC | better in "
                  "| final entropy (nats) | final acc. per seed |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for c in comparisons:
            f, a = c["final_val_acc"], c["val_auc"]
            per = ", ".join(f"{d * 100:+.1f}" for d in f["diffs"])
            ent = _ci(c["final_entropy"], scale=1.0, digits=3)
            lines.append(f"| {c['group']} | {c['label']} | {c['baseline']} | {_ci(f)} "
                         f"| {f['wins']}/{f['n']} | {_ci(a)} | {a['wins']}/{a['n']} | {ent} "
                         f"| {per} |")
    cols = [(k, label) for k, label in DIAG_KEYS
            if any(s["diagnostics"][k] is not None for s in summaries)]
    if cols:
        lines += ["", "## Why: diagnostics (mean over training steps, then over seeds)", "",
                  "| group | setting | " + " | ".join(label for _, label in cols) + " |",
                  "|---|---|" + "---|" * len(cols)]
        for s in summaries:
            lines.append(f"| {s['group']} | {s['label']} | "
                         + " | ".join(_cell(s["diagnostics"][k]) for k, _ in cols) + " |")
    lines += ["", "How to read the diagnostics:",
              "- *conf. std*: spread of response confidence (mean token log-prob). "
              "`batch conf. std` is over all responses of a step, an upper bound on the "
              "within-group spread that ICPO's preference score (Eq. 9) feeds on; when it is "
              "small, ICPO's scores are nearly equal within a group and ICPO behaves like GRPO.",
              "- *score mean / std*: ICPO's preference advantage score S (0 for GRPO); "
              "*ICPO bonus*: mean reward ICPO added, omega * min(S, |R|/tau), bounded by the "
              "reward itself.",
              "- *zero-std groups*: fraction of prompts whose G rewards are all equal. GRPO gets "
              "no gradient from those groups; ICPO can, through the confidence bonus, when "
              "|R| > 0."]
    if any(k.startswith("premise/") for k, _ in cols):
        lines.append("- *correct less conf.*: among within-group (correct, wrong) pairs, the "
                     "fraction where the correct response is the less confident (ICPO's premise "
                     "needs it well above 0); *bonus at cap*: fraction of responses whose bonus "
                     "is clipped at |R|/tau.")
    if any(k == KEPT for k, _ in cols):
        lines.append("- *kept groups*: `reward.drop_mixed_groups`, fraction of prompts kept "
                     "(all G rewards equal); the bonus is not derivable from the logged means "
                     "there (n/a).")
    return "\n".join(lines + [""])


def plot_group(path: Path, title: str, summaries: list[dict], panels) -> Path | None:
    """One panel per ``(key, label)`` of ``panels``, one line (mean, +-std band) per setting;
    None (nothing written) when no setting logged any of the keys."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(s["curves"][k]["steps"] for s in summaries for k, _ in panels):
        return None
    cols = 2 if len(panels) <= 4 else 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.8 * rows), squeeze=False)
    for ax, (key, label) in zip(axes.flat, panels):
        for s in summaries:
            c = s["curves"][key]
            if not c["steps"]:
                continue
            lo = [m - d for m, d in zip(c["mean"], c["std"])]
            hi = [m + d for m, d in zip(c["mean"], c["std"])]
            (line,) = ax.plot(c["steps"], c["mean"], marker="o" if len(c["steps"]) < 25 else None,
                              ms=3, label=f"{s['label']} (n={s['final_val_acc']['n']})")
            ax.fill_between(c["steps"], lo, hi, color=line.get_color(), alpha=0.2)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)  # the grid's unused cells
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def write_report(exp_dir: str | Path, settings: list[dict], meta: dict) -> list[Path]:
    """Aggregate ``settings`` and write results.md, results.json and plots under ``exp_dir``;
    returns the paths written."""
    exp_dir = Path(exp_dir)
    summaries = [summarize(s, load_setting(s)) for s in settings]
    comparisons = compare(summaries)
    written = [exp_dir / "results.md", exp_dir / "results.json"]
    atomic_write_text(written[0], render_markdown(summaries, comparisons, meta))
    payload = {"meta": meta, "settings": summaries, "comparisons": comparisons}
    atomic_write_text(written[1], json.dumps(_jsonable(payload), indent=1) + "\n")
    for group in dict.fromkeys(s["group"] for s in summaries):
        members = [s for s in summaries if s["group"] == group]
        written.append(plot_group(exp_dir / "plots" / f"{group}.png",
                                  f"{group}: held-out accuracy and entropy", members, CURVE_PANELS))
        if group in COMPARED_GROUPS:
            written.append(plot_group(exp_dir / "plots" / f"diagnostics_{group}.png",
                                      f"{group}: why (GRPO vs ICPO)", members, DIAG_PANELS))
    return [p for p in written if p is not None]
