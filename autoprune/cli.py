"""The ``autoprune`` command: thin subcommands over the library."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from shlex import quote
from typing import TYPE_CHECKING, Any

from autoprune.config import INPUT_DTYPE_NAMES, MAX_SEED
from autoprune.errors import AutopruneError, ConfigError

if TYPE_CHECKING:
    from autoprune.groups import GroupInfo


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--input-shape: got {text!r}; allowed: comma-separated ints like 1,3,224,224"
        ) from None
    if len(shape) < 2 or min(shape) <= 0:
        raise argparse.ArgumentTypeError(
            f"--input-shape: got {text!r}; allowed: positive ints with a batch dim, "
            "e.g. 1,3,32,32")
    return shape


def cmd_layers(args: argparse.Namespace) -> int:
    from autoprune.base import example_output
    from autoprune.config import load_space
    from autoprune.groups import describe_groups
    from autoprune.measure import example_input
    from autoprune.prune import failing_groups
    from autoprune.sources import build_model, load_checkpoint
    from autoprune.study import distributions
    from autoprune.trial import PROBE_RATIO, probe_ratios

    if args.space:
        space = load_space(args.space)
        source, shape, dtype = space.model.source, space.model.input_shape, space.model.input_dtype
        num_classes, kwargs, ignore = space.model.num_classes, space.model.kwargs, \
            space.groups.ignore
        ckpt = space.model.checkpoint
        data = space.to_dict()["data"]
    elif args.model and args.input_shape:
        source, shape, num_classes, kwargs, ignore, ckpt = (
            args.model, args.input_shape, args.num_classes, {}, (), args.checkpoint)
        dtype = args.input_dtype
        data = None
    else:
        print("autoprune layers: give a SPACE.yaml, or --model and --input-shape",
              file=sys.stderr)
        return 2
    if args.write_space:  # its folder made (or refused) before the model is traced
        try:
            Path(args.write_space).parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise AutopruneError(f"--write-space: got {args.write_space!r}, whose folder "
                                 f"cannot be made ({e.strerror}); allowed: a writable "
                                 "path") from None
    if num_classes is None and source.startswith("builtin:"):
        num_classes = 10
    model = build_model(source, shape, num_classes, kwargs).eval()
    if ckpt:
        load_checkpoint(model, ckpt)
    example_output(model, source, shape, dtype)  # what `search` refuses, `layers` refuses
    x = example_input(shape, dtype)
    groups = describe_groups(model, x, ignore)
    if args.space:  # what `search` refuses, `layers` refuses
        from autoprune.study import check_patterns

        check_patterns(space, groups, [n for n, _ in model.named_modules() if n])
    # groups Torch-Pruning traces but cannot prune: each would fail every trial
    probes = (probe_ratios(distributions(space, groups)) if args.space
              else {g.name: PROBE_RATIO for g in groups})
    failing = failing_groups(model, x, probes,
                             space.pruning.round_to if args.space else 1, ignore)
    groups = [g for g in groups if g.name not in failing]
    if args.write_space:
        from autoprune.space_writer import starter_space

        Path(args.write_space).write_text(starter_space(source, shape, groups, num_classes,
                                                        kwargs, ckpt, ignore, data, dtype))
        print(f"wrote a starter search space with {len(groups)} groups to {args.write_space}",
              file=sys.stderr)
    from autoprune.groups import left_out_groups

    left = {**left_out_groups(model, x, ignore), **failing}
    if args.json:
        print(json.dumps({"model": source, "input_shape": list(shape),
                          "groups": [g.to_dict() for g in groups], "left_out": left}, indent=2))
    elif not args.write_space:
        if groups:
            _print_groups(groups)
        if left or not groups:
            print(f"{len(left)} more group(s) cannot be searched:" if groups else
                  f"no group of this model can be searched ({len(left)} found):")
            for root, why in left.items():
                print(f"  {root}: {why}")
    return 0


def _print_groups(groups: Sequence[GroupInfo]) -> None:
    import pandas as pd

    rows = [{"group": g.name, "type": g.root_type, "channels": g.channels,
             "MACs share": f"{100 * g.macs_share:.1f}%", "layers": len(g.members),
             "members": ", ".join(g.members[:4]) + (" ..." if len(g.members) > 4 else "")}
            for g in groups]
    blocks = any(g.blocks > 1 for g in groups)
    if blocks:
        for row, g in zip(rows, groups, strict=True):
            row["blocks"] = g.blocks
    with pd.option_context("display.max_colwidth", 70, "display.width", 200):
        print(pd.DataFrame(rows).to_string(index=False))
    print(f"\n{len(groups)} groups (the head is never pruned; MACs share counts every layer "
          "whose weights shrink with the group, and a layer shrinks with the group of its "
          "inputs and that of its outputs, so the shares add up to more than 100%"
          + ("; blocks: a grouped conv, GroupNorm or attention heads split the channels so, "
             "and the group keeps a multiple of that many" if blocks else "") + ")")


_RAY_FLAGS = ("address", "concurrency", "cpus_per_trial", "gpus_per_trial")


def _backend(args: argparse.Namespace) -> str:
    """``--backend``, or Ray when a Ray option is given: the same command plus an address runs
    on a cluster. A Ray option with ``--backend local`` is an error, not silently ignored."""
    given = [f"--{f.replace('_', '-')}" for f in _RAY_FLAGS if getattr(args, f) is not None]
    if args.backend == "local" and given:
        raise AutopruneError(f"{given[0]}: a Ray option, given with --backend local; allowed: "
                             "--backend ray (or no --backend: a Ray option selects Ray)")
    return args.backend or ("ray" if given else "local")


def cmd_search(args: argparse.Namespace) -> int:
    from autoprune.config import load_space
    from autoprune.report import format_front
    from autoprune.search import run_search

    backend = _backend(args)
    space = load_space(args.space, {"runs_dir": args.runs_dir} if args.runs_dir else None)
    ray_options = None
    if backend == "ray":
        ray_options = {"address": args.address, "concurrency": args.concurrency,
                       "cpus_per_trial": 1.0 if args.cpus_per_trial is None
                       else args.cpus_per_trial,
                       "gpus_per_trial": args.gpus_per_trial or 0.0}
    summary = run_search(space, args.study, args.trials, args.jobs, args.resume, args.seed,
                         backend, ray_options, quiet=args.quiet, timeout=args.timeout)
    base = "" if summary.base_accuracy is None else \
        f"base accuracy {summary.base_accuracy:.4f}; "
    # a repeat built an earlier trial's model (nearby ratios round to the same channels):
    # reused, not fine-tuned, but a trial of the budget all the same
    repeats = f", {summary.repeats} repeated an earlier trial's model" if summary.repeats else ""
    if summary.timed_out:
        repeats += "; stopped by the time limit, --resume runs the rest"
    print(f"\nstudy {summary.study}: {summary.trials} trials ({summary.failed} failed{repeats}); "
          f"{base}Pareto front ({len(summary.front)} trials):")
    print(format_front(summary.front, space.objectives))
    if summary.errors:
        print("\nfailed trials, by error (the full tracebacks: the `error` column of trials.csv, "
              "and each trial's MLflow run):")
        for line, numbers in summary.errors.items():
            shown = ", ".join(map(str, numbers[:10])) + (", ..." if len(numbers) > 10 else "")
            print(f"  {len(numbers)} trial(s) [{shown}]: {line}")
    print(f"\ntables and plots: {summary.study_dir}; MLflow parent run {summary.parent_run_id} "
          f"({_ui_hint(space)})")
    if len(summary.front):
        # shell-quoted: pasted as printed, a runs dir with a space ran something else
        where = (f" --storage {quote(space.search.storage)}" if space.search.storage else
                 f" --runs-dir {quote(space.runs_dir)}" if Path(space.runs_dir) != Path("runs")
                 else "")
        study = quote(summary.study)
        budget = next((b for k, b in (("macs", "'macs<=0.5', "), ("params", "'params<=0.5', "))
                       if k in space.objectives), "")
        print(f"next: autoprune export --study {study}{where} --pick knee --out "
              f"EXPORT_DIR (or --pick {budget}'accuracy>=0.95', trial:N; `autoprune "
              f"pareto --study {study}{where}` shows the front)")
    if summary.failed and summary.failed == summary.trials:
        print("autoprune: error: every trial failed (see above)", file=sys.stderr)
        return 1
    return 0


def _storage(args: argparse.Namespace) -> str:
    if args.storage:
        return str(args.storage)
    if args.space:
        from autoprune.config import load_space

        return load_space(args.space, {"runs_dir": args.runs_dir} if args.runs_dir
                          else None).storage_url
    return f"sqlite:///{Path(args.runs_dir or 'runs') / 'optuna.db'}"


def cmd_pareto(args: argparse.Namespace) -> int:
    from autoprune.report import format_front, json_records, pareto_frame, plain
    from autoprune.study import load_study

    study = load_study(args.study, _storage(args))
    front = pareto_frame(study)
    base = study.user_attrs.get("base", {})
    if args.json:
        cols = [c for c in front.columns if c != "error"]
        print(json.dumps({"study": args.study, "base": plain(base),
                          "front": json_records(front[cols])}, indent=2, allow_nan=False))
    else:
        print(f"study {args.study}: base accuracy {base.get('accuracy', float('nan')):.4f}, "
              f"latency {base.get('latency_ms', float('nan')):.3f} ms")
        print(format_front(front, study.user_attrs.get("objectives", [])))
    return 0


def _runs_dir(value: str) -> str:
    """``--runs-dir``, checked as the space's ``runs_dir`` is."""
    from autoprune.config import check_runs_dir

    try:
        check_runs_dir(value, "--runs-dir")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return os.path.expanduser(value)  # --runs-dir=~/runs: the shell leaves that ~ alone


