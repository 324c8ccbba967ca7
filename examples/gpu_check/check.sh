#!/bin/bash
# GPU check of autoprune, run from the repository root: searches on CUDA (torch latency on
# CUDA, multi-fidelity, sensitivity warm start, distillation; Taylor importance, inheritance
# and --jobs 2 on one GPU), a resume, export and `apply` in a process with no CUDA, export
# without kept weights, the shipped demo, benchmarks/gpu_latency.py --quick and the latency
# tests. It ran on an H100 on 2026-11-27 (the README's GPU notes):
#     DEV=cuda TRIALS=16 EPOCHS=6 DTRIALS=14 bash examples/gpu_check/check.sh
# A dry run on a CPU: DEV=cpu TRIALS=6 EPOCHS=1 PY=.venv/bin/python SKIP_WHL=1 bash ...
# Where autoprune's dependencies are missing (a bare GPU machine), put their wheels in .whl/
# (pip download --no-deps for that machine's Python); they are installed to /tmp/site.
# Its log goes to $OUT/log.txt (default /tmp/gpuout), its work to $W (default /tmp/gpuw).
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpuout}; mkdir -p $OUT
W=${W:-/tmp/gpuw}; rm -rf $W; mkdir -p $W
LOG=$OUT/log.txt
exec > >(tee $LOG) 2>&1
if [ -d .whl ] && [ "${SKIP_WHL:-0}" = 0 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
PY=${PY:-python3}
ap() { $PY -c 'import sys; from autoprune.cli import main; sys.argv[0]="autoprune"; sys.exit(main())' "$@"; }
step() { echo; echo "=== $1 ($(date +%T))"; }
runs_of() { $PY - $1 $2 <<'PY'
import sys, mlflow
d, exp = sys.argv[1], sys.argv[2]
mlflow.set_tracking_uri(f"sqlite:///{d}/mlflow.db")
runs = mlflow.search_runs(experiment_names=[exp])
cols = [c for c in runs.columns if c in ("status", "tags.mlflow.runName", "tags.latency_setup", "metrics.latency_ms", "metrics.accuracy", "metrics.macs_ratio", "params.device", "tags.device")]
print(runs[cols].to_string(max_colwidth=70))
PY
}
step versions
nvidia-smi -L 2>&1 | head -2
$PY -c 'import torch, onnxruntime as o, optuna, mlflow, torch_pruning as tp; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "ort", o.__version__, o.get_available_providers(), "optuna", optuna.__version__, "mlflow", mlflow.__version__, "tp", tp.__version__)'
$PY examples/gpu_check/spaces.py $W || exit 1
step "A: search on $DEV (torch latency on $DEV, fidelity, sensitivity, distill)"
time ap search $W/a.yaml --quiet; echo "rc=$?"
step "A: resume adds 2 trials"
ap search $W/a.yaml --quiet --resume --trials $(( ${TRIALS:-12} + 2 )); echo "rc=$?"
step "A: pareto"
ap pareto --study gpu-a --runs-dir $W/runs_a; echo "rc=$?"
step "A: export knee"
ap export --study gpu-a --runs-dir $W/runs_a --pick knee --out $W/exp_a; echo "rc=$?"
ls $W/exp_a
step "A: apply on a process with no CUDA"
CUDA_VISIBLE_DEVICES= ap apply $W/exp_a/prune_config.json --weights $W/exp_a/weights.pt --out $W/apply_a 2>&1 | tail -5; echo "rc=${PIPESTATUS[0]}"; ls $W/apply_a
CUDA_VISIBLE_DEVICES= $PY - $W <<'PY'
import sys, torch, glob, numpy as np, onnxruntime as ort
w = sys.argv[1]
pt = glob.glob(w + "/exp_a/*.pt") + glob.glob(w + "/apply_a/*.pt"); ox = glob.glob(w + "/exp_a/*.onnx")
print("files", pt, ox, "cuda visible", torch.cuda.is_available())
for p in pt:
    try:
        obj = torch.load(p, map_location=None, weights_only=False)
        devs = {t.device.type for t in (obj.values() if isinstance(obj, dict) else obj.state_dict().values()) if torch.is_tensor(t)}
        print(p, type(obj).__name__, "tensor devices", devs)
    except Exception as e:
        print(p, "load failed:", type(e).__name__, str(e)[:300])
for p in glob.glob(w + "/exp_a/*.pt2"):
    try:
        ep = torch.export.load(p); x = torch.randn(1, 1, 28, 28)
        y = ep.module()(x); print(p, "torch.export.load ok, out", tuple(y.shape))
        s = ort.InferenceSession(w + "/exp_a/model.onnx", providers=["CPUExecutionProvider"])
        yo = s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]
        print("onnx vs pt2 max abs diff", float(np.abs(yo - y.detach().numpy()).max()))
    except Exception as e:
        print(p, "pt2 failed:", type(e).__name__, str(e)[:300])
PY
runs_of $W/runs_a gpu-a | tail -8
step "E: keep_models false on $DEV: export re-runs the trial"
ap search $W/e.yaml --quiet; echo "rc=$?"
ap export --study gpu-e --runs-dir $W/runs_e --pick max-accuracy --out $W/exp_e1; echo "rc=$?"
ap export --study gpu-e --runs-dir $W/runs_e --pick knee --out $W/exp_e2; echo "rc=$?"
step "C: onnxruntime latency device cuda (expected: an error if ORT has no CUDA provider)"
ap search $W/c.yaml --quiet; echo "rc=$?"
step "B: onnxruntime latency device auto, taylor, inherit, jobs 2 on $DEV"
time ap search $W/b.yaml --quiet; echo "rc=$?"
runs_of $W/runs_b gpu-b
step "gpu_latency benchmark (quick)"
(cd benchmarks && timeout 200 $PY gpu_latency.py --quick --out-dir $W/bench); echo "rc=$?"
step "D: the demo space as shipped, on this machine (search.device/latency defaults)"
mkdir -p $W/demo && (cd $W/demo && time ap search $OLDPWD/search_spaces/digits_resnet.yaml --quiet --trials ${DTRIALS:-16}; echo "rc=$?"; ls runs)
runs_of $W/demo/runs digits-resnet | tail -4
step "pytest measure"
timeout 200 $PY -m pytest -q -x -p no:cacheprovider tests/test_measure.py 2>&1 | tail -8
step "pack"
(cd $W && tar czf $OUT/results.tgz --exclude='*.pt' --exclude='*.db' --exclude='mlruns' --exclude='*.onnx' exp_a exp_e1 exp_e2 bench runs_a/*.md runs_b/*.md 2>/dev/null); ls -la $OUT
step done
