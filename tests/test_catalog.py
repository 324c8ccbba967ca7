"""Every torchvision classification family prunes end to end at random per-group ratios.

For each model: describe its groups, prune at seeded random ratios, then check the output shape
(batch 1 and 2), that MACs, parameters and the root layers really shrank, that the base model is
untouched, that :func:`replay` rebuilds the same model and that the ONNX export runs in
onnxruntime at other batch sizes and matches PyTorch. Small inputs keep the whole catalog within
a few minutes on 2 CPU cores; no weights are downloaded.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from autoprune.groups import describe_groups, left_out_groups, reshape_channels
from autoprune.measure import count_cost, export_onnx
from autoprune.prune import kept_after_rounding, prune_model, replay
from autoprune.sources import build_model

# name: (input side, build_model kwargs). 32x32 is the smallest input every family accepts
# (it ends at 1x1, ViT gets 2x2 patches of 16) and keeps the catalog fast.
CATALOG: dict[str, tuple[int, dict[str, Any]]] = {
    "resnet18": (32, {}),
    "resnet50": (32, {}),
    "resnext50_32x4d": (32, {}),        # grouped 3x3 convs
    "wide_resnet50_2": (32, {}),
    "mobilenet_v2": (32, {}),           # depthwise convs, inverted residuals
    "mobilenet_v3_small": (32, {}),     # squeeze-excitation
    "efficientnet_b0": (32, {}),
    "densenet121": (32, {}),            # concatenations
    "regnet_x_400mf": (32, {}),
    "convnext_tiny": (32, {}),          # channel-last LayerNorm, layer scale
    "vgg11_bn": (32, {}),               # flatten into a linear layer
    "squeezenet1_0": (32, {}),          # conv head
    "mnasnet0_5": (32, {}),
    "shufflenet_v2_x0_5": (32, {}),     # channel shuffle: only groups around it are offered
    "googlenet": (32, {}),              # inception concatenations
    "vit_b_16": (32, {"image_size": 32}),  # nn.MultiheadAttention, hidden_dim attribute
    "swin_t": (32, {}),                 # window attention: its widths stay, MLPs prune
}
NUM_CLASSES = 10
pytestmark = pytest.mark.filterwarnings(
    "ignore:Unwrapped parameters detected", "ignore:Maximum recursive depth reached")


def _realistic(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """Give a randomly initialised model outputs worth comparing.

    torchvision zero-initialises some weights (ViT's head: the output would be all zeros) and
    with untouched BatchNorm statistics the outputs of deep nets shrink to about 1e-10, where
    any tolerance passes. Random values for all-zero weights and statistics from one batch fix
    both.
    """
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                nn.init.normal_(p, std=0.02)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a plain average: after one batch, exactly its statistics
    with torch.no_grad():
        model.train()(torch.randn(8, *shape[1:], generator=torch.Generator().manual_seed(0)))
    for m, momentum in zip(bns, momenta, strict=True):
        m.momentum = momentum
    return model.eval()


def _fingerprint(model: nn.Module) -> dict[str, tuple[tuple[int, ...], float]]:
    return {k: (tuple(v.shape), float(v.double().sum())) for k, v in model.state_dict().items()}


def _out_width(module: nn.Module) -> int:
    return int(module.out_channels if isinstance(module, nn.modules.conv._ConvNd)
               else module.out_features)


def _assert_close(actual: torch.Tensor | np.ndarray, expected: torch.Tensor, what: str) -> None:
    """Relative to the output's magnitude: rtol 1e-3, atol 1e-3 of the largest logit."""
    actual = torch.as_tensor(actual)
    scale = float(expected.abs().max())
    assert scale > 1e-4, f"{what}: degenerate outputs (max |logit| {scale:g})"
    torch.testing.assert_close(actual, expected, rtol=1e-3, atol=1e-3 * scale, msg=what)


@pytest.mark.parametrize("name", list(CATALOG))
def test_catalog_model_prunes_replays_and_exports(name: str, tmp_path: Path) -> None:
    side, kwargs = CATALOG[name]
    shape = (1, 3, side, side)
    torch.manual_seed(0)
    base = _realistic(build_model(f"torchvision:{name}", shape, NUM_CLASSES, kwargs), shape)
    before = _fingerprint(base)
    example = torch.zeros(shape)
    batch = torch.randn(2, *shape[1:], generator=torch.Generator().manual_seed(1))

    groups = describe_groups(base, example)
    assert groups, f"{name}: no prunable group"
    rng = random.Random(name)  # seeded per model: reruns prune the same channels
    ratios = {g.name: round(rng.uniform(0.1, 0.6), 3) for g in groups}
    pruned, record = prune_model(base, example, ratios)

    # Output shape, batch 1 and 2.
    with torch.no_grad():
        assert tuple(pruned(example).shape) == (1, NUM_CLASSES)
        out = pruned(batch)
    assert tuple(out.shape) == (2, NUM_CLASSES)

    # Really smaller: MACs, parameters and every root layer whose ratio removes a channel.
    base_cost, pruned_cost = count_cost(base, shape), count_cost(pruned, shape)
    assert pruned_cost.macs < base_cost.macs
    assert pruned_cost.params < base_cost.params
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in base.parameters())
    assert set(record.kept_channels) == {g.name for g in groups}
    modules = dict(pruned.named_modules())
    shrunk = 0
    for g in groups:
        kept = record.kept_channels[g.name]
        assert record.base_channels[g.name] == g.channels
        assert _out_width(modules[g.name]) == kept
        asked = kept_after_rounding(g.channels, ratios[g.name], 1, g.blocks)
        # Grouped convs and attention heads keep the nearest multiple of their blocks.
        assert kept == asked, f"{name}: group {g.name} kept {kept}, asked {asked}"
        assert kept % g.blocks == 0 or g.channels % g.blocks, (name, g.name, kept, g.blocks)
        assert abs(kept - g.channels * (1 - ratios[g.name])) <= g.blocks / 2 + 1e-9 \
            or kept == g.blocks, (name, g.name, kept, g.blocks)
        shrunk += kept < g.channels
    assert shrunk > 0

    # The base model is untouched.
    assert _fingerprint(base) == before

    # Replay rebuilds exactly the pruned model.
    rebuilt = replay(base, example, record)
    assert _fingerprint(base) == before
    assert _fingerprint(rebuilt) == _fingerprint(pruned)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(batch), out, rtol=0, atol=0)

    # ONNX with a dynamic batch axis: onnxruntime runs batches 2 and 3 like PyTorch.
    path = export_onnx(pruned, shape, tmp_path / f"{name}.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch3 = torch.randn(3, *shape[1:], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out3 = pruned(batch3)
    for x, expected in ((batch, out), (batch3, out3)):
        (onnx_out,) = session.run(None, {"input": x.numpy()})
        _assert_close(onnx_out, expected, f"{name}: onnxruntime vs torch at batch {len(x)}")


@pytest.mark.parametrize(("src", "dst", "c_in", "c_out", "how"), [
    ((1, 512, 1, 1), (1, 512), 512, 512, ("same", 1)),            # flatten before the head
    ((1, 768, 2, 2), (1, 768, 4), 768, None, ("same", 1)),        # ViT patches, next width unknown
    ((1, 8, 8, 96), (1, 1, 8, 1, 8, 96), 96, 96, ("same", 1)),    # Swin window partition
    ((1, 512, 7, 7), (1, 25088), 512, 25088, ("flatten", 49)),    # VGG into its classifier
    ((1, 25088), (1, 512, 7, 7), 25088, 512, ("unflatten", 49)),
    ((1, 192, 8, 8), (1, 2, 96, 8, 8), 192, None, None),          # channel shuffle
    ((1, 16, 16, 16), (1, 2, 8, 16, 16), 16, 16, None),           # ... as wide as it is high
    ((5, 49, 288), (5, 49, 3, 3, 32), 288, 96, None),             # q, k, v split into heads
    ((1, 192, 8, 8), (1, 2, 96, 8, 8), None, None, None),         # widths unknown
    ((32,), (1, 32), 32, 32, ("same", 1)),                        # a Linear fed one sample
    ((1, 16, 64), (16, 64), 16, 64, None),     # the batch would merge with the channels
])
def test_reshape_channels(src: tuple[int, ...], dst: tuple[int, ...], c_in: int | None,
                          c_out: int | None, how: tuple[str, int] | None) -> None:
    assert reshape_channels(src, dst, c_in, c_out) == how


def test_reshape_channels_last_when_tokens_are_as_many_as_channels() -> None:
    # 64 tokens x 64 channels after a Linear: the batch axis merges with the tokens; only the
    # channel axis (the last) must survive, which it does
    assert reshape_channels((1, 64, 64), (64, 64), 64, 64) is None  # axis unknown: cut off
    assert reshape_channels((1, 64, 64), (64, 64), 64, 64, channel_last=True) == ("same", 1)
    assert reshape_channels((5, 49, 288), (5, 49, 3, 3, 32), 288, 96, channel_last=True) is None


def test_attention_model_whose_token_count_equals_its_width_keeps_its_embedding_group() -> None:
    """The embedding group of a ViT with 64 tokens of width 64 used to vanish without a word:
    a reshape of (1, 64, 64) to (64, 64) could not tell tokens from channels."""

    class ViT(nn.Module):
        def __init__(self, dim: int = 64) -> None:
            super().__init__()
            self.patch = nn.Conv2d(3, dim, 4, stride=4)
            self.ln = nn.LayerNorm(dim)
            self.attn = nn.MultiheadAttention(dim, 4, batch_first=True)
            self.ln2 = nn.LayerNorm(dim)
            self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
            self.head = nn.Linear(dim, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.patch(x).flatten(2).transpose(1, 2)  # 8 x 8 = 64 tokens
            h = self.ln(x)
            x = x + self.attn(h, h, h, need_weights=False)[0]
            return self.head((x + self.mlp(self.ln2(x))).mean(1))

    torch.manual_seed(0)
    model, example = ViT().eval(), torch.zeros(1, 3, 32, 32)
    groups = {g.name: g.channels for g in describe_groups(model, example)}
    assert groups == {"mlp.2": 64, "mlp.0": 128}
    pruned, record = prune_model(model, example, {"mlp.2": 0.5}, round_to=4)
    assert record.kept_channels["mlp.2"] == 32
    assert pruned.patch.out_channels == 32 and pruned.attn.embed_dim == 32
    assert pruned(torch.randn(2, 3, 32, 32)).shape == (2, 10)

    assert left_out_groups(model, example) == {}
    # Without the LayerNorm before the MLP, its first Linear runs as view, mm, view: the view
    # back, (64, 128) -> (1, 64, 128), only adds a unit axis, so the channels are read through
    # it and the group stays (it was left out before the unit-axis rule).
    model.ln2 = nn.Identity()
    assert {g.name: g.channels for g in describe_groups(model, example)} == groups
    assert left_out_groups(model, example) == {}
    pruned, record = prune_model(model, example, {"mlp.2": 0.5, "mlp.0": 0.5}, round_to=4)
    assert record.kept_channels == {"mlp.2": 32, "mlp.0": 64}
    assert pruned.mlp[0].in_features == 32 and pruned.attn.embed_dim == 32
    assert pruned(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_grouped_conv_keeps_one_channel_per_block_at_high_ratios() -> None:
    """Torch-Pruning cannot empty the blocks of a grouped conv and used to skip such a group
    without a word: the model came back unpruned (resnext50_32x4d at ratio 0.95)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, groups=8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    example = torch.zeros(1, 3, 8, 8)
    assert {g.name: g.channels for g in describe_groups(model, example)} == {"0": 32, "3": 32}
    pruned, record = prune_model(model, example, {"0": 0.95, "3": 0.95})
    assert record.kept_channels == {"0": 8, "3": 8}  # 2 asked, one per block of the 8 blocks
    assert pruned[3].weight.shape[:2] == (8, 1)


def test_groups_in_blocks_keep_the_nearest_multiple_of_them() -> None:
    """GroupNorm(4, C) splits a group into 4 blocks. The kept count was rounded down to a
    multiple of 4: ratio 0.05 of 16 channels pruned 25% and 0.3 pruned 50%."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, padding=1), nn.GroupNorm(4, 32), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    example = torch.zeros(1, 3, 8, 8)
    assert {g.name: (g.channels, g.blocks) for g in describe_groups(model, example)} == {
        "0": (16, 4), "3": (32, 4)}
    kept = {}
    for ratio in (0.05, 0.3, 0.4):
        pruned, record = prune_model(model, example, {"0": ratio, "3": ratio})
        kept[ratio] = record.kept_channels
        assert pruned(torch.randn(2, 3, 8, 8)).shape == (2, 10)
    # 15.2 -> 16, 11.2 -> 12, 9.6 -> 8; 30.4 -> 32, 22.4 -> 24, 19.2 -> 20
    assert kept == {0.05: {"0": 16, "3": 32}, 0.3: {"0": 12, "3": 24}, 0.4: {"0": 8, "3": 20}}


def test_a_group_of_single_channel_blocks_is_not_searched() -> None:
    """The input of a depthwise conv with a channel multiplier (16 -> 32, groups=16) is 16
    blocks of one channel: no ratio removes any. It was searched all the same, every trial
    keeping all 16 (a dead dimension, and a 'uniform 0.5' baseline that left it whole)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, padding=1, groups=16), nn.BatchNorm2d(32),
                          nn.ReLU(), nn.Conv2d(32, 32, 1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    example = torch.zeros(1, 1, 8, 8)
    groups = {g.name: (g.channels, g.blocks) for g in describe_groups(model, example)}
    assert groups == {"3": (32, 16), "6": (32, 1)}
    assert "16 blocks of one" in left_out_groups(model, example)["0"]
    pruned, record = prune_model(model, example, {"3": 0.5, "6": 0.25})
    assert record.kept_channels == {"3": 16, "6": 24}
    assert pruned(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_an_embedding_no_group_prunes_is_named_as_not_searched() -> None:
    """An embedding feeding a Conv1d: its width is no group's (groups start at conv, linear
    and LSTM layers), and `layers` named it neither as a group nor as left out."""

    class TextCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(17, 16)
            self.c1 = nn.Conv1d(16, 32, 3, padding=1)
            self.fc = nn.Linear(32, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.c1(self.emb(x).transpose(1, 2))).mean(2))

    model, example = TextCNN().eval(), torch.zeros(1, 12, dtype=torch.long)
    assert [g.name for g in describe_groups(model, example)] == ["c1"]
    assert left_out_groups(model, example)["emb"].startswith(
        "an embedding (16 wide): its width is not searched")
    assert left_out_groups(model, example, ignore=["emb"]) == {}


@pytest.mark.parametrize("importance", ["l1", "l2", "lamp", "fpgm", "random"])
def test_every_importance_prunes_a_model_with_a_grouped_conv(importance: str) -> None:
    """Torch-Pruning 1.6's FPGM raised on a grouped conv's input side, so every fpgm trial of
    such a model failed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, groups=4), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    example = torch.zeros(1, 3, 8, 8)
    pruned, record = prune_model(model, example, {"0": 0.5, "3": 0.5}, importance)
    assert record.kept_channels == {"0": 16, "3": 16}
    assert pruned[3].weight.shape[:2] == (16, 4)
    assert pruned(torch.randn(2, 3, 8, 8)).shape == (2, 10)