def _ui_hint(space: Any) -> str:
    """The command that shows this search's runs, as the search's last lines give it."""
    uri = space.tracking.uri
    if uri and uri.startswith(("http://", "https://")):
        return f"open {uri} to browse"
    if uri:
        return f"`autoprune ui --uri {quote(uri)}` to browse"
    if Path(space.runs_dir) != Path("runs"):
        return f"`autoprune ui --runs-dir {quote(space.runs_dir)}` to browse"
    return "`autoprune ui` to browse"


def cmd_ui(args: argparse.Namespace) -> int:
    uri = args.uri or f"sqlite:///{Path(args.runs_dir) / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        # MLflow would make an empty store and show no runs (and a stray runs/ folder)
        raise AutopruneError(
            f"{'--uri' if args.uri else '--runs-dir'}: no MLflow store at "
            f"{uri.removeprefix('sqlite:///')} (looked from {Path.cwd()}); allowed: the runs "
            "directory a search wrote (--runs-dir DIR), or the store's URI (--uri)")
    _check_port_free(args.port)
    if not args.uri:
        from autoprune.tracking import default_artifact_dir, relocate_artifacts

        moved = relocate_artifacts(uri, default_artifact_dir(args.runs_dir))
        if moved:
            print(f"autoprune: the runs directory was moved from {Path(moved).parent}: its "
                  "MLflow store now reads artifacts from here", file=sys.stderr)
    print(f"MLflow UI for {uri} at http://127.0.0.1:{args.port} (Ctrl-C to stop)", flush=True)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host",
           "127.0.0.1", "--port", str(args.port)]
    return _serve(cmd)


