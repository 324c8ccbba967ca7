"""Weight inheritance: a trial prunes a finished front model down instead of the base."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from _helpers import tiny_space
from mlflow import MlflowClient

from autoprune.base import BaseMetrics
from autoprune.config import parse_space
from autoprune.dedup import structure_key
from autoprune.export import export_trial, trial_model
from autoprune.inherit import Parent, ParentModels, load_kept
from autoprune.measure import evaluate
from autoprune.prune import prune_model, replay
from autoprune.report import trials_frame
from autoprune.search import run_search, study_dir
from autoprune.study import front_numbers, load_study
from autoprune.trial import TrialContext, run_trial


def space_dict(runs: Path, name: str, **search: Any) -> dict[str, Any]:
    # Random proposals over a wide range, no baselines: later trials often fit inside a
    # finished front model.
    return tiny_space(runs, name, objectives=["accuracy", "macs"],
                      groups={"default": {"low": 0.0, "high": 0.8, "step": 0.1}},
                      **{"finetune.steps": 6, "latency.warmup": 1, "latency.repeats": 3,
                         "search.sampler": "random", "search.baselines": [],
                         "search.inherit": True,
                         **{f"search.{k}": v for k, v in search.items()}})


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("inherit") / "runs"


@pytest.fixture(scope="module")
def ctx(runs: Path) -> TrialContext:
    return TrialContext.build(parse_space(space_dict(runs, "ctx")))


def test_pruning_a_pruned_model_keeps_what_pruning_the_base_keeps(ctx: TrialContext) -> None:
    names = [g.name for g in ctx.groups]
    x = ctx.example_inputs
    parent, prec = prune_model(ctx.base_model, x, dict.fromkeys(names, 0.3), "l2", 4)
    with torch.no_grad():  # the parent's weights move (as a fine-tune would move them)
        for p in parent.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ratios = dict.fromkeys(names, 0.6)
    _, direct = prune_model(ctx.base_model, x, ratios, "l2", 4)
    child, rec = prune_model(parent, x, ratios, "l2", 4, parent=prec)
    assert rec.kept_channels == direct.kept_channels
    assert rec.kept_channels != prec.kept_channels  # it did prune further
    assert rec.base_channels == prec.base_channels
    assert rec.history[:len(prec.history)] == prec.history
    # the record rebuilds the child's architecture from the base; its weights fit exactly
    rebuilt = replay(ctx.base_model, x, rec)
    rebuilt.load_state_dict(child.state_dict())
    with torch.no_grad():
        assert torch.allclose(rebuilt.eval()(x), child.eval()(x))
    with pytest.raises(Exception, match="cannot grow channels back"):
        prune_model(child, x, dict.fromkeys(names, 0.3), "l2", 4, parent=rec)


def _parent(key: str, kept: dict[str, int], macs: float, acc: float) -> Parent:
    return Parent(key, kept, macs, acc, {}, {"w": torch.zeros(100)})  # 400 bytes


def test_parent_models_give_the_closest_cover_and_keep_the_front() -> None:
    models = ParentModels()
    models.put(_parent("big", {"a": 8, "b": 8}, 0.9, 0.95))
    models.put(_parent("mid", {"a": 6, "b": 6}, 0.6, 0.93))
    models.put(_parent("worse", {"a": 7, "b": 7}, 0.7, 0.92))  # dominated by "mid"
    models.put(_parent("skew", {"a": 8, "b": 2}, 0.5, 0.90))
    assert len(models) == 4
    assert models.find({"a": 4, "b": 4}).key == "mid"  # type: ignore[union-attr]
    assert models.find({"a": 7, "b": 2}).key == "skew"  # type: ignore[union-attr]
    assert models.find({"a": 6, "b": 6}).key == "worse"  # type: ignore[union-attr] (not itself)
    assert models.find({"a": 7, "b": 7}).key == "big"  # type: ignore[union-attr]
    assert models.find({"a": 9, "b": 1}) is None
    # over the byte budget the most dominated model goes; the front stays, whatever it weighs
    small = ParentModels(max_bytes=1000)
    for p in (_parent("big", {"a": 8, "b": 8}, 0.9, 0.95),
              _parent("mid", {"a": 6, "b": 6}, 0.6, 0.93),
              _parent("worse", {"a": 7, "b": 7}, 0.7, 0.92)):
        small.put(p)
    assert sorted(small.keys()) == ["big", "mid"]
    small.put(_parent("skew", {"a": 8, "b": 2}, 0.5, 0.90))
    assert sorted(small.keys()) == ["big", "mid", "skew"]  # all on the front: 1200 bytes


def test_a_trial_starts_from_its_parent_and_beats_pruning_the_base(ctx: TrialContext) -> None:
    names = [g.name for g in ctx.groups]
    big = run_trial(ctx, dict.fromkeys(names, 0.3), keep_model=True, finetune_steps=30)
    models = ParentModels()
    from autoprune.inherit import offer

    offer(models, big)
    assert len(models) == 1
    ratios = dict.fromkeys(names, 0.5)
    plain = run_trial(ctx, ratios)
    child = run_trial(ctx, ratios, inherit=lambda kept: models.find(kept))
    assert child.state == "complete", child.error
    assert child.inherits == structure_key(big.kept_channels, big.seed)
    assert plain.inherits is None
    assert child.kept_channels == plain.kept_channels
    assert child.macs == plain.macs and child.params == plain.params
    # its weights start fine-tuned: the proxy (adaptive BN, before any fine-tune) shows it
    assert child.proxy_accuracy > plain.proxy_accuracy


def _inheriting(study: Any) -> list[Any]:
    return [t for t in study.trials if t.user_attrs.get("inherits")]


def test_a_local_search_inherits_and_export_rebuilds_the_chain(
        runs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    space = parse_space(space_dict(runs, "inh", trials=8, keep_models=False))
    run_search(space, quiet=True)
    study = load_study("inh", space.storage_url)
    heirs = _inheriting(study)
    assert heirs, "no trial inherited"
    keys = {structure_key(t.user_attrs["kept_channels"], t.user_attrs["seed"]): t
            for t in study.trials if t.user_attrs.get("state") == "complete"}
    for t in heirs:
        parent = keys[t.user_attrs["inherits"]]
        assert parent.number < t.number
        assert t.user_attrs["inherits_trial"] == parent.number
        assert all(parent.user_attrs["kept_channels"][g] >= c
                   for g, c in t.user_attrs["kept_channels"].items())
    # no kept weights: rebuilding a trial re-runs its parent chain; the accuracy must match
    heir = max(heirs, key=lambda t: t.number)  # the longest chain, likely
    base = BaseMetrics.from_dict(study.user_attrs["base"])
    model, record, extra, _ = trial_model(space, base, "inh", heir.number, dict(heir.params),
                                          study)
    acc = evaluate(model, extra["data"].val, "cpu", extra["evaluate_fn"])
    assert acc == pytest.approx(heir.user_attrs["accuracy"], abs=1e-9)
    # said beforehand, with the trials re-run first (a whole chain had re-run without a word)
    chain, up = [], heir.user_attrs.get("inherits_trial")
    while up is not None:
        chain.insert(0, up)
        up = study.trials[up].user_attrs.get("inherits_trial")
    err = capsys.readouterr().err
    assert f"autoprune: trial {heir.number}'s fine-tuned weights are not kept (search." \
        "keep_models keeps them, under " in err
    assert (f", after the {len(chain)} trial(s) whose fine-tuned models it was pruned from, "
            f"oldest first: {chain} ({len(chain) + 1} fine-tune(s))") in err
    assert record.kept_channels == heir.user_attrs["kept_channels"]
    # and the export of a front point that inherited checks the same
    front = [t for t in heirs if t.number in front_numbers(study)]
    assert front  # (trial 3 of this seeded search)
    frame = trials_frame(study).set_index("trial")
    assert frame.loc[front[0].number, "inherits_trial"] == front[0].user_attrs["inherits_trial"]
    client = MlflowClient(space.tracking_uri)
    runs_ = client.search_runs([client.get_experiment_by_name("inh").experiment_id],
                               f"tags.`autoprune.trial` = '{front[0].number}'")
    assert runs_[0].data.tags["inherits_trial"] == str(front[0].user_attrs["inherits_trial"])
    res = export_trial("inh", space.storage_url, f"trial:{front[0].number}", runs / "exp-inh")
    assert res.trial == front[0].number


def test_parallel_workers_inherit_and_keep_the_weights_a_resume_reloads(runs: Path) -> None:
    space = parse_space(space_dict(runs, "inh-jobs", trials=8))
    run_search(space, quiet=True, jobs=2)
    study = load_study("inh-jobs", space.storage_url)
    assert _inheriting(study), "no trial inherited"
    assert all(t.user_attrs.get("state") != "failed" for t in study.trials)
    assert _kept_models(space, study) > 0


def test_kept_weights_cut_short_are_re_run_not_a_dead_end(runs: Path) -> None:
    """A Ctrl-C while a trial's weights were saved left a truncated weights.pt (the save was
    not atomic), and every --resume then failed loading it: the study could not go on."""
    space = parse_space(space_dict(runs, "inh-cut", trials=4))
    run_search(space, quiet=True)
    study = load_study("inh-cut", space.storage_url)
    trials = study_dir(space, "inh-cut") / "trials"
    assert not list(trials.glob("*/.*"))  # no temporary file left beside the kept ones
    cut = next(t for t in study.trials if t.user_attrs.get("state") == "complete"
               and t.user_attrs.get("duplicate_of") is None)
    weights = trials / str(cut.number) / "weights.pt"
    weights.write_bytes(weights.read_bytes()[:674])
    with pytest.warns(UserWarning, match=rf"kept weights in .*{cut.number} cannot be read"):
        run_search(space, trials=6, resume=True, quiet=True)
    study = load_study("inh-cut", space.storage_url)
    assert len([t for t in study.trials if t.state.is_finished()]) == 6
    # its export re-runs it from its seed, to the accuracy it recorded
    base = BaseMetrics.from_dict(study.user_attrs["base"])
    with pytest.warns(UserWarning, match="cannot be read"):
        model, _, extra, _ = trial_model(space, base, "inh-cut", cut.number, dict(cut.params),
                                         study)
    acc = evaluate(model, extra["data"].val, "cpu", extra["evaluate_fn"])
    assert acc == pytest.approx(cut.user_attrs["accuracy"], abs=1e-9)


def test_ray_inherits_and_a_resume_starts_from_the_models_finished_before(runs: Path) -> None:
    # The fine-tuned unpruned baseline (ratio 0) covers every config: each later trial inherits.
    ray_kw: dict[str, Any] = {"backend": "ray", "ray_options": {"concurrency": 1}}
    spec = space_dict(runs, "inh-ray", trials=3, baselines=[0.0])
    space = parse_space(spec)
    run_search(space, quiet=True, **ray_kw)
    study = load_study("inh-ray", space.storage_url)
    assert all(t.user_attrs.get("state") == "complete" for t in study.trials)
    assert [t.number for t in _inheriting(study)] == [1, 2]
    assert _kept_models(space, study) == 3  # the driver saved them from the parent actor
    # resumed: the parent actor starts with those models, so the next trial inherits again
    run_search(space, trials=5, resume=True, quiet=True, **ray_kw)
    study = load_study("inh-ray", space.storage_url)
    assert len([t for t in study.trials if t.state.is_finished()]) == 5
    assert study.trials[3].user_attrs.get("inherits_trial") in (0, 1, 2)


def _kept_models(space: Any, study: Any) -> int:
    """How many models a resumed search would start with; checks they are every complete
    trial's."""
    models = ParentModels()
    loaded = load_kept(models, study, study_dir(space, study.study_name) / "trials")
    done = {structure_key(t.user_attrs["kept_channels"], t.user_attrs["seed"])
            for t in study.trials if t.user_attrs.get("state") == "complete"
            and t.user_attrs.get("duplicate_of") is None}
    assert loaded == len(done) and set(models.keys()) == done
    return loaded


def test_warm_start_allocations_nest_with_inheritance(runs: Path, ctx: TrialContext) -> None:
    from autoprune.sensitivity import cached_scan, macs_counter
    from autoprune.study import distributions, warm_start_configs

    sens, _ = cached_scan(ctx, [0.4, 0.8])
    count = macs_counter(ctx)
    budgets = [0.0, 0.1, 0.2, 0.3, 0.45, 0.6]
    for inherit in (False, True):
        space = parse_space(space_dict(runs, "nest", inherit=inherit,
                                       warm_start={"sensitivity": True, "budgets": budgets}))
        cfg = warm_start_configs(space, distributions(space, ctx.groups), ctx.groups, sens,
                                 count)
        assert list(cfg) == budgets
        for b, c in cfg.items():  # each meets its budget in counted MACs
            assert b == 0.0 or count(c) <= b + 1e-9
        if inherit:  # a cheaper seed prunes at least what every dearer one prunes
            for cheap, dear in zip(budgets, budgets[1:], strict=False):
                assert all(cfg[cheap][g] >= cfg[dear][g] for g in cfg[dear]), (cheap, dear)
