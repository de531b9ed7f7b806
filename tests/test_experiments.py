"""Tests for experiments/run_experiments.py and experiments/experiment_report.py without training:
plan (settings, dedup by effective config, seeds), resume detection, aggregation over seeds,
the markdown/JSON report and the plots, on synthetic ``metrics.jsonl`` files."""

import json
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import experiment_data as xd  # noqa: E402  (after sys.path setup)
import experiment_report as rep  # noqa: E402  (after sys.path setup)
import run_experiments as rx  # noqa: E402  (after sys.path setup)

from icpo.config import ConfigError, load_config, save_config  # noqa: E402  (after sys.path setup)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _preset(tmp_path, delta=0.5, schedule="warmup_decay", steps=12):
    path = tmp_path / "preset.yaml"
    path.write_text(
        "rollout: {engine: hf, n: 4, max_response_length: 64}\n"
        f"algorithm: {{name: icpo, delta: {delta}, omega: {{schedule: {schedule}}}}}\n"
        "actor: {ppo_mini_batch_size: 8}\n"
        f"trainer: {{total_steps: {steps}, train_batch_size: 8, eval_every: 4, device: cpu}}\n")
    return path


def _plan(tmp_path, preset, settings=None, seeds=(1, 2, 3), mode=()):
    data = (tmp_path / "data" / "train.jsonl", tmp_path / "data" / "val.jsonl")
    return rx.make_plan(settings or rx.all_settings(), list(seeds), list(mode), tmp_path / "exp",
                        data, preset)


# ------------------------------------------------------------------------------- plan
def test_settings_cover_the_paper_experiments():
    s = rx.all_settings()
    assert len({x.slug for x in s}) == len(s)
    by_group = {g: [x for x in s if x.group == g] for g in rx.GROUP_NAMES}
    for g in ("main", "noisy", "coarse"):
        assert sorted(x.algorithm for x in by_group[g]) == ["grpo", "icpo"]
    assert all("reward.noise_fraction=0.4" in x.overrides for x in by_group["noisy"])
    assert all(x.coarse for x in by_group["coarse"])
    assert not any(x.coarse for x in s if x.group != "coarse")
    assert sorted(o for x in by_group["omega"] for o in x.overrides if "schedule" in o) == sorted(
        f"algorithm.omega.schedule={k}"
        for k in ("warmup_decay", "warmup_retention", "linear_decay", "constant"))
    assert [x.overrides[-1] for x in by_group["delta"]] == [f"algorithm.delta={d}"
                                                            for d in (0.3, 0.4, 0.5, 0.6)]


def test_dedup_follows_the_effective_config(tmp_path):
    plan = _plan(tmp_path, _preset(tmp_path, delta=0.5))
    assert plan.run_of["icpo_omega_warmup_decay"] == "icpo_clean"
    assert plan.run_of["icpo_delta0.5"] == "icpo_clean"
    assert plan.run_of["icpo_delta0.4"] == "icpo_delta0.4"
    assert len({r.name for r in plan.runs}) == 12 and len(plan.runs) == 36
    assert len({r.out_dir for r in plan.runs}) == 36
    # With another preset delta/schedule, other settings are the duplicates.
    plan = _plan(tmp_path, _preset(tmp_path, delta=0.4, schedule="constant"))
    assert plan.run_of["icpo_delta0.4"] == "icpo_clean"
    assert plan.run_of["icpo_omega_constant"] == "icpo_clean"
    assert plan.run_of["icpo_delta0.5"] == "icpo_delta0.5"
    assert plan.run_of["icpo_omega_warmup_decay"] == "icpo_omega_warmup_decay"