def _check_port_free(port: int) -> None:
    """MLflow's server on a taken port logs 'Address already in use' among its INFO lines and
    exits 0, while the URL shown serves whatever holds the port."""
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            raise AutopruneError(f"--port: got {port}, which is not free on 127.0.0.1 "
                                 f"({e.strerror}); allowed: a free port, e.g. --port "
                                 f"{port + 1}") from None


def _serve(cmd: list[str], grace_s: float = 20.0) -> int:
    """Run a server (MLflow's UI, with its uvicorn and job workers) until it exits or this
    process is told to stop (Ctrl-C, ``kill``, a closed terminal), then stop all of it: its
    own process group gets SIGTERM, and SIGKILL after ``grace_s``. A plain
    ``subprocess.call`` left the server holding its port when ``kill`` reached only this
    process."""
    import contextlib
    import subprocess
    import threading

    from autoprune.signals import handling

    proc = subprocess.Popen(cmd, start_new_session=True)
    stopped = []

    def signal_group(sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)

    def stop(signum: int, _frame: Any) -> None:
        stopped.append(signum)
        signal_group(signal.SIGTERM)
        timer = threading.Timer(grace_s, signal_group, (signal.SIGKILL,))
        timer.daemon = True
        timer.start()

    with handling((signal.SIGINT, signal.SIGTERM, signal.SIGHUP), stop):
        rc = proc.wait()
    signal_group(signal.SIGKILL)  # workers that outlived the server
    return 0 if stopped else rc


