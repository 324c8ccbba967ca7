"""Measurements: MACs/params, latency (torch and ONNX Runtime), accuracy, adaptive BN."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from autoprune.finetune import adaptive_bn, steps_for, train
from autoprune.measure import (
    LatencyResult,
    count_cost,
    evaluate,
    export_onnx,
    measure_latency,
    top1_accuracy,
)
from autoprune.prune import prune_model
from autoprune.sources import DataBundle, build_model

SHAPE = (1, 1, 8, 8)


def _resnet(width: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return build_model("builtin:resnet_tiny", SHAPE, 10, {"width": width, "blocks": 1}).eval()


@pytest.fixture(scope="module")
def trained(digits: DataBundle) -> nn.Module:
    """tiny_cnn trained for 150 steps on digits (a few seconds on one core)."""
    torch.manual_seed(0)
    model = build_model("builtin:tiny_cnn", SHAPE, 10, {"width": 8})
    train(model, digits.train, steps=150, lr=0.05)
    return model.eval()


def test_count_cost_of_known_layers() -> None:
    conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False))
    cost = count_cost(conv, (5, 1, 8, 8))
    assert cost.macs == 4 * 9 * 64  # out channels x kernel x output positions
    assert cost.params == 36
    assert cost.input_shape == (1, 1, 8, 8)  # always one sample
    assert cost.flops == 2 * cost.macs
    linear = nn.Sequential(nn.Flatten(), nn.Linear(64, 5, bias=False))
    assert count_cost(linear, SHAPE).macs == 320
    # Affine BatchNorm adds two ops per element, ReLU one (as COUNTED_OPS states).
    cbr = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
    assert count_cost(cbr, SHAPE).macs == 2304 + 2 * 256 + 256
    assert "FLOPs = 2 x MACs" in cost.counted


def test_sync_batchnorm_is_counted_as_batchnorm() -> None:
    """Sweep X: a model trained with DDP's SyncBatchNorm counted 2.5% fewer MACs."""
    plain = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8))
    synced = nn.Sequential(nn.Conv2d(1, 8, 3), nn.SyncBatchNorm(8))
    assert count_cost(synced, (1, 1, 8, 8)).macs == count_cost(plain, (1, 1, 8, 8)).macs > \
        count_cost(plain[:1], (1, 1, 8, 8)).macs


def test_count_cost_lower_after_pruning() -> None:
    base = _resnet()
    base_cost = count_cost(base, SHAPE)
    pruned, _record = prune_model(base, torch.zeros(SHAPE), {"stem.0": 0.5,
                                                             "layer3.0.conv1": 0.5})
    cost = count_cost(pruned, SHAPE)
    assert cost.macs < base_cost.macs
    assert cost.params < base_cost.params
    assert cost.params == sum(p.numel() for p in pruned.parameters())
    assert cost.to_dict()["flops"] == 2 * cost.macs
    assert base.training is False  # count_cost restores the mode


def test_count_cost_keeps_training_mode() -> None:
    model = _resnet().train()
    count_cost(model, SHAPE)
    assert model.training


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_measure_latency_states_how(runtime: str) -> None:
    result = measure_latency(_resnet(), SHAPE, runtime=runtime, threads=1, batch_size=2,
                             warmup=2, repeats=7)
    assert isinstance(result, LatencyResult)
    assert result.runtime == runtime
    assert result.device == ("cpu" if runtime == "torch" else "CPUExecutionProvider")
    assert (result.threads, result.batch_size, result.warmup, result.repeats) == (1, 2, 2, 7)
    assert result.input_shape == (2, 1, 8, 8)
    assert 0 < result.min_ms <= result.median_ms <= result.p90_ms
    assert result.min_ms <= result.mean_ms
    assert result.to_dict()["median_ms"] == result.median_ms


def test_measure_latency_restores_threads_and_rejects_unknown_runtime() -> None:
    before = torch.get_num_threads()
    measure_latency(_resnet(), SHAPE, runtime="torch", threads=2, warmup=0, repeats=2)
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="latency.runtime: got 'tvm'"):
        measure_latency(_resnet(), SHAPE, runtime="tvm")


