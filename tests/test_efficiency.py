"""Search efficiency: rung promotion, pruned trials, sensitivity cache, warm start, seeding."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import yaml
from _helpers import tiny_space
from mlflow import MlflowClient
from optuna.distributions import FloatDistribution

from autoprune.cli import main
from autoprune.config import parse_space
from autoprune.errors import ConfigError
from autoprune.fidelity import RungBook, book_args, numbered_rungs, promoter, rung_steps
from autoprune.fill import FILL_ATTR, fill_params, front_steps
from autoprune.finetune import finetune
from autoprune.report import trials_frame
from autoprune.search import run_search
from autoprune.sensitivity import allocate, cached_scan, estimate_macs_ratio, macs_counter, scan
from autoprune.study import (
    coarse_to_fine,
    distributions,
    front_numbers,
    load_study,
    make_sampler,
    origin,
    rung_history,
    seed_points,
)
from autoprune.trial import TrialContext, run_trial


def space_dict(runs: Path, name: str, **search: Any) -> dict[str, Any]:
    return tiny_space(runs, name, objectives=["accuracy", "macs"],
                      groups={"default": {"low": 0.0, "high": 0.8, "step": 0.1}},
                      **{"finetune.steps": 9, "latency.warmup": 1, "latency.repeats": 3,
                         "search.trials": 6, **{f"search.{k}": v for k, v in search.items()}})


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("eff") / "runs"


@pytest.fixture(scope="module")
def ctx(runs: Path) -> TrialContext:
    return TrialContext.build(parse_space(space_dict(runs, "ctx")))


def test_rung_promotion_follows_nondominated_sorting() -> None:
    book = RungBook(eta=2, min_trials=3)
    # fewer than min_trials results at the rung: nothing to compare with, promote
    assert book.report("a", 1, 0.90, 0.50)
    assert book.report("b", 1, 0.80, 0.30)
    # (0.95, 0.25) dominates both a and b; it is on the rung's front: it goes on
    assert book.report("c", 1, 0.95, 0.25)
    # layers now: {c}, {a, b}. d is dominated by a: layer 2, with 3 trials in better layers,
    # not fewer than ceil(4 / 2) = 2: stopped
    assert not book.report("d", 1, 0.85, 0.55)
    # f is dominated only by c (layer 1, alone: it dominates a and b): 1 < ceil(5 / 2): goes on
    assert book.report("f", 1, 0.93, 0.28)
    assert book.sizes() == {1: 5}
    # another rung has its own book-keeping
    assert book.report("d", 2, 0.85, 0.55)
    # non-dominated at any cost is never stopped, however many trials there are
    for i in range(10):
        book.report(f"x{i}", 3, 0.5 + 0.01 * i, 0.9)
    assert book.report("cheap", 3, 0.05, 0.01)


def test_a_rung_stops_trials_only_once_it_predicts_the_last_rung() -> None:
    def book_after(proxy: list[float]) -> RungBook:
        """Rung 0 (the proxy) and rung 1, the last, of 6 trials; rung 1's accuracy falls with
        cost, and beyond that rises with k; ``proxy`` is rung 0's accuracy of trial k."""
        book = RungBook(eta=3, min_trials=2, trust_min=6, trust_threshold=0.3, last_rung=1)
        for k, acc0 in enumerate(proxy):
            cost = 0.2 + 0.1 * (k % 3)
            assert book.report(f"t{k}", 0, acc0, cost)  # not trusted yet: everything goes on
            book.report(f"t{k}", 1, 0.9 - cost / 10 + 0.01 * k, cost)
        return book

    # a proxy that ranks like rung 1 at equal cost: trusted, and a dominated trial stops
    informative = book_after([0.5 - c + 0.01 * k for k, c in
                              enumerate(0.2 + 0.1 * (k % 3) for k in range(6))])
    assert informative.trust(0) == pytest.approx(1.0)
    assert not informative.report("bad", 0, 0.0, 0.45)
    # a proxy that only repeats the cost (constant within a cost level, ranked against rung 1
    # there): not trusted, so it stops nothing
    blind = book_after([0.5 - (0.2 + 0.1 * (k % 3)) - 0.01 * k for k in range(6)])
    assert blind.trust(0) is not None and blind.trust(0) < 0.3
    assert blind.report("bad", 0, 0.0, 0.45)
    # the last rung needs no trust
    assert not blind.trusted(0) and blind.trusted(1)