def cmd_export(args: argparse.Namespace) -> int:
    from autoprune.export import export_trial

    res = export_trial(args.study, _storage(args), args.pick, args.out, args.register,
                       args.alias, args.runs_dir)
    t = res.config["metrics"]["trial"]
    print(f"exported trial {res.trial} of study {args.study} to {res.out_dir}: accuracy "
          f"{t['accuracy']:.4f}, MACs ratio {t['macs_ratio']:.3f}, speed-up {t['speedup']:.2f}x")
    for f in ("prune_config.json", *res.config["files"].values()):
        print(f"  {res.out_dir / f}")
    if res.registered_version:
        print(f"registered {args.register} version {res.registered_version} as "
              f"models:/{args.register}@{args.alias}")
    return 0


def cmd_apply(args: argparse.Namespace) -> int:

    from autoprune.export import check_formats, check_out_dir, staged, write_model_files
    from autoprune.measure import count_cost, example_input
    from autoprune.rebuild import read_config, rebuild

    config = read_config(args.config)
    if args.weights is None and not args.untrained:
        raise AutopruneError(
            "apply: --weights is missing; without it the pruned model keeps the base model's "
            "weights, never fine-tuned (far below the trial's accuracy); allowed: --weights "
            "WEIGHTS.pt (the export's weights.pt), or --untrained --checkpoint BASE.pt for that "
            "architecture with the base weights, to fine-tune yourself")
    if args.untrained and (args.weights is not None or args.checkpoint is None):
        raise AutopruneError("apply: --untrained takes --checkpoint (the base weights) and no "
                             "--weights")
    out = check_out_dir(args.out)
    model = rebuild(config, args.checkpoint, args.weights, args.force)
    shape = tuple(config["model"]["input_shape"])
    dtype = config["model"].get("input_dtype", "float32")
    cost = count_cost(model, shape, dtype)
    _check_recorded_cost(config, cost.macs, cost.params, args.config)
    x = example_input(shape, dtype, random=True, batch=max(2, shape[0]))
    with staged(out) as stage:
        files, _ = write_model_files(model, shape, stage,
                                     lambda onnx, program: check_formats(model, x, onnx, program),
                                     dtype)
        written = list(files.values())
        if args.weights is not None:  # the exported model itself: its config goes with it
            listed = {k: v for k, v in config["files"].items() if k != "model_card"}  # not made
            (stage / "prune_config.json").write_text(json.dumps(
                {**config, "files": {**listed, **files}}, indent=2))
            written.append("prune_config.json")
    print(f"rebuilt {config['model']['source']} pruned: {cost.macs / 1e6:.3f} MMACs, "
          f"{cost.params:,} params{' (base weights, not fine-tuned)' if args.untrained else ''}"
          f"; wrote " + ", ".join(str(out / f) for f in written)
          + ("; no prune_config.json: its metrics are the fine-tuned model's" if args.untrained
             else ""))
    return 0


def _check_recorded_cost(config: dict[str, Any], macs: float, params: int, where: str) -> None:
    """The rebuilt model must cost what the config's metrics say: a config edited after export
    (another input shape, other pruning) would otherwise pass its old figures on."""
    trial = config.get("metrics", {}).get("trial", {})
    wrong = {k: (trial[k], got) for k, got in (("macs", macs), ("params", params))
             if trial.get(k) is not None and abs(float(trial[k]) - got) > 0.5}
    if wrong:
        shown = ", ".join(f"{k} {want:,.0f} (rebuilt: {got:,.0f})" for k, (want, got) in
                          wrong.items())
        raise AutopruneError(f"{where}: metrics.trial says {shown}, so model or pruning was "
                             "changed after export; allowed: the config as export wrote it")