def test_runs_vary_seeds_and_resolve_to_the_setting(tmp_path):
    preset = _preset(tmp_path)
    noisy = [s for s in rx.all_settings() if s.slug in ("grpo_noisy", "icpo_delta0.3")]
    plan = _plan(tmp_path, preset, noisy, seeds=(1, 2), mode=rx.MODE_OVERRIDES["quick"])
    assert [(r.name, r.seed) for r in plan.runs] == [("grpo_noisy", 1), ("grpo_noisy", 2),
                                                     ("icpo_delta0.3", 1), ("icpo_delta0.3", 2)]
    for r in plan.runs:
        cfg = load_config(preset, r.overrides)
        assert cfg.trainer.seed == cfg.data.seed == cfg.reward.noise_seed == r.seed
        assert (Path(cfg.trainer.output_dir) == r.out_dir
                and r.out_dir.name == f"{r.name}_seed{r.seed}")
        assert cfg.trainer.total_steps == r.total_steps == 6  # the quick mode's override wins
        assert cfg.data.train_files == [str(tmp_path / "data" / "train.jsonl")]
        assert cfg.trainer.progress_bar is False
    g, i = (load_config(preset, plan.runs[k].overrides) for k in (0, 2))
    assert (g.algorithm.name, g.reward.noise_fraction) == ("grpo", 0.4)
    assert (i.algorithm.name, i.algorithm.delta, i.reward.noise_fraction) == ("icpo", 0.3, 0.0)


def test_plan_rejects_bad_input_before_running(tmp_path):
    with pytest.raises(ConfigError, match="actor.lrr"):
        _plan(tmp_path, _preset(tmp_path), mode=["actor.lrr=1"])
    with pytest.raises(ValueError, match="seeds"):
        _plan(tmp_path, _preset(tmp_path), seeds=())
    with pytest.raises(ValueError, match="--only.*bogus"):
        rx.select_settings("main,bogus", quick=False)


def test_select_settings():
    assert {s.group for s in rx.select_settings(None, quick=True)} == set(rx.QUICK_GROUPS)
    assert {s.group for s in rx.select_settings(None, quick=False)} == set(rx.GROUP_NAMES)
    picked = rx.select_settings("noisy,icpo_delta0.6", quick=True)
    assert [s.slug for s in picked] == ["grpo_noisy", "icpo_noisy", "icpo_delta0.6"]


def test_estimates_grow_with_the_work(tmp_path):
    small = load_config(_preset(tmp_path, steps=10))
    big = load_config(_preset(tmp_path, steps=20))
    per_step = rx.estimate_run_seconds(big) - rx.estimate_run_seconds(small)
    assert per_step > 0
    wide = load_config(_preset(tmp_path, steps=10),
                       ["trainer.train_batch_size=16", "actor.ppo_mini_batch_size=16"])
    assert rx.estimate_run_seconds(wide) - rx.estimate_run_seconds(small) == pytest.approx(per_step)


@pytest.mark.parametrize("mode", ["quick", "full"])
def test_the_real_preset_fits_the_mode_budget(tmp_path, mode):
    """Guards the preset: a longer preset must come with a smaller plan (or a new budget)."""
    seeds = rx.SEEDS[mode]
    plan = _plan(tmp_path, rx.PRESET, rx.select_settings(None, quick=mode == "quick"),
                 seeds=range(1, seeds + 1), mode=rx.MODE_OVERRIDES[mode])
    assert all(len([r for r in plan.runs if r.name == n]) == seeds
               for n in {r.name for r in plan.runs})
    assert plan.estimate_s <= rx.BUDGET_S[mode]