def test_onnx_export_matches_torch_with_dynamic_batch(tmp_path: Path) -> None:
    import onnxruntime as ort

    model = _resnet()
    path = export_onnx(model, SHAPE, tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 1, 8, 8)
    (out,) = sess.run(None, {"input": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(out, model(x).numpy(), rtol=1e-4, atol=1e-5)
    # An exported file is timed as it is.
    result = measure_latency(model, SHAPE, "onnxruntime", batch_size=4, warmup=1, repeats=3,
                             onnx_path=path)
    assert result.input_shape == (4, 1, 8, 8)


def test_top1_accuracy_of_a_trained_model(trained: nn.Module, digits: DataBundle) -> None:
    acc = top1_accuracy(trained, digits.val)
    assert acc > 0.85
    untrained = build_model("builtin:tiny_cnn", SHAPE, 10, {"width": 8})
    assert top1_accuracy(untrained, digits.val) < 0.5
    # The value is the plain fraction of correct predictions.
    with torch.no_grad():
        correct = sum(int((trained(x).argmax(1) == y).sum()) for x, y in digits.val)
    assert acc == correct / 360
    first = top1_accuracy(trained, digits.val, max_batches=1)
    assert 0.0 <= first <= 1.0
    assert evaluate(trained, digits.val) == acc
    assert evaluate(trained, digits.val, fn=lambda m, loader: 0.25) == 0.25
    with pytest.raises(ValueError, match="no samples"):
        top1_accuracy(trained, [])


def test_adaptive_bn_reestimates_running_stats(digits: DataBundle) -> None:
    model = _resnet()
    bn = model.stem[1]
    momentum = bn.momentum
    batches = list(digits.calibration_batches(3))
    used = adaptive_bn(model, batches, batches=3)
    assert used == 3
    assert not model.training and bn.momentum == momentum
    assert int(bn.num_batches_tracked) == 3
    # With a cumulative average over equal batches, the stem BN's running statistics are the
    # statistics of the stem conv's outputs on the calibration data.
    with torch.no_grad():
        conv_out = torch.cat([model.stem[0](x) for x, _y in batches])
    torch.testing.assert_close(bn.running_mean, conv_out.mean((0, 2, 3)), rtol=1e-4,
                               atol=1e-5)
    per_batch_var = torch.stack([model.stem[0](x).detach().var((0, 2, 3)) for x, _y in batches])
    torch.testing.assert_close(bn.running_var, per_batch_var.mean(0), rtol=1e-4, atol=1e-5)


def test_adaptive_bn_changes_stats_of_a_pruned_model(trained: nn.Module,
                                                     digits: DataBundle) -> None:
    pruned, _record = prune_model(trained, torch.zeros(SHAPE), {"0.0": 0.5, "1.0": 0.5})
    before = [m.running_mean.clone() for m in pruned.modules() if isinstance(m, nn.BatchNorm2d)]
    acc_before = top1_accuracy(pruned, digits.val)
    assert adaptive_bn(pruned, digits.train, batches=4) == 4
    after = [m.running_mean for m in pruned.modules() if isinstance(m, nn.BatchNorm2d)]
    assert any(not torch.allclose(a, b) for a, b in zip(before, after, strict=True))
    # Re-estimated statistics recover much of the accuracy pruning lost (EagleEye's proxy).
    assert top1_accuracy(pruned, digits.val) > acc_before + 0.1


def test_adaptive_bn_estimates_a_frozen_batchnorm_too(digits: DataBundle) -> None:
    """Sweep X: a model whose train() keeps its BatchNorm in eval (the frozen BN of detection
    backbones) kept the reset statistics, mean 0 and variance 1, in every pruned copy."""

    class FrozenBN(nn.Sequential):
        def train(self, mode: bool = True) -> FrozenBN:
            super().train(mode)
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
            return self

    model = FrozenBN(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    batches = list(digits.calibration_batches(2))
    assert adaptive_bn(model, batches, batches=2) == 2
    with torch.no_grad():
        conv_out = torch.cat([model[0](x) for x, _y in batches])
    torch.testing.assert_close(model[1].running_mean, conv_out.mean((0, 2, 3)), rtol=1e-4,
                               atol=1e-5)
    assert not model[1].training


def test_adaptive_bn_without_batchnorm() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    assert adaptive_bn(model, [(torch.zeros(2, 1, 8, 8), torch.zeros(2))], batches=2) == 0


class _ConvLSTM(nn.Module):
    """Conv1d features -> LSTM over 25 steps -> classifier: an audio or sensor model."""

    def __init__(self, recurrent: type[nn.RNNBase] = nn.LSTM) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv1d(1, 32, 9, stride=4), nn.BatchNorm1d(32), nn.ReLU(),
                                  nn.AdaptiveAvgPool1d(25))
        self.rnn = recurrent(32, 24, batch_first=True)
        self.fc = nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.conv(x).transpose(1, 2))
        return self.fc(out[:, -1])


def test_lstm_macs_count_every_step_once() -> None:
    """Torch-Pruning's hook took the feature width (32) for the sequence length (25) and the
    time steps (25) for the batch: the LSTM was counted about 30x too high."""
    model = _ConvLSTM()
    lstm_alone = count_cost(model, (1, 1, 400)).macs - count_cost(
        nn.Sequential(model.conv), (1, 1, 400)).macs - (24 * 3 + 3)
    gates, hidden = 4 * 24, 24
    per_step = gates * 32 + gates * 24 + 4 * hidden + 6 * hidden + 2 * gates
    assert lstm_alone == pytest.approx(per_step * 25, rel=0.01)


def test_a_failed_torchscript_export_prints_nothing(tmp_path: Path) -> None:
    """The TorchScript exporter's C++ logger printed its whole IR graph to stdout before the
    dynamo exporter took over: in the middle of the progress bar, or of `pareto --json`."""
    import subprocess
    import sys

    script = (
        "import torch\nfrom torch import nn\nfrom autoprune.measure import export_onnx\n"
        "m = nn.Sequential(nn.Conv1d(1, 4, 3), nn.AdaptiveAvgPool1d(25), nn.Flatten(),\n"
        "                  nn.Linear(100, 3))  # 47 -> 25: not a factor, TorchScript fails\n"
        f"export_onnx(m, (1, 1, 49), {str(tmp_path / 'm.onnx')!r})\nprint('exported')\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True)
    assert out.stdout == "exported\n"
    assert "Torch IR graph" not in out.stderr
    assert (tmp_path / "m.onnx").is_file()


def test_latency_settings_this_machine_cannot_measure_fail_before_training(
        tmp_path: Path) -> None:
    """``latency.device: auto`` passed the config check, then failed with a raw torch error
    after the base model had trained; ``cuda`` without CUDA (or with the CPU-only onnxruntime)
    silently timed the CPU; 100,000 threads crashed the process."""
    import os

    import onnxruntime as ort
    from _helpers import tiny_space

    from autoprune.config import parse_space
    from autoprune.errors import ConfigError
    from autoprune.measure import latency_device, measure_latency, threads_warning
    from autoprune.trial import TrialContext

    runs = tmp_path / "runs"
    cores = os.cpu_count() or 1
    cases = [({"latency.threads": 8 * cores + 1},
              rf"latency.threads: got {8 * cores + 1}; allowed: 1 to {8 * cores} \(8 per core")]
    if not torch.cuda.is_available():
        cases.append(({"latency.runtime": "torch", "latency.device": "cuda"},
                      r"latency.device: got 'cuda'; allowed: 'cpu' or 'auto' here, with "
                      r"latency.runtime 'torch': no CUDA device is available"))
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        cases.append(({"latency.runtime": "onnxruntime", "latency.device": "cuda"},
                      r"latency.device: got 'cuda'; allowed: 'cpu' or 'auto' here, with "
                      r"latency.runtime 'onnxruntime'"))
    for changes, match in cases:
        with pytest.raises(ConfigError, match=match):
            TrialContext.build(parse_space(tiny_space(runs, "lat", **changes)))
        assert not (runs / "base").exists()  # before the base model's training

    # auto: CUDA where the runtime can use it, else the CPU; the result names which
    where = latency_device("torch", "auto")
    assert where == ("cuda" if torch.cuda.is_available() else "cpu")
    got = measure_latency(nn.Linear(4, 2), (1, 4), "torch", device="auto", warmup=0, repeats=2)
    assert got.device.startswith(where)
    assert threads_warning(cores) is None
    assert f"latency.threads {cores} x 2 trials at once exceeds this machine's {cores} cores" \
        in str(threads_warning(cores, jobs=2))


def test_a_fraction_of_an_epoch_is_at_least_one_step() -> None:
    """epochs may be a fraction: 0.02 of 23 batches had rounded to no fine-tune at all, and
    every trial's 'fine-tuned' accuracy was its proxy."""
    loader = [None] * 23
    assert steps_for(0.02, None, loader) == 1
    assert steps_for(0.0, None, loader) == 0  # no fine-tune, asked for
    assert steps_for(0.5, None, loader) == 12
    assert steps_for(2.0, 5, loader) == 5  # steps win