def submit_command(args: argparse.Namespace, runtime_env_file: str) -> list[str]:
    """``ray job submit`` of the same search, run on the cluster with ``--address auto``."""
    ray_bin = Path(sys.executable).with_name("ray")
    cmd = [str(ray_bin) if ray_bin.exists() else "ray", "job", "submit"]
    if args.address:
        cmd += ["--address", args.address]
    if not args.wait:
        cmd.append("--no-wait")
    cmd += ["--runtime-env", runtime_env_file, "--", "python", "-m", "autoprune.cli", "search",
            args.space, "--backend", "ray", "--address", "auto",
            "--cpus-per-trial", str(args.cpus_per_trial)]  # the job's log: a line per trial
    for flag, value in (("--gpus-per-trial", args.gpus_per_trial or None),
                        ("--trials", args.trials), ("--study", args.study),
                        ("--runs-dir", args.runs_dir),
                        ("--concurrency", args.concurrency), ("--seed", args.seed),
                        ("--timeout", args.timeout)):
        if value is not None:
            cmd += [flag, str(value)]
    if args.resume:
        cmd.append("--resume")
    return cmd


def _check_dashboard(address: str) -> None:
    """The Ray dashboard that ``ray job submit`` talks to must accept a connection (else Ray's
    job client ends in a long traceback)."""
    import socket
    from urllib.parse import urlsplit

    if address == "auto":
        return
    url = urlsplit(address if "://" in address else f"http://{address}")
    try:
        socket.create_connection((url.hostname or "127.0.0.1", url.port or 8265),
                                 timeout=5).close()
    except (OSError, ValueError) as e:
        raise AutopruneError(f"--address {address}: no Ray dashboard answers there ({e}); "
                             "allowed: the dashboard of a running cluster, e.g. "
                             "http://head:8265 (`ray start --head` serves one on this "
                             "machine at 127.0.0.1:8265)") from None


def runtime_env(given: str | None, folder: Path | None = None) -> dict[str, Any]:
    """The job's runtime env: the file given; else ``cluster/runtime_env.yaml`` here (a clone
    of autoprune), else the one autoprune ships. Its ``working_dir`` (``.``) uploads the
    project the command runs in; when autoprune's own package is an installed one or lies
    outside it (autoprune installed into a project of the user's), the package goes too, as
    a ``py_modules`` entry: the job runs ``python -m autoprune.cli`` on the cluster. A
    virtualenv inside the project is excluded from the upload.

    Raises:
        AutopruneError: the file given is not there or not a runtime env mapping.
    """
    import yaml

    import autoprune
    from autoprune.config import shipped

    folder = folder or Path.cwd()
    if given is None:
        here = folder / "cluster" / "runtime_env.yaml"
        path = here if here.is_file() else (shipped("cluster") or here.parent) / here.name
    else:
        path = Path(given)
    try:
        env = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise AutopruneError(f"--runtime-env: got {str(path)!r}, which cannot be read ({e}); "
                             "allowed: a Ray runtime env YAML file (default: "
                             "cluster/runtime_env.yaml, else the one autoprune ships)") from None
    if not isinstance(env, dict):
        raise AutopruneError(f"--runtime-env: got {str(path)!r}, which holds {env!r}; allowed: "
                             "a mapping (working_dir, pip, env_vars, ...)")
    if env.get("working_dir") is None:
        return env
    package = Path(autoprune.__file__).resolve().parent
    workdir = (folder / str(env["working_dir"])).resolve()
    installed = any(part in ("site-packages", "dist-packages") for part in package.parts)
    if installed or not package.is_relative_to(workdir):
        env["py_modules"] = [*env.get("py_modules", []), str(package)]
    # a virtualenv inside the project is not uploaded (gigabytes, over Ray's limit)
    prefix = Path(sys.prefix).resolve()
    if prefix != workdir and prefix.is_relative_to(workdir):
        env["excludes"] = [*env.get("excludes", []), f"{prefix.relative_to(workdir).as_posix()}/"]
    return env