# ------------------------------------------------------------------------------- synthetic runs
def _write_run(folder, steps, acc, ent, conf_std=0.1, score=0.0, final_shift=0.0, coarse=False):
    """metrics.jsonl like the trainer's: step 0 holds only val/accuracy; evals every 2 steps."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"step": 0, "time": 0.0, "val/accuracy": acc[0]}]
    for s in range(1, steps + 1):
        r = {"step": s, "time": float(s), "entropy": ent[s - 1], "confidence/std": conf_std,
             "icpo/score/mean": score, "reward/mean": 0.5, "reward/final/mean": 0.5 + final_shift,
             "zero_std_group_frac": 0.25, "omega": 0.5, "advantage/std": 0.9, "accuracy": 0.4}
        if coarse:
            r[rep.KEPT] = 0.3
        if s % 2 == 0:
            r["val/accuracy"] = acc[s // 2]
        rows.append(r)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _setting(group, label, algorithm, dirs):
    return {"group": group, "label": label, "slug": f"{algorithm}_{group}", "algorithm": algorithm,
            "run": f"{algorithm}_{group}",
            "runs": [{"seed": k, "dir": str(d)} for k, d in dirs.items()]}


def test_report_aggregates_over_seeds(tmp_path):
    exp = tmp_path / "exp"
    grpo_acc = {1: 0.40, 2: 0.50, 3: 0.60}
    icpo_acc = {1: 0.45, 2: 0.48, 3: 0.70}
    settings = [_setting("main", "GRPO", "grpo", {k: exp / f"g{k}" for k in (1, 2, 3)}),
                _setting("main", "ICPO", "icpo", {k: exp / f"i{k}" for k in (1, 2, 3, 4)})]
    for k in (1, 2, 3):
        _write_run(exp / f"g{k}", 4, [0.3, 0.35, grpo_acc[k]], [0.9, 0.8, 0.7, 0.6 + k / 100])
        _write_run(exp / f"i{k}", 4, [0.3, 0.35, icpo_acc[k]], [0.9, 0.8, 0.7, 0.5 + k / 100],
                   conf_std=0.2, score=1.5 + k, final_shift=0.1)
    # seed 4 of ICPO never ran: it is left out, not counted.
    written = rep.write_report(exp, settings, {"mode": "test", "seeds": [1, 2, 3]})
    res = json.loads((exp / "results.json").read_text())
    g, i = res["settings"]
    assert g["final_val_acc"]["n"] == 3 and i["final_val_acc"]["n"] == 3
    assert g["final_val_acc"]["mean"] == pytest.approx(statistics.fmean(grpo_acc.values()))
    assert g["final_val_acc"]["std"] == pytest.approx(statistics.stdev(grpo_acc.values()))
    assert i["final_entropy"]["mean"] == pytest.approx(0.52)
    assert i["initial_val_acc"]["mean"] == pytest.approx(0.3)
    assert i["diagnostics"]["icpo/score/mean"] == pytest.approx(3.5)
    assert i["diagnostics"][rep.BONUS] == pytest.approx(0.1) and g["diagnostics"][rep.BONUS] == 0
    assert i["curves"]["val/accuracy"]["steps"] == [0, 2, 4]
    (cmp,) = res["comparisons"]
    diffs = [icpo_acc[k] - grpo_acc[k] for k in (1, 2, 3)]
    f = cmp["final_val_acc"]
    assert f["diffs"] == pytest.approx(diffs) and f["wins"] == 2 and f["seeds"] == [1, 2, 3]
    assert f["mean"] == pytest.approx(statistics.fmean(diffs))
    half = 4.303 * statistics.stdev(diffs) / 3 ** 0.5  # t(0.975, df=2)
    assert f["ci95"] == pytest.approx([f["mean"] - half, f["mean"] + half], abs=1e-6)
    # AUC of (0, 0.3), (2, 0.35), (4, acc) by trapezoids over a span of 4 steps: (1.0 + acc) / 4.
    assert i["val_auc"]["mean"] == pytest.approx(
        statistics.fmean((1.0 + a) / 4 for a in icpo_acc.values()))
    assert cmp["val_auc"]["diffs"] == pytest.approx([d / 4 for d in diffs])
    assert cmp["final_entropy"]["diffs"] == pytest.approx([-0.1] * 3)
    assert cmp["final_entropy"]["wins"] == 0

    md = (exp / "results.md").read_text()
    mean, std = statistics.fmean(icpo_acc.values()), statistics.stdev(icpo_acc.values())
    assert f"| main | ICPO | ICPO | {mean:.3f} ± {std:.3f} | " in md
    assert " | 0.520 ± 0.010 | 0.300 | 3 |" in md
    lo, hi = f["ci95"]
    assert (f"| main | ICPO | main GRPO | {100 * f['mean']:+.1f} "
            f"[{100 * lo:+.1f}, {100 * hi:+.1f}] | 2/3 |") in md
    assert "| -0.100 [-0.100, -0.100] |" in md  # paired final entropy, in nats
    assert "coarse" not in md.split("## Why")[1].split("How to read")[0]  # no coarse column/rows
    pngs = [p for p in written if p.suffix == ".png"]
    assert {p.name for p in pngs} == {"main.png", "diagnostics_main.png"}
    assert all(p.read_bytes().startswith(PNG_MAGIC) for p in pngs)
    leftovers = [p.name for p in exp.rglob("*") if ".tmp" in p.name]
    assert leftovers == []


def test_ablations_are_paired_with_clean_grpo(tmp_path):
    exp = tmp_path / "exp"
    settings = [_setting("main", "GRPO", "grpo", {k: exp / f"g{k}" for k in (1, 2)}),
                _setting("omega", "ICPO constant", "icpo", {k: exp / f"o{k}" for k in (1, 2)})]
    for k in (1, 2):
        _write_run(exp / f"g{k}", 2, [0.3, 0.4], [0.5, 0.5])
        _write_run(exp / f"o{k}", 2, [0.3, 0.4 + k / 10], [0.5, 0.5])
    rep.write_report(exp, settings, {"mode": "test", "seeds": [1, 2]})
    (cmp,) = json.loads((exp / "results.json").read_text())["comparisons"]
    assert (cmp["group"], cmp["label"], cmp["baseline"]) == ("omega", "ICPO constant", "main GRPO")
    assert cmp["final_val_acc"]["diffs"] == pytest.approx([0.1, 0.2])


def test_t_interval():
    assert rep.t_interval([1.0, 2.0, 3.0])["ci95"] == pytest.approx([2 - 4.303 / 3 ** 0.5,
                                                                     2 + 4.303 / 3 ** 0.5])
    assert rep.t_interval([5.0])["ci95"] is None and rep.t_interval([5.0])["mean"] == 5.0
    wide = rep.t_interval([float(x % 2) for x in range(40)])  # df 39 > 30: the normal quantile
    assert wide["ci95"][1] - wide["mean"] == pytest.approx(1.96 * wide["std"] / 40 ** 0.5)
    assert rep.auc([{"step": 0, "v": 0.0}, {"step": 2, "v": 1.0}, {"step": 4, "v": 1.0}],
                   "v") == pytest.approx(0.75)


def test_series_and_band_edge_cases(tmp_path):
    rows = [{"step": 0, "val/accuracy": 0.2}, {"step": 1, "entropy": None},
            {"step": 2, "entropy": 0.5}, {"step": 3, "entropy": "inf"},
            {"step": 3, "val/accuracy": 0.4}]
    assert rep.series(rows, "entropy") == [(2, 0.5)]
    assert rep.final_value(rows, "val/accuracy") == 0.4 and rep.final_value(rows, "missing") is None
    assert rep.step_mean(rows, "val/accuracy") == 0.4  # step 0 (before training) is not a step
    b = rep.band([[{"step": 1, "x": 1.0}, {"step": 2, "x": 3.0}], [{"step": 2, "x": 5.0}]], "x")
    assert b == {"steps": [2], "mean": [4.0], "std": [pytest.approx(2 ** 0.5)]}
    assert rep.mean_std([None, 2.0]) == {"mean": 2.0, "std": 0.0, "n": 1}
    assert rep.mean_std([]) == {"mean": None, "std": None, "n": 0}


def test_bonus_not_derived_under_drop_mixed_groups_and_bad_lines_named(tmp_path):
    from icpo.trainer import peer_features

    assert rep.KEPT in Path(peer_features.__file__).read_text()  # the key the trainer logs
    _write_run(tmp_path / "c", 2, [0.3, 0.3], [0.5, 0.5], final_shift=0.2, coarse=True)
    rows = rep.read_rows(tmp_path / "c" / "metrics.jsonl")
    assert all(rep.BONUS not in r for r in rows)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 0}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        rep.read_rows(bad)


# ------------------------------------------------------------------------------- resume, CLI
def test_run_finished_needs_last_step_and_same_config(tmp_path):
    preset = _preset(tmp_path, steps=4)
    (run,) = _plan(tmp_path, preset, [rx.all_settings()[0]], seeds=(1,)).runs
    assert not rx.run_finished(run, preset)
    _write_run(run.out_dir, 3, [0.3, 0.3], [0.5] * 3)  # stopped before its last step
    save_config(load_config(preset, run.overrides), run.out_dir / "config.yaml")
    assert not rx.run_finished(run, preset)
    _write_run(run.out_dir, 4, [0.3, 0.3, 0.4], [0.5] * 4)
    assert rx.run_finished(run, preset)
    save_config(load_config(preset, [*run.overrides, "actor.lr=0.5"]), run.out_dir / "config.yaml")
    assert not rx.run_finished(run, preset)  # stale: planned with another config


def test_report_only_cli_reads_finished_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(rx.DATA_SIZES, "full", (16, 4))
    preset, exp, res = _preset(tmp_path), tmp_path / "exp", tmp_path / "res"
    for name in ("grpo_clean", "icpo_clean"):
        for k in (1, 2):
            _write_run(exp / "runs" / f"{name}_seed{k}", 4, [0.3, 0.3, 0.3 + k / 10], [0.5] * 4)
    code = rx.main(["--report-only", "--only", "main", "--seeds", "2", "--out", str(exp),
                    "--config", str(preset), "--results", str(res)])
    assert code == 0
    assert sum(1 for _ in (exp / "data" / "train.jsonl").open()) == 16
    assert not (exp / "results.md").exists()
    md = (res / "results.md").read_text()
    # (0, .3), (2, .3), (4, .3 + k/10): trapezoids
    aucs = [(0.6 + 0.6 + k / 10) / 4 for k in (1, 2)]
    got = json.loads((res / "results.json").read_text())["settings"][0]["val_auc"]
    assert got["mean"] == pytest.approx(statistics.fmean(aucs))
    assert got["std"] == pytest.approx(statistics.stdev(aucs))
    auc = f"{got['mean']:.3f} ± {got['std']:.3f}"  # 0.3375 rounds either way in binary
    assert f"| main | GRPO | GRPO | 0.450 ± 0.071 | {auc} | 0.500 ± 0.000 | 0.300 | 2 |" in md
    assert ("| main | ICPO | main GRPO | +0.0 [+0.0, +0.0] | 0/2 | +0.0 [+0.0, +0.0] | 0/2 "
            "| +0.000 [+0.000, +0.000] | +0.0, +0.0 |") in md
    assert "0.450 ± 0.071" in capsys.readouterr().out


# ------------------------------------------------------------------------------- data
def test_coarse_data_is_made_once_by_filter_coarse(tmp_path, monkeypatch):
    """The paper's protocol is icpo.data.coarse (tested in test_coarse_filter.py): the experiments
    call it once with their settings, reuse its output while the settings match, and make it
    again (overwriting) when they change."""
    import icpo.data.coarse as coarse

    train, _ = xd.ensure_data(tmp_path, "routes", 12, 2)
    specs = []
    real = coarse.filter_coarse

    def spy(spec):
        specs.append(spec)
        return real(spec)

    monkeypatch.setattr(coarse, "filter_coarse", spy)
    out = xd.coarse_train_file(train, "icpo/tiny-routes", 3, 40)
    assert out == xd.coarse_path(train) and len(specs) == 1
    spec = specs[0]
    assert (spec.model, spec.train_files, spec.n, spec.max_new_tokens, spec.seed,
            spec.temperature) == ("icpo/tiny-routes", [str(train)], 3, 40, 0, 1.0)
    source = [json.loads(x) for x in train.open()]
    kept = [json.loads(x) for x in out.open()]
    stats = json.loads(out.with_suffix(".json").read_text())
    assert stats["kept"] == len(kept) == stats["all_correct"] + stats["all_wrong"]
    assert 0 < len(kept) < len(source) and stats["prompts"] == len(source)
    assert [r for r in source if r in kept] == kept  # a subset, in input order
    assert xd.coarse_train_file(train, "icpo/tiny-routes", 3, 40) == out and len(specs) == 1
    assert xd.coarse_train_file(train, "icpo/tiny-routes", 3, 40, seed=1) == out and len(specs) == 2
    assert json.loads(out.with_suffix(".json").read_text())["seed"] == 1


# ------------------------------------------------------------------------------- running
def test_run_all_runs_jobs_at_once_and_reports_every_run(tmp_path, monkeypatch, capsys):
    """--jobs N keeps N runs in flight (one waits for the other here), prints every run once in
    plan order of completion, and reports a failing run without stopping the others."""
    import threading

    preset = _preset(tmp_path, steps=4)
    plan = _plan(tmp_path, preset, [rx.all_settings()[0]], seeds=(1, 2, 3, 4))
    both_started = threading.Barrier(2, timeout=10)
    in_flight, peak, lock = [0], [0], threading.Lock()

    def fake_execute(run, preset_path, keep):
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        if run.seed in (1, 2):
            both_started.wait()  # deadlocks (BrokenBarrierError) unless two runs overlap
        with lock:
            in_flight[0] -= 1
        if run.seed == 3:
            raise RuntimeError("run grpo_clean_seed3 exited with status 2")
        _write_run(run.out_dir, 4, [0.3, 0.3, 0.5], [0.5] * 4)

    monkeypatch.setattr(rx, "execute", fake_execute)
    failures = rx.run_all(plan, plan.runs, keep_checkpoints=False, jobs=2)
    out = capsys.readouterr().out
    assert peak[0] == 2
    assert failures == ["run grpo_clean_seed3 exited with status 2"]
    assert sorted(f"grpo_clean_seed{k}" for k in (1, 2, 3, 4)) == sorted(
        line.split()[1] for line in out.splitlines() if line.startswith("["))
    assert out.count("FAILED") == 1 and out.count("val acc 0.300 -> 0.500") == 3


def test_jobs_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        rx.parse_args(["--jobs", "0"])
    assert "--jobs: expected an int >= 1, got 0" in capsys.readouterr().err


def test_ablations_are_also_paired_within_their_group(tmp_path):
    """Omega schedules minus no decay (Table 4's reference), delta values minus 0.5."""
    exp = tmp_path / "exp"

    def line(group, label, slug, name, last):
        for k in (1, 2):
            _write_run(exp / f"{name}{k}", 4, [0.3, 0.4, last + k / 100], [0.5] * 4)
        return {**_setting(group, label, "icpo", {k: exp / f"{name}{k}" for k in (1, 2)}),
                "slug": slug}

    settings = [line("omega", "ICPO warmup_decay", "icpo_omega_warmup_decay", "w", 0.6),
                line("omega", "ICPO constant", "icpo_omega_constant", "c", 0.5),
                line("delta", "ICPO delta=0.3", "icpo_delta0.3", "d", 0.45),
                line("delta", "ICPO delta=0.5", "icpo_delta0.5", "e", 0.5)]
    rep.write_report(exp, settings, {"mode": "test", "seeds": [1, 2]})
    cmps = json.loads((exp / "results.json").read_text())["comparisons"]
    got = {(c["label"], c["baseline"]): c["final_val_acc"]["diffs"] for c in cmps}
    assert set(got) == {("ICPO warmup_decay", "omega ICPO constant"),
                        ("ICPO delta=0.3", "delta ICPO delta=0.5")}
    assert got[("ICPO warmup_decay", "omega ICPO constant")] == pytest.approx([0.1, 0.1])
    assert got[("ICPO delta=0.3", "delta ICPO delta=0.5")] == pytest.approx([-0.05, -0.05])
    md = (exp / "results.md").read_text()
    assert "| omega | ICPO warmup_decay | omega ICPO constant | +10.0 [+10.0, +10.0] | 2/2 |" in md


def test_arithmetic_task_runs_the_table6_preset_on_icpo_tiny(tmp_path, monkeypatch, capsys):
    """--task arithmetic: same Table 6-shaped preset (clip 0.2/0.2, G=5), icpo/tiny, and its own
    default folders so it never mixes with the routes runs or overwrites their results."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(rx.DATA_SIZES, "full", (16, 4))
    monkeypatch.setattr(rx, "RESULTS_DIR", tmp_path / "results" / "experiments")
    assert rx.main(["--task", "arithmetic", "--only", "main", "--seeds", "1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "mode overrides: model.path=icpo/tiny rollout.max_response_length=64" in out
    assert (tmp_path / "outputs" / "experiments_arithmetic" / "data" / "train.jsonl").is_file()
    assert not (tmp_path / "outputs" / "experiments").exists()
    data = (tmp_path / "d" / "train.jsonl", tmp_path / "d" / "val.jsonl")
    plan = rx.make_plan(rx.select_settings("main", False), [1],
                        list(rx.TASK_OVERRIDES["arithmetic"]), tmp_path / "exp", data)
    cfg = load_config(rx.PRESET, plan.runs[0].overrides)
    assert (cfg.model.path, cfg.rollout.n, cfg.actor.clip_low, cfg.actor.clip_high) == (
        "icpo/tiny", 5, 0.2, 0.2)
    assert rx.main(["--task", "arithmetic", "--only", "main", "--seeds", "1", "--report-only"]) == 0
    assert (tmp_path / "results" / "experiments_arithmetic" / "results.md").is_file()
    assert not (tmp_path / "results" / "experiments").exists()


def test_report_names_repository_paths_relative(tmp_path):
    """The committed results name no machine: paths inside the repository are relative."""
    assert rx.shown(rx.PRESET) == "examples/configs/routes_cpu.yaml"
    assert rx.shown(tmp_path / "x.yaml") == str(tmp_path / "x.yaml")


def test_report_only_keeps_the_timing_of_the_runs(tmp_path):
    old = tmp_path / "results.json"
    old.write_text(json.dumps({"meta": {"mode": "full", "seeds": [1, 2], "jobs": 2,
                                        "wall_s_this_invocation": 3.5}}))
    assert rx.previous_timing(old, "full", [1, 2]) == {"jobs": 2, "wall_s_this_invocation": 3.5}
    assert rx.previous_timing(old, "full", [1, 2, 3]) == {}  # another plan: its timing says nothing
    assert rx.previous_timing(tmp_path / "missing.json", "full", [1, 2]) == {}


def test_readme_quotes_the_committed_results_exactly():
    """The README's Results table is quoted from results/experiments/results.md: every row it
    shows starts a row of that file (the README leaves out the per-seed column)."""
    readme = (ROOT / "README.md").read_text().split("## Results", 1)[1].split("\n## ", 1)[0]
    results = (ROOT / "results" / "experiments" / "results.md").read_text().splitlines()
    groups = tuple(f"| {g} |" for g in rx.GROUP_NAMES)
    rows = [line for line in readme.splitlines() if line.startswith(groups)]
    assert len(rows) >= 3
    missing = [r for r in rows if not any(line.startswith(r) for line in results)]
    assert missing == []


def test_quick_mode_trains_reports_and_resumes(tmp_path):
    """--quick end to end: real training subprocesses (two at once), the report, and a second
    invocation that finds both runs finished and trains nothing."""
    import subprocess

    cmd = [sys.executable, str(ROOT / "experiments" / "run_experiments.py"), "--quick",
           "--seeds", "1", "--jobs", "2", "--out", str(tmp_path / "q")]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert "2 runs (0 already done)" in first.stdout and first.stdout.count(" done in ") == 2
    for name in ("grpo_clean_seed1", "icpo_clean_seed1"):
        rows = rep.read_rows(tmp_path / "q" / "runs" / name / "metrics.jsonl")
        assert max(r["step"] for r in rows) == 6
    res = json.loads((tmp_path / "q" / "results.json").read_text())
    assert [(s["label"], s["final_val_acc"]["n"]) for s in res["settings"]] == [("GRPO", 1),
                                                                                 ("ICPO", 1)]
    assert res["meta"]["jobs"] == 2 and (tmp_path / "q" / "plots" / "main.png").is_file()
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert again.returncode == 0 and "2 runs (2 already done)" in again.stdout
    assert " done in " not in again.stdout


def test_readme_contrast_paragraph_quotes_the_arithmetic_results():
    """Every interval the README quotes for the --task arithmetic contrast is in its results
    file."""
    import re

    readme = (ROOT / "README.md").read_text()
    para = readme.split("**The contrast", 1)[1].split("\n\n", 1)[0]
    quoted = re.findall(r"[+-]\d+\.\d+ \[[+-]\d+\.\d+, [+-]\d+\.\d+\]", para)
    results = (ROOT / "results" / "experiments_arithmetic" / "results.md").read_text()
    assert len(quoted) == 9
    assert [q for q in quoted if q not in results] == []