def test_a_baseline_outside_the_groups_ranges_is_said_and_keeps_its_label(runs: Path) -> None:
    """A level above the groups' bound was clipped onto another level's config, which then
    carried the later level's label (a 'uniform 0.95' that never ran), silently."""
    space = parse_space(space_dict(runs, "bl", baselines=[0.8, 0.95, 0.5]))
    ranged = FloatDistribution(0.0, 0.8, step=0.1)
    dists = {"a": ranged, "b": ranged, "fixed": FloatDistribution(0.0, 0.0)}
    with pytest.warns(UserWarning) as said:
        points = seed_points(space, dists)
    text = [str(w.message) for w in said]
    assert any("search.baselines[1]: 0.95 lies outside the range of 2 of 2 groups" in t
               for t in text)
    assert any("0.95 runs the same config as baseline 0.8" in t for t in text)
    assert [a["baseline_ratio"] for _p, a in points] == [0.8, 0.5]
    assert [p["a"] for p, _a in points] == [0.8, 0.5]
    # the default levels (0.25, 0.5, 0.75) on groups that stop at 0.6: no warning for a
    # level the user never wrote, and the clipped one is labelled as it ran
    low = {"a": FloatDistribution(0.0, 0.6, step=0.05), "b": FloatDistribution(0.0, 0.6)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        points = seed_points(parse_space(space_dict(runs, "bl2")), low)
    assert [a["baseline_ratio"] for _p, a in points] == [0.25, 0.5, 0.6]


def test_seed_points_stay_out_of_the_trust_sample() -> None:
    """Baselines and warm starts are not random configs: a rung that ranks them well has shown
    nothing about the configs the sampler proposes, so they never open its trust gate."""
    def report(book: RungBook, key: str, k: int, sample: bool) -> None:
        cost = 0.2 + 0.1 * (k % 3)
        book.report(key, 0, 0.5 - cost + 0.01 * k, cost, sample)
        book.report(key, 1, 0.9 - cost / 10 + 0.01 * k, cost, sample)

    book = RungBook(eta=3, min_trials=2, trust_min=6, trust_threshold=0.3, last_rung=1)
    for k in range(6):
        report(book, f"seed{k}", k, sample=False)
    assert book.trust(0) is None and book.report("bad", 0, 0.0, 0.45)  # still promoted
    for k in range(6):
        report(book, f"t{k}", k, sample=True)
    assert book.trust(0) == pytest.approx(1.0)
    assert not book.report("worse", 0, 0.0, 0.45)
    # on resume the book is refilled with the same sample (seed points flagged)
    again = RungBook(eta=3, min_trials=2, trust_min=6, trust_threshold=0.3, last_rung=1)
    again.load([(k, [(r, *v[k]) for r, v in sorted(book.rungs.items()) if k in v],
                 k not in book.seeds) for k in book.rungs[0]])
    assert again.seeds == book.seeds and again.trust(0) == book.trust(0)


def test_a_baseline_is_judged_but_never_stopped() -> None:
    """Uniform baselines are the reference the front is read against: a dominated one runs
    on (and its results still count at the rung); a warm start with the same results stops."""
    book = RungBook(eta=2, min_trials=3, trust_threshold=-1.0)
    for k, (acc, cost) in enumerate([(0.95, 0.2), (0.96, 0.3), (0.97, 0.4)]):
        book.report(f"t{k}", 1, acc, cost)
    assert promoter(book, "base", "baseline")(1, 0.5, 0.9)
    assert book.rungs[1]["base"] == (0.5, 0.9) and "base" in book.seeds
    assert not promoter(book, "warm", "warm_start")(1, 0.5, 0.9)
    assert not promoter(book, "t9", None)(1, 0.5, 0.9) and "t9" not in book.seeds
    # with search.inherit a warm start is a parent for what follows: judged, never stopped
    book = RungBook(eta=2, min_trials=3, trust_threshold=-1.0)
    for k, (acc, cost) in enumerate([(0.95, 0.2), (0.96, 0.3), (0.97, 0.4)]):
        book.report(f"t{k}", 1, acc, cost)
    assert promoter(book, "warm", "warm_start", keep_seeds=True)(1, 0.5, 0.9)
    assert book.rungs[1]["warm"] == (0.5, 0.9)
    assert not promoter(book, "t9", None, keep_seeds=True)(1, 0.4, 0.95)


def test_the_proxy_correlations_count_each_model_once() -> None:
    """A trial that reused an earlier trial's model repeats its (proxy, accuracy) pair: counted
    again, it moved the tau by 0.11 in a 13-trial study with 4 such trials."""
    import pandas as pd

    from autoprune.search import proxy_kendall_tau, proxy_partial_rho

    rows = [(0.50, 0.80, 0.2, None), (0.60, 0.95, 0.3, None), (0.70, 0.90, 0.4, None),
            (0.80, 0.97, 0.6, None), (0.90, 0.99, 0.8, None)]
    models = pd.DataFrame(rows, columns=["proxy_accuracy", "accuracy", "macs_ratio",
                                         "duplicate_of"]).assign(state="complete")
    copies = pd.concat([models, models.iloc[[1, 1, 1]].assign(duplicate_of=1.0)])
    assert proxy_kendall_tau(models) == pytest.approx(0.8)
    assert proxy_kendall_tau(copies) == proxy_kendall_tau(models)
    assert proxy_partial_rho(copies) == proxy_partial_rho(models)


def test_rung_steps() -> None:
    assert rung_steps(90, (1 / 9, 1 / 3)) == [10, 30]
    assert rung_steps(3, (1 / 9, 1 / 3)) == [1]  # distinct, at least one step, below the total
    assert rung_steps(0, (0.5,)) == []
    # the last rung kept is numbered as the book's last rung, whatever the budget merged
    assert numbered_rungs(90, (1 / 9, 1 / 3)) == [(1, 10), (2, 30)]
    assert numbered_rungs(4, (1 / 9, 1 / 3)) == [(2, 1)]
    assert numbered_rungs(0, (0.5,)) == []


def test_a_budget_that_merges_rungs_still_earns_trust(runs: Path) -> None:
    """4 fine-tune steps make the rungs 1/9 and 1/3 one rung (step 1). It was numbered 1 while
    the book measures each rung's trust against rung 2: no rung ever earned trust, and a search
    with the rungs on could stop nothing, silently."""
    space = parse_space(space_dict(runs, "merged", trials=7, baselines=[0.5],
                                   fidelity={"enabled": True, "min_trials": 2, "eta": 3.0,
                                             "trust_min": 3, "trust_threshold": 0.0}))
    space = space.replace(finetune=dataclasses.replace(space.finetune, steps=4))
    run_search(space, quiet=True)
    study = load_study("merged", space.storage_url)
    sampled = [t for t in study.trials if t.number > 0]  # trial 0: the baseline
    assert {r for t in sampled for r, _a, _c in t.user_attrs["rungs"]} == {0, 2}
    book = RungBook(*book_args(space.search.fidelity))
    book.load(rung_history(study))
    assert book.trust(0) is not None  # rung 0 (the proxy) can earn trust, and so stop trials


def test_pruned_trials_never_complete_nor_on_the_front(runs: Path) -> None:
    space = parse_space(space_dict(runs, "mf", trials=10, baselines=[0.2, 0.5, 0.8],
                                   fidelity={"enabled": True, "min_trials": 2, "eta": 3.0,
                                             "trust_threshold": -1.0}))
    run_search(space, quiet=True)
    study = load_study("mf", space.storage_url)
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned, "the rung book stopped no trial"
    assert len([t for t in study.trials if t.state.is_finished()]) == 10
    front = front_numbers(study)
    assert not front & {t.number for t in pruned}
    for t in pruned:
        assert t.user_attrs["state"] == "pruned"
        assert t.user_attrs["finetune_steps"] < 9  # stopped before the full budget
        assert t.user_attrs["rungs"]
    client = MlflowClient(space.tracking_uri)
    exp = client.get_experiment_by_name("mf")
    by_trial = {int(r.data.tags["autoprune.trial"]): r
                for r in client.search_runs([exp.experiment_id], max_results=1000)
                if r.data.tags.get("autoprune.role") == "trial"}
    for t in pruned:
        tags, metrics = by_trial[t.number].data.tags, by_trial[t.number].data.metrics
        assert tags["state"] == "pruned" and tags["pareto"] == "false"
        # its accuracy at the rung it stopped at is not a final score: sorting the runs by
        # `accuracy` must not mix the two
        assert "accuracy" not in metrics
        assert metrics["accuracy_at_stop"] == t.user_attrs["accuracy"]
    for n in front:
        assert by_trial[n].data.tags["state"] == "complete"
        assert study.trials[n].user_attrs["finetune_steps"] == 9
    parent = client.get_run(study.user_attrs["parent_run_id"])
    assert parent.data.metrics["trials_pruned"] == len(pruned)
    assert -1.0 <= study.user_attrs["proxy_kendall_tau"] <= 1.0
    assert -1.0 <= study.user_attrs["proxy_partial_rho"] <= 1.0
    assert parent.data.metrics["proxy_partial_rho"] == study.user_attrs["proxy_partial_rho"]


def test_sensitivity_cache_follows_the_batches_and_the_evaluate_code(
        ctx: TrialContext, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The scan's accuracies depend on the batches and on a user's evaluate function (and its
    code): each change must miss the cache, not reuse a stale scan."""
    import dataclasses

    from autoprune.sensitivity import cache_path

    def key(**data: Any) -> Path:
        space = ctx.space.replace(data=dataclasses.replace(ctx.space.data, **data))
        return cache_path(dataclasses.replace(ctx, space=space), [0.4])

    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "my_eval.py").write_text("def score(model, loader):\n    return 0.5\n")
    keys = [key(), key(batch_size=4), key(eval_batch_size=7), key(evaluate="my_eval:score")]
    assert len(set(keys)) == 4
    (tmp_path / "my_eval.py").write_text("def score(model, loader):\n    return 0.25\n")
    assert key(evaluate="my_eval:score") != keys[3]  # the same name, other code
    assert key() == keys[0]


def test_warm_start_budgets_stay_within_the_macs_constraint(ctx: TrialContext) -> None:
    """A seed above max_macs_ratio would be infeasible and never fine-tuned (with inherit, the
    dearest seed runs first and every later one would lose its parent): such a budget is
    taken at the limit, and the seed meets it in counted MACs."""
    import dataclasses

    from autoprune.study import warm_start_configs

    sens, _ = cached_scan(ctx, [0.4, 0.8])
    space = ctx.space.replace(
        constraints=dataclasses.replace(ctx.space.constraints, max_macs_ratio=0.5),
        search=dataclasses.replace(ctx.space.search, warm_start=dataclasses.replace(
            ctx.space.search.warm_start, budgets=(0.3, 0.6, 0.85))))
    dists = distributions(space, ctx.groups)
    count = macs_counter(ctx)
    configs = warm_start_configs(space, dists, ctx.groups, sens, count)
    assert list(configs) == [0.3, 0.5]
    assert all(count(r) <= 0.5 + 1e-9 for r in configs.values())


def test_sensitivity_scan_is_cached_and_seeds_the_search(
        runs: Path, ctx: TrialContext, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    first, cached = cached_scan(ctx, [0.3, 0.6])
    assert not cached
    assert len(first.accuracy) == len(ctx.groups) and len(first.accuracy[0]) == 2
    again, cached = cached_scan(ctx, [0.3, 0.6])
    assert cached and again.accuracy == first.accuracy
    _other, cached = cached_scan(ctx, [0.5], progress=True)
    assert not cached  # other ratios: another scan
    # output to a file or pipe (as here): a line per group, with its scores
    err = capsys.readouterr().err
    n = len(ctx.groups)
    assert f"autoprune: sensitivity 1/{n} {ctx.groups[0].name}: ratio 0.5 -> 0." in err
    assert f"autoprune: sensitivity {n}/{n} {ctx.groups[-1].name}: " in err
    # on a terminal: the bar counts (group, ratio) pairs and names the group
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    cached_scan(ctx, [0.45], progress=True)
    err = capsys.readouterr().err
    assert "sensitivity:" in err and f"/{n} " in err and "autoprune: sensitivity 1/" not in err
    assert any(g.name in err for g in ctx.groups[1:])

    dists = distributions(ctx.space, ctx.groups)
    count = macs_counter(ctx)
    for budget in (0.3, 0.6):
        ratios = allocate(first, ctx.groups, budget, dists)
        est = estimate_macs_ratio(ctx.groups, ratios)
        assert est <= budget
        measured = run_trial(ctx, ratios, finetune_steps=0).macs_ratio
        assert count(ratios) == pytest.approx(measured)  # counted as a trial counts it
        assert abs(measured - est) < 0.08  # the MACs estimate is close to the counted MACs
        # with the counter, the allocation meets the budget in counted MACs
        counted = allocate(first, ctx.groups, budget, dists, count)
        assert run_trial(ctx, counted, finetune_steps=0).macs_ratio <= budget
        # and spends what round_to left under it: no group can step back and stay within it
        for n, d in dists.items():
            back = round(counted[n] - (d.step or 0.05), 10)
            if back >= d.low:
                assert count({**counted, n: back}) > budget, (budget, n, counted)
    # a budget the space cannot reach: its cheapest config
    assert allocate(first, ctx.groups, 0.0, dists, count) == {n: d.high for n, d in dists.items()}

    space = parse_space(space_dict(runs, "warm", trials=7,
                                   warm_start={"sensitivity": True, "budgets": [0.6, 0.3, 0.45]}))
    run_search(space, quiet=True)
    study = load_study("warm", space.storage_url)
    warm = [t for t in study.trials if t.user_attrs.get("warm_start")]
    # seeded first, coarse to fine, then the baselines
    assert [t.user_attrs["warm_start_budget"] for t in warm] == [0.3, 0.45, 0.6]
    assert [t.number for t in warm] == [0, 1, 2]
    n_base = len(space.search.baselines)
    assert all(t.user_attrs.get("baseline") for t in study.trials[3:3 + n_base])
    assert {t.user_attrs.get("front_fill", False) for t in study.trials[:3 + n_base]} == {False}
    assert all(t.user_attrs["macs_ratio"] <= t.user_attrs["warm_start_budget"] for t in warm)
    client = MlflowClient(space.tracking_uri)
    names = {a.path for a in client.list_artifacts(study.user_attrs["parent_run_id"])}
    assert "sensitivity.png" in names

    # a resume takes the seed points the study was started with: no MACs counted again (on a
    # large model, minutes), and the same seeds
    import autoprune.search as search_mod

    def no_recount(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("seed points made again on resume")

    monkeypatch.setattr(search_mod, "seed_points", no_recount)
    run_search(space, trials=8, resume=True, quiet=True)
    assert len([t for t in load_study("warm", space.storage_url).trials
                if t.state.is_finished()]) == 8
    # nor is the scan made again when the cache lost it (deleted, or keyed by an older
    # autoprune's rounding rule): it only redrew the heatmap, for minutes on a large model
    import autoprune.sensitivity as sens_mod

    for f in (runs / "sensitivity").glob("*.json"):
        f.unlink()
    monkeypatch.setattr(sens_mod, "scan", lambda *a, **k: no_recount())
    capsys.readouterr()
    run_search(space, trials=9, resume=True)
    assert "sensitivity: the study's own scan (its seeds are stored)" in capsys.readouterr().err


def test_an_interrupted_scan_keeps_the_groups_it_finished(
        runs: Path, ctx: TrialContext, monkeypatch: pytest.MonkeyPatch) -> None:
    """A scan of a large model takes many minutes (densenet121: 120 groups); an interrupt lost
    all of it. The rows of finished groups are kept and the next scan starts after them."""
    import autoprune.prune as prune_mod
    from autoprune.sensitivity import cache_path

    real, calls, armed = prune_mod.prune_model, [], [True]

    class Interrupt(BaseException):  # as KeyboardInterrupt, which pytest takes for its own
        pass

    def counted(model: Any, x: Any, ratios: dict[str, float], *a: Any, **k: Any) -> Any:
        calls.append(next(iter(ratios)))
        if len(calls) == 3 and armed:
            armed.clear()
            raise Interrupt  # Ctrl-C in the second group
        return real(model, x, ratios, *a, **k)

    monkeypatch.setattr(prune_mod, "prune_model", counted)
    with pytest.raises(Interrupt):
        cached_scan(ctx, [0.35, 0.7])
    partial = cache_path(ctx, [0.35, 0.7]).with_suffix(".partial.json")
    assert list(json.loads(partial.read_text())) == [ctx.groups[0].name]
    calls.clear()
    sens, cached = cached_scan(ctx, [0.35, 0.7])
    assert not cached and calls[0] == ctx.groups[1].name  # the first group was not redone
    assert len(calls) == 2 * (len(ctx.groups) - 1) and not partial.exists()
    monkeypatch.setattr(prune_mod, "prune_model", real)
    fresh = scan(ctx, [0.35, 0.7])
    assert sens.accuracy == fresh.accuracy and sens.groups == fresh.groups


def test_a_group_that_fails_to_prune_does_not_stop_the_scan(
        ctx: TrialContext, monkeypatch: pytest.MonkeyPatch) -> None:
    import autoprune.prune as prune_mod
    from autoprune.sensitivity import scan

    real, bad = prune_mod.prune_model, ctx.groups[1].name

    def failing(model: Any, x: Any, ratios: dict[str, float], *a: Any, **k: Any) -> Any:
        if bad in ratios:
            raise IndexError("index out of range in self")
        return real(model, x, ratios, *a, **k)

    monkeypatch.setattr(prune_mod, "prune_model", failing)
    with pytest.warns(UserWarning, match=rf"pruning group {re.escape(bad)} at ratio 0.4 failed "
                                         r"\(IndexError: index out of range in self\)"):
        sens = scan(ctx, [0.4])
    assert sens.accuracy[1] == [0.0]
    assert all(row[0] > 0.3 for i, row in enumerate(sens.accuracy) if i != 1)


def test_sensitivity_command_shows_the_scan_and_the_warm_start_seeds(
        runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    spec = space_dict(runs, "ctx",  # the base model of the ctx fixture
                      warm_start={"sensitivity": True, "ratios": [0.4, 0.8],
                                  "budgets": [0.0, 0.3, 0.6]})
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["sensitivity", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ratios"] == [0.4, 0.8] and len(out["accuracy"]) == len(out["groups"])
    seeds = out["warm_start"]
    assert [s["budget"] for s in seeds] == [0.0, 0.3, 0.6]
    assert all(set(s["ratios"]) == set(out["groups"]) for s in seeds)
    # budget 0: the cheapest config; the others meet their budgets in counted MACs
    assert set(seeds[0]["ratios"].values()) == {0.8}
    assert all(s["macs_ratio"] <= s["budget"] for s in seeds[1:])
    assert seeds[0]["macs_ratio"] < seeds[1]["macs_ratio"] < seeds[2]["macs_ratio"]
    import autoprune.sensitivity as sensitivity_mod

    def no_count(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the seeds' MACs counted again")

    monkeypatch.setattr(sensitivity_mod, "macs_counter", no_count)
    assert main(["sensitivity", str(path)]) == 0  # the table and the seeds, from the cache
    text = capsys.readouterr().out
    assert "(cached)" in text and "warm-start seeds" in text and "budget 0.6" in text
    # --runs-dir, as search takes it, finds the same cache for a space without runs_dir
    elsewhere = tmp_path / "no_runs_dir.yaml"
    elsewhere.write_text(yaml.safe_dump({k: v for k, v in spec.items() if k != "runs_dir"}))
    monkeypatch.chdir(tmp_path)
    assert main(["sensitivity", str(elsewhere), "--runs-dir", str(runs)]) == 0
    assert "(cached)" in capsys.readouterr().out and not (tmp_path / "runs").exists()
    # a search on the same model starts from the cached seeds too
    space = parse_space(spec)
    run_search(space, study_name="ctx-seeded", trials=1, quiet=True)
    first = load_study("ctx-seeded", space.storage_url).trials[0]
    assert first.params == pytest.approx(seeds[0]["ratios"])  # the cheapest seed runs first


def test_warm_start_budgets_go_coarse_to_fine() -> None:
    # the cheapest, then every other one upwards (the range spanned), then those between
    assert coarse_to_fine([0.6, 0.0, 0.2, 0.1, 0.4, 0.07, 0.14, 0.28]) == \
        [0.0, 0.07, 0.14, 0.28, 0.6, 0.1, 0.2, 0.4]
    assert coarse_to_fine([0.5]) == [0.5] and coarse_to_fine([]) == []
    # with inheritance, downwards: the dearest (every chain's root) first, then each at most
    # half the last and the cheapest, then those between, dearest first; every seed finds a
    # dearer one finished, and 0.5 runs after 0.6, its closest dearer seed
    assert coarse_to_fine([0.6, 0.0, 0.2, 0.1, 0.4, 0.07, 0.14, 0.28, 0.85],
                          dearest_first=True) == [0.85, 0.4, 0.2, 0.1, 0.0, 0.6, 0.28, 0.14, 0.07]
    assert coarse_to_fine([0.6, 0.0, 0.2, 0.1, 0.4, 0.5, 0.07, 0.14, 0.28, 0.85],
                          dearest_first=True) == \
        [0.85, 0.4, 0.2, 0.1, 0.0, 0.6, 0.5, 0.28, 0.14, 0.07]
    assert coarse_to_fine([0.6, 0.0, 0.2, 0.1, 0.4, 0.07, 0.14, 0.28], dearest_first=True) == \
        [0.6, 0.28, 0.14, 0.07, 0.0, 0.4, 0.2, 0.1]
    assert coarse_to_fine([0.5], dearest_first=True) == [0.5]
    assert coarse_to_fine([], dearest_first=True) == []


def test_front_fill_bisects_the_widest_step() -> None:
    pts = [(0.2, 0.80, {"a": 0.8, "b": 0.8}), (0.5, 0.90, {"a": 0.4, "b": 0.4}),
           (0.9, 0.92, {"a": 0.0, "b": 0.0}),
           (0.6, 0.85, {"a": 0.3, "b": 0.5})]  # dominated: not on the staircase
    steps = front_steps(pts)
    assert [round(area, 6) for area, *_ in steps] == [0.03, 0.008]  # 0.3 x 0.1, 0.4 x 0.02
    assert steps[0][1:] == ({"a": 0.8, "b": 0.8}, {"a": 0.4, "b": 0.4})
    d = {n: FloatDistribution(0.0, 0.8, step=0.1) for n in "ab"}
    assert fill_params(pts, d, []) == {"a": 0.6, "b": 0.6}  # midpoint of the widest step
    # the midpoint already proposed: the quarter point towards the cheaper neighbour
    assert fill_params(pts, d, [{"a": 0.6, "b": 0.6}]) == {"a": 0.7, "b": 0.7}
    # all three points of the widest step taken: the next step
    taken = [{"a": v, "b": v} for v in (0.6, 0.7, 0.5)]
    assert fill_params(pts, d, taken) == {"a": 0.2, "b": 0.2}
    assert fill_params(pts[:1], d, []) is None  # one point: no step to fill
    # the midpoint came back with the dearer neighbour's result (a reused structure): so is
    # everything between them, and only the quarter towards the cheaper one is left
    mid = {"a": 0.6, "b": 0.6}
    assert fill_params(pts + [(0.5, 0.90, mid)], d, [mid]) == {"a": 0.7, "b": 0.7}
    assert fill_params(pts + [(0.5, 0.90, mid)], d, [mid, {"a": 0.7, "b": 0.7}]) == \
        {"a": 0.2, "b": 0.2}  # that one taken too: the step cannot be split; the next
    # ... and with the cheaper neighbour's result, only the quarter towards the dearer one
    assert fill_params(pts + [(0.2, 0.80, mid)], d, [mid]) == {"a": 0.5, "b": 0.5}


def test_every_second_proposal_fills_the_front(tmp_path: Path) -> None:
    space = parse_space(space_dict(tmp_path / "runs", "fill", front_fill=2))
    sampler = make_sampler(space, 0)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler,
                                storage=f"sqlite:///{tmp_path}/fill.db")
    dists = {n: FloatDistribution(0.0, 0.8, step=0.1) for n in "ab"}
    # two seed points (enqueued: never fills themselves, and not counted)
    for params, values in (({"a": 0.8, "b": 0.8}, [0.80, 0.2]), ({"a": 0.0, "b": 0.0},
                                                                 [0.95, 1.0])):
        study.enqueue_trial(params)
        study.tell(study.ask(dists), values)
    numbers = [study.ask(dists).number for _ in range(4)]
    asked = [study.trials[n] for n in numbers]
    fills = [t.user_attrs.get(FILL_ATTR, False) for t in asked]
    assert fills == [False, True, False, True]
    assert asked[1].params == {"a": 0.4, "b": 0.4}  # the midpoint of the only step
    assert asked[3].params == {"a": 0.6, "b": 0.6}  # midpoint taken: a quarter point
    assert origin(asked[1].user_attrs) == "front_fill" and origin(asked[0].user_attrs) == "sampler"
    # a fill joins an NSGA-II generation, so it can be a parent
    assert any(k.endswith(":generation") for k in asked[1].system_attrs)
    for bad in (-1, True, 1.5):
        with pytest.raises(ConfigError, match=rf"search\.front_fill: got {bad}.*an integer"):
            parse_space(space_dict(tmp_path / "runs", "bad", front_fill=bad))


def test_a_local_search_fills_its_front(runs: Path) -> None:
    space = parse_space(space_dict(runs, "fills", trials=5, front_fill=1))
    run_search(space, quiet=True)
    study = load_study("fills", space.storage_url)
    frame = trials_frame(study)
    n_base = len(space.search.baselines)
    assert list(frame["origin"][:n_base]) == ["baseline"] * n_base
    assert set(frame["origin"][n_base:]) == {"front_fill"}
    step = space.groups.default.step
    for t in study.trials[n_base:]:
        earlier = study.trials[:t.number]
        # a fill lies between two earlier configs, group by group, on the ratio grid
        assert all(min(e.params[n] for e in earlier) - 1e-9 <= v
                   <= max(e.params[n] for e in earlier) + 1e-9 for n, v in t.params.items())
        assert all(abs(v / step - round(v / step)) < 1e-6 for v in t.params.values())
    client = MlflowClient(space.tracking_uri)
    runs_ = client.search_runs([client.get_experiment_by_name(space.experiment_name)
                                .experiment_id], "tags.origin = 'front_fill'")
    assert len(runs_) == len(study.trials) - n_base


def test_seeded_trials_are_reproducible(ctx: TrialContext) -> None:
    ratios = {g.name: 0.4 for g in ctx.groups}
    a = run_trial(ctx, ratios, keep_model=True)
    b = run_trial(ctx, ratios, keep_model=True)
    assert a.state == b.state == "complete"
    assert a.accuracy == b.accuracy and a.finetune_losses == b.finetune_losses
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)  # type: ignore


def test_seeded_searches_are_reproducible(tmp_path: Path) -> None:
    values = []
    for i in range(2):
        space = parse_space(space_dict(tmp_path / f"r{i}", "rep", trials=5))
        run_search(space, quiet=True)
        study = load_study("rep", space.storage_url)
        values.append([(t.params, t.values) for t in study.trials])
    assert values[0] == values[1]


def test_distillation_uses_the_teacher(ctx: TrialContext) -> None:
    from autoprune.prune import prune_model

    cfg = ctx.space.finetune
    losses = {}
    for alpha in (0.0, 0.7):
        torch.manual_seed(0)
        model, _ = prune_model(ctx.base_model, ctx.example_inputs,
                               {g.name: 0.5 for g in ctx.groups})
        teacher_before = {k: v.clone() for k, v in ctx.base_model.state_dict().items()}
        log = finetune(model, ctx.data.train, cfg.__class__(**{**cfg.__dict__,
                                                               "distill_alpha": alpha}),
                       steps=5, teacher=ctx.base_model)
        losses[alpha] = [v for _s, v in log.losses]
        assert all(torch.equal(teacher_before[k], v)
                   for k, v in ctx.base_model.state_dict().items())
    assert losses[0.0] != losses[0.7]


def test_rungs_do_not_change_the_fine_tuned_model(ctx: TrialContext) -> None:
    """Judging a trial at its rungs (all promoted) gives the very model of an unjudged run."""
    import dataclasses

    from autoprune.config import FidelityConfig

    fid = FidelityConfig(enabled=True, rungs=(0.2, 0.5), min_trials=1)
    judged_ctx = dataclasses.replace(ctx, space=ctx.space.replace(
        search=dataclasses.replace(ctx.space.search, fidelity=fid)))
    ratios = {g.name: 0.3 for g in ctx.groups}
    plain = run_trial(ctx, ratios, keep_model=True)
    judged = run_trial(judged_ctx, ratios, keep_model=True, promote=lambda r, a, c: True)
    assert [r for r, _a, _c in judged.rungs] == [0, 1, 2]
    assert judged.accuracy == plain.accuracy
    assert all(torch.equal(judged.state_dict[k], plain.state_dict[k])  # type: ignore[index]
               for k in plain.state_dict)  # type: ignore[union-attr]
    # a trial that is never stopped (a baseline) reports its proxy only: the later rungs'
    # evaluations could change nothing, and skipping them leaves the model as it was
    book = RungBook(min_trials=1)
    kept = run_trial(judged_ctx, ratios, keep_model=True,
                     promote=promoter(book, "base", "baseline"))
    assert [r for r, _a, _c in kept.rungs] == [0] and book.sizes() == {0: 1}
    assert kept.state == "complete" and kept.accuracy == plain.accuracy
    assert all(torch.equal(kept.state_dict[k], plain.state_dict[k])  # type: ignore[index]
               for k in plain.state_dict)  # type: ignore[union-attr]


def test_nsga2_generations_advance_with_pruned_trials(runs: Path) -> None:
    space = parse_space(space_dict(runs, "gens", trials=12, population_size=4,
                                   fidelity={"enabled": True, "min_trials": 2, "eta": 3.0,
                                             "trust_threshold": -1.0}))
    run_search(space, quiet=True)
    study = load_study("gens", space.storage_url)
    key = "FidelityNSGAIISampler:generation"
    generations = [t.system_attrs.get(key) for t in study.trials]
    assert None not in generations  # seed points get a generation too
    assert max(generations) >= 1  # with pruned trials counted, the search moves on


def assert_reused(space: Any, name: str, trials: int) -> None:
    """Every trial kept the same channels: the first ran, the rest reuse its result."""
    study = load_study(name, space.storage_url)
    done = sorted((t for t in study.trials if t.state.is_finished()), key=lambda t: t.number)
    assert len(done) == trials
    first, *again = done
    assert first.user_attrs["finetune_steps"] == 9 and first.user_attrs.get("duplicate_of") is None
    for t in again:
        assert t.user_attrs["kept_channels"] == first.user_attrs["kept_channels"]
        assert t.user_attrs["duplicate_of"] == first.number
        assert t.user_attrs["finetune_steps"] == 0 and t.user_attrs["rungs"] == []
        assert t.values == first.values
        for key in ("accuracy", "proxy_accuracy", "macs_ratio", "latency_ms", "state"):
            assert t.user_attrs[key] == first.user_attrs[key]
    assert front_numbers(study) == {first.number}
    client = MlflowClient(space.tracking_uri)
    exp = client.get_experiment_by_name(name)
    tags = {int(r.data.tags["autoprune.trial"]): r.data.tags
            for r in client.search_runs([exp.experiment_id], max_results=100)
            if r.data.tags.get("autoprune.role") == "trial"}
    assert sorted(tags) == [t.number for t in done]
    assert [tags[t.number].get("duplicate_of") for t in again] == [str(first.number)] * len(again)
    assert tags[first.number]["pareto"] == "true"
    assert all(tags[t.number]["pareto"] == "false" for t in again)


# width 8, round_to 4: ratios 0.3 and 0.35 both keep 4 of 8 channels (the 32-channel group is
# held at one ratio)
SAME_MODEL = {"default": {"low": 0.3, "high": 0.35, "step": 0.05},
              "layer3.*": {"low": 0.3, "high": 0.3}}


def test_a_model_built_again_reuses_its_result(runs: Path) -> None:
    spec = space_dict(runs, "dup", trials=3, baselines=[])
    spec["groups"], spec["pruning"] = SAME_MODEL, {"round_to": 4}
    space = parse_space(spec)
    run_search(space, quiet=True)
    assert_reused(space, "dup", 3)
    study = load_study("dup", space.storage_url)
    assert len({tuple(t.params.values()) for t in study.trials}) > 1  # other ratios, same model
    # a resumed search knows what ran before
    run_search(space, trials=4, resume=True, quiet=True)
    assert_reused(space, "dup", 4)


def test_the_ray_controller_reuses_results_too(runs: Path) -> None:
    spec = space_dict(runs, "dup-ray", trials=3, baselines=[])
    spec["groups"], spec["pruning"] = SAME_MODEL, {"round_to": 4}
    space = parse_space(spec)
    run_search(space, backend="ray", ray_options={"concurrency": 1}, quiet=True)
    assert_reused(space, "dup-ray", 3)


def test_ray_searcher_tells_pruned_trials_as_pruned_and_gives_seed_points_a_generation(
        ) -> None:
    from autoprune.controllers.ray_tune import SEED_KEY, AutopruneSearch, role_of
    from autoprune.study import FidelityNSGAIISampler

    dists = {"a": optuna.distributions.FloatDistribution(0.0, 0.8, step=0.1),
             "b": optuna.distributions.FloatDistribution(0.0, 0.8, step=0.1)}
    searcher = AutopruneSearch(space=dists, metric=["accuracy", "macs_ratio"],
                               mode=["max", "min"], points_to_evaluate=[{"a": 0.5, "b": 0.5}],
                               sampler=FidelityNSGAIISampler(population_size=2, seed=0))
    first = searcher.suggest("t0")
    assert first == {"a": 0.5, "b": 0.5, SEED_KEY: True}  # marked: a seed point
    # the trainable finds a marked seed point's role in the rungs by its config
    seeds = [({"a": 0.5, "b": 0.5}, "baseline"), ({"a": 0.2, "b": 0.7}, "warm_start")]
    assert role_of(first, seeds) == "baseline" and role_of({"a": 0.1, "b": 0.1}, seeds) is None
    for i in range(1, 6):
        searcher.suggest(f"t{i}")
    searcher.on_trial_complete("t0", {"state": "complete", "accuracy": 0.9, "macs_ratio": 0.3})
    searcher.on_trial_complete("t1", {"state": "pruned", "accuracy": 0.2, "macs_ratio": 0.5})
    searcher.on_trial_complete("t2", {"state": "failed", "accuracy": None, "macs_ratio": None})
    study = searcher._ot_study
    states = [t.state for t in study.trials]
    assert states[:3] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                          optuna.trial.TrialState.FAIL]
    key = "FidelityNSGAIISampler:generation"
    assert study.trials[0].system_attrs.get(key) == 0  # the seed point has its generation
    assert all(t.system_attrs.get(key) is not None for t in study.trials)


def test_ray_searcher_fills_the_front_and_tells_which_trials_are_fills() -> None:
    from autoprune.controllers.ray_tune import SEED_KEY, AutopruneSearch
    from autoprune.study import FillFidelityNSGAIISampler

    dists = {n: FloatDistribution(0.0, 0.8, step=0.1) for n in "ab"}
    seeds = [{"a": 0.8, "b": 0.8}, {"a": 0.0, "b": 0.0}]
    searcher = AutopruneSearch(space=dists, metric=["accuracy", "macs_ratio"],
                               mode=["max", "min"], points_to_evaluate=seeds,
                               sampler=FillFidelityNSGAIISampler(population_size=2, seed=0,
                                                                 fill_every=2,
                                                                 fill_axes=(0, 1)))
    assert [searcher.suggest(t) for t in ("s0", "s1")] == [{**p, SEED_KEY: True} for p in seeds]
    searcher.on_trial_complete("s0", {"state": "complete", "accuracy": 0.8, "macs_ratio": 0.2})
    searcher.on_trial_complete("s1", {"state": "complete", "accuracy": 0.95, "macs_ratio": 1.0})
    proposed = {t: searcher.suggest(t) for t in ("t0", "t1", "t2", "t3")}
    assert [searcher.is_fill(t) for t in proposed] == [False, True, False, True]
    assert proposed["t1"] == {"a": 0.4, "b": 0.4}
    assert not searcher.is_fill("s0") and not searcher.is_fill("unknown")
    # an infeasible trial (over a constraint) is no step of the front to fill
    searcher.on_trial_complete("t0", {"state": "infeasible", "accuracy": 0.99,
                                      "macs_ratio": 0.1})
    study = searcher._ot_study
    assert study.trials[2].user_attrs["state"] == "infeasible"
    proposed["t4"], proposed["t5"] = searcher.suggest("t4"), searcher.suggest("t5")
    assert searcher.is_fill("t5") and proposed["t5"] == {"a": 0.2, "b": 0.2}