def cmd_submit(args: argparse.Namespace) -> int:
    import subprocess
    import tempfile

    import yaml

    from autoprune.config import load_space

    load_space(args.space)  # a bad space fails here, not on the cluster
    env_spec = runtime_env(args.runtime_env)  # and a missing runtime env
    _check_dashboard(args.address or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265")
    with tempfile.TemporaryDirectory() as tmp:
        env_file = Path(tmp) / "runtime_env.yaml"
        env_file.write_text(yaml.safe_dump(env_spec, sort_keys=False))
        cmd = submit_command(args, str(env_file))
        # Ray 2.60 heads use token auth by default; the job client must use the same mode, or
        # it fails with "Missing authentication token". Never turn auth off on the user's
        # behalf.
        env = dict(os.environ)
        env.setdefault("RAY_AUTH_MODE", "token")
        print(f"autoprune: RAY_AUTH_MODE={env['RAY_AUTH_MODE']} " + " ".join(cmd),
              file=sys.stderr)
        return subprocess.call(cmd, env=env)


def cmd_sensitivity(args: argparse.Namespace) -> int:
    import pandas as pd

    from autoprune.config import load_space
    from autoprune.preflight import preflight
    from autoprune.sensitivity import cache_path, cached_scan, cached_warm_start, plot_heatmap
    from autoprune.study import distributions
    from autoprune.trial import TrialContext

    space = load_space(args.space, {"runs_dir": args.runs_dir} if args.runs_dir else None)
    ratios = args.ratios or list(space.search.warm_start.ratios)
    ctx = TrialContext.build(space, check=preflight)
    sens, cached = cached_scan(ctx, ratios, progress=True)
    png = plot_heatmap(sens, cache_path(ctx, ratios).with_suffix(".png"))
    # the configs the warm start would seed: one per budget, with its counted MACs ratio
    configs, macs, _ = cached_warm_start(ctx, sens, distributions(space, ctx.groups))
    seeds = [{"budget": b, "macs_ratio": macs[b], "ratios": c} for b, c in configs.items()]
    if args.json:
        print(json.dumps({**sens.to_dict(), "warm_start": seeds}, indent=2))
        return 0
    df = pd.DataFrame(sens.accuracy, index=sens.groups,
                      columns=[f"r={r:.2f}" for r in sens.ratios])
    print(f"accuracy with one group pruned (adaptive BN, no fine-tune); base "
          f"{sens.base_accuracy:.4f}{' (cached)' if cached else ''}")
    with pd.option_context("display.float_format", "{:.4f}".format, "display.width", 200):
        print(df.to_string())
        seeded = pd.DataFrame({f"budget {b:g}": {"MACs ratio": macs[b], **c}
                               for b, c in configs.items()})
        print("\nwarm-start seeds (search.warm_start.budgets): ratio per group, counted MACs")
        print(seeded.to_string())
    print(f"\nheatmap: {png}")
    return 0


def _checked(convert: Callable[[str], Any], ok: Callable[[Any], bool],
             allowed: str) -> Callable[[str], Any]:
    """An argparse type: ``convert(text)`` where ``ok``, else an error naming what is allowed."""
    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"got {text!r}; allowed: {allowed}")
        return value
    return parse


_count = _checked(int, lambda v: v > 0, "an integer > 0")  # trials, jobs, concurrency
_seed = _checked(int, lambda v: 0 <= v <= MAX_SEED, f"an integer in [0, {MAX_SEED}]")
_share = _checked(float, lambda v: 0 <= v < float("inf"), "a number >= 0")  # CPUs, GPUs


def _duration(text: str) -> float:
    from autoprune.config import DURATION_ALLOWED, duration_seconds
    from autoprune.errors import ConfigError

    try:
        seconds = duration_seconds(text, "--timeout")
    except ConfigError:
        raise argparse.ArgumentTypeError(f"got {text!r}; allowed: {DURATION_ALLOWED}") from None
    assert seconds is not None
    return seconds


def _ratios(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--ratios: got {text!r}; allowed: e.g. 0.25,0.5,0.75") from None
    if not values or not all(0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"--ratios: got {text!r}; allowed: ratios in (0, 1)")
    return values


def _study_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options that find a study: its name and its storage (given, from a space, or the
    default under ``--runs-dir``)."""
    p.add_argument("--study", required=True, help="the study's name")
    p.add_argument("--space", help="read the storage from this space file")
    p.add_argument("--storage", help="Optuna storage URL (default sqlite:///runs/optuna.db)")
    p.add_argument("--runs-dir", type=_runs_dir,
                   help="the study's runs directory (default runs/; export also "
                                      "finds the base checkpoint, kept weights and MLflow "
                                      "store there)")
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="autoprune", description="Find per-layer (per-group) pruning ratios for a PyTorch "
        "model: list its groups, search, look at the Pareto front, export a point of it.")
    from autoprune import __version__

    p.add_argument("-V", "--version", action="version", version=f"autoprune {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    lay = sub.add_parser("layers", help="list the prunable dependency groups of a model")
    lay.add_argument("space", nargs="?", help="a search space YAML (or use --model)")
    lay.add_argument("--model", help="model source, e.g. torchvision:resnet18")
    lay.add_argument("--input-shape", type=_shape, help="e.g. 1,3,224,224")
    lay.add_argument("--input-dtype", choices=INPUT_DTYPE_NAMES,
                     default="float32", help="int64 for token ids (default float32)")
    lay.add_argument("--num-classes", type=int, default=None,
                     help="classifier size, for sources that take num_classes")
    lay.add_argument("--checkpoint", default=None, help="the model's state dict (.pt)")
    lay.add_argument("--json", action="store_true", help="print JSON")
    lay.add_argument("--write-space", metavar="FILE", help="write a starter search space")
    lay.set_defaults(fn=cmd_layers)

    se = sub.add_parser("search", help="search per-group pruning ratios")
    se.add_argument("space", help="search space YAML")
    se.add_argument("--trials", type=_count,
                    help="total trials in the study (default: the space's)")
    se.add_argument("--study", help="study name (default: the space's name)")
    se.add_argument("--jobs", type=_count, help="trials at once (default: the space's "
                                                  "search.jobs, else 1; on Ray, all that fit)")
    se.add_argument("--resume", action="store_true", help="continue an existing study")
    se.add_argument("--seed", type=_seed,
                    help="seed of the sampler and the trials (default: the space's search.seed)")
    se.add_argument("--timeout", type=_duration, metavar="DURATION",
                    help="this run's time budget, e.g. 90m or 8h (default: the space's "
                         "search.timeout, else none): then no trial starts, the running ones "
                         "finish, and --resume runs the rest")
    se.add_argument("--quiet", action="store_true",
                    help="no progress bar, per-trial lines or status lines (warnings, errors "
                         "and the final front still print)")
    se.add_argument("--runs-dir", type=_runs_dir,
                    help="where studies, MLflow store and checkpoints go "
                                       "(default: the space's runs_dir, runs/)")
    se.add_argument("--backend", choices=["local", "ray"],
                    help="local (default), or ray (the default when a Ray option is given)")
    se.add_argument("--address", help="Ray address (auto, ray://host:port, host:port); "
                                      "selects the Ray backend")
    se.add_argument("--concurrency", type=_count, help="Ray: trials at once (default: --jobs, "
                    "else search.jobs, else as many as the cluster's CPUs fit)")
    se.add_argument("--cpus-per-trial", type=_share, help="Ray: CPUs per trial (default 1)")
    se.add_argument("--gpus-per-trial", type=_share, help="Ray: GPUs per trial (default 0)")
    se.set_defaults(fn=cmd_search)

    sn = sub.add_parser("sensitivity", help="scan each group's accuracy vs pruning ratio")
    sn.add_argument("space", help="search space YAML")
    sn.add_argument("--ratios", type=_ratios, help="e.g. 0.25,0.5,0.75 (default: the space's)")
    sn.add_argument("--json", action="store_true", help="print JSON")
    sn.add_argument("--runs-dir", type=_runs_dir,
                    help="where the base model and the scan are cached, as in "
                                       "search (default: the space's runs_dir, runs/)")
    sn.set_defaults(fn=cmd_sensitivity)

    pa = _study_args(sub.add_parser("pareto", help="print a study's current Pareto front"))
    pa.add_argument("--json", action="store_true", help="print JSON")
    pa.set_defaults(fn=cmd_pareto)

    ex = _study_args(sub.add_parser("export", help="export a point of the front for deployment"))
    ex.add_argument("--pick", default="knee",
                    help="knee | max-accuracy | macs<=R | params<=R | latency_ms<=MS | "
                         "accuracy>=A | trial:N")
    ex.add_argument("--out", required=True, type=os.path.expanduser, help="the folder to write")
    ex.add_argument("--register", metavar="MODEL_NAME", help="register in the MLflow registry")
    ex.add_argument("--alias", default="champion",
                    help="the registry alias set on the new version (default: %(default)s)")
    ex.set_defaults(fn=cmd_export)

    ap = sub.add_parser("apply", help="rebuild a pruned model from prune_config.json")
    ap.add_argument("config", help="an export's prune_config.json")
    ap.add_argument("--weights", help="the pruned model's fine-tuned weights (the export's "
                                      "weights.pt)")
    ap.add_argument("--checkpoint", help="the base model checkpoint (its hash must match the "
                                         "config's); needed with --untrained")
    ap.add_argument("--untrained", action="store_true",
                    help="no --weights: the pruned architecture with the base weights")
    ap.add_argument("--out", required=True, type=os.path.expanduser, help="the folder to write")
    ap.add_argument("--force", action="store_true", help="accept a different base checkpoint")
    ap.set_defaults(fn=cmd_apply)

    sb = sub.add_parser("submit", help="submit the search as a Ray job to a running cluster")
    sb.add_argument("space", help="search space YAML (sent with the working dir)")
    sb.add_argument("--address", help="Ray dashboard address, e.g. http://head:8265 "
                                      "(default: RAY_ADDRESS or the local cluster)")
    sb.add_argument("--runtime-env", help="the job's runtime env YAML (default: "
                    "cluster/runtime_env.yaml, else the one autoprune ships; an installed "
                    "autoprune's package is uploaded with the working dir)")
    sb.add_argument("--trials", type=_count, help="as in search")
    sb.add_argument("--study", help="as in search")
    sb.add_argument("--concurrency", type=_count, help="trials at once")
    sb.add_argument("--cpus-per-trial", type=_share, default=1.0,
                    help="CPUs per trial (default 1)")
    sb.add_argument("--gpus-per-trial", type=_share, default=0.0,
                    help="GPUs per trial (default 0)")
    sb.add_argument("--seed", type=_seed, help="as in search")
    sb.add_argument("--timeout", type=_duration, metavar="DURATION", help="as in search")
    sb.add_argument("--resume", action="store_true", help="continue an existing study")
    sb.add_argument("--runs-dir", type=_runs_dir,
                    help="an absolute path on the head node for the results "
                                       "(default: runs/ inside the job's working dir)")
    sb.add_argument("--wait", action="store_true", help="follow the job's logs until it ends")
    sb.set_defaults(fn=cmd_submit)

    ui = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1")
    ui.add_argument("--uri", help="tracking URI (default sqlite:///runs/mlflow.db)")
    ui.add_argument("--runs-dir", type=_runs_dir,
                    default="runs", help="whose mlflow.db to show (default runs)")
    ui.add_argument("--port", type=int, default=5000, help="default 5000")
    ui.set_defaults(fn=cmd_ui)
    return p


def _autoprune_warnings() -> Any:
    """A ``warnings.showwarning`` that prints autoprune's own warnings as ``autoprune: warning:
    ...`` (not ``export.py:508: UserWarning:`` and a source line); others as Python does."""
    import warnings

    package = str(Path(__file__).resolve().parent)
    default = warnings.showwarning

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: Any = None, line: str | None = None) -> None:
        if category is UserWarning and str(Path(filename).resolve()).startswith(package):
            print(f"autoprune: warning: {message}", file=file or sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    return show


def main(argv: Sequence[str] | None = None) -> int:
    import warnings

    parser = build_parser()
    args = parser.parse_args(argv)
    shown, warnings.showwarning = warnings.showwarning, _autoprune_warnings()
    try:
        return int(args.fn(args))
    except AutopruneError as e:
        print(f"autoprune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        from autoprune.signals import STOPPED_BY

        again = (" (finished trials are kept: the same command with --resume goes on)"
                 if args.command == "search" else "")
        by = f" by {signal.Signals(STOPPED_BY[-1]).name}" if STOPPED_BY else ""
        print(f"autoprune: interrupted{by}{again}", file=sys.stderr)
        return 128 + STOPPED_BY[-1] if STOPPED_BY else 130
    except BrokenPipeError:  # `autoprune pareto | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:
        from autoprune.errors import environment_error, first_line

        what = environment_error(e)
        if what is None or os.environ.get("AUTOPRUNE_TRACEBACK"):
            raise
        again = (": fix that and run the same command with --resume (finished trials are "
                 "kept)" if args.command == "search" else ": fix that and run it again")
        print(f"autoprune: error: {what}{again} [{type(e).__name__}: {first_line(e)}; the "
              "traceback: AUTOPRUNE_TRACEBACK=1]", file=sys.stderr)
        return 1
    finally:
        warnings.showwarning = shown


if __name__ == "__main__":
    sys.exit(main())
