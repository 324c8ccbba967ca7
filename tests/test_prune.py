"""Pruning per dependency group: channels really go, the record replays, the base is untouched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from autoprune.errors import ConfigError, PruningError
from autoprune.groups import describe_groups
from autoprune.prune import PruneRecord, kept_after_rounding, prune_model, replay
from autoprune.sources import DataBundle, build_model, load_checkpoint

SHAPE = (1, 1, 8, 8)
# resnet_tiny width 16, one block per stage: groups and their channels.
GROUPS = {"stem.0": 16, "layer1.0.conv1": 16, "layer2.0.conv1": 32, "layer2.0.shortcut.0": 32,
          "layer3.0.conv1": 64, "layer3.0.shortcut.0": 64}
RATIOS = {"stem.0": 0.5, "layer2.0.conv1": 0.3, "layer3.0.shortcut.0": 0.25}


def _base(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model("builtin:resnet_tiny", SHAPE, 10, {"width": 16, "blocks": 1})
    # Non-trivial BN statistics, so replay and reload are checked on every tensor.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture
def base() -> nn.Module:
    return _base()


@pytest.fixture
def example() -> torch.Tensor:
    return torch.zeros(SHAPE)


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.randn(5, *SHAPE[1:], generator=torch.Generator().manual_seed(1))


def test_groups_of_the_test_model(base: nn.Module, example: torch.Tensor) -> None:
    groups = {g.name: g.channels for g in describe_groups(base, example)}
    assert groups == GROUPS


def test_a_tabular_mlp_traced_with_one_sample_is_searchable_and_prunes() -> None:
    # A Linear fed one sample runs as [1, F] -> [F] -> [1, F] views: they had cut every
    # group off as "a reshape that does not keep them whole", so a model of input_shape
    # [1, 20] had nothing to search
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                        nn.Linear(32, 3)).eval()
    one = torch.zeros(1, 20)
    assert {g.name: g.channels for g in describe_groups(mlp, one)} == {"0": 32, "2": 32}
    pruned, record = prune_model(mlp, one, {"0": 0.5, "2": 0.25}, "l1")
    assert record.kept_channels == {"0": 16, "2": 24}
    assert [m.out_features for m in pruned if isinstance(m, nn.Linear)] == [16, 24, 3]
    assert pruned(torch.randn(5, 20)).shape == (5, 3)


def test_frozen_layers_are_groups_and_stay_frozen_once_pruned() -> None:
    """Sweep X: Torch-Pruning traces autograd, so a frozen stem (requires_grad=False) left
    no trace and was silently no group; a frozen layer it pruned came back trainable, and the
    brief fine-tune changed it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    for m in (model[0], model[1], model[3]):
        m.requires_grad_(False)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    example = torch.zeros(1, 1, 8, 8)
    assert {g.name for g in describe_groups(model, example)} == {"0", "3", "6"}
    pruned, record = prune_model(model, example, {"0": 0.5, "3": 0.5, "6": 0.5})
    assert record.kept_channels == {"0": 8, "3": 8, "6": 8}
    assert {n for n, p in pruned.named_parameters() if not p.requires_grad} == frozen
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == frozen


def test_layers_autograd_does_not_record_are_named_not_dropped() -> None:
    """Sweep X: layers run under torch.no_grad() in forward left no trace, so `layers` and
    the search neither offered nor named them."""
    from autoprune.groups import left_out_groups

    class Frozen(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(1, 8, 3), nn.Conv2d(8, 8, 3)
            self.conv3, self.head = nn.Conv2d(8, 16, 3), nn.Linear(16, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                x = self.conv2(torch.relu(self.conv1(x)))
            return self.head(torch.relu(self.conv3(x)).mean((2, 3)))

    model, example = Frozen().eval(), torch.zeros(1, 1, 8, 8)
    assert {g.name for g in describe_groups(model, example)} == {"conv3"}
    why = left_out_groups(model, example)
    assert set(why) == {"conv1", "conv2"}
    assert why["conv1"].startswith("autograd recorded no use of it in the traced forward (it "
                                   "runs under torch.no_grad()")


def test_a_group_a_training_only_branch_reads_is_named_before_the_search() -> None:
    """Sweep X: a layer only training runs (deep supervision) was never traced: the group it
    reads passed the checks, and every trial pruning it failed in the fine-tune with a bare
    shape error."""
    from autoprune.prune import failing_groups

    class DeepSupervised(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(16, 16, 3)
            self.bn = nn.BatchNorm2d(16)
            self.aux, self.head = nn.Conv2d(16, 10, 1), nn.Linear(16, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            mid = torch.relu(self.bn(self.conv1(x)))
            out = self.head(torch.relu(self.conv2(mid)).mean((2, 3)))
            return out + self.aux(mid).mean((2, 3)) if self.training else out

    torch.manual_seed(0)
    model, example = DeepSupervised().eval(), torch.zeros(1, 1, 8, 8)
    stats = model.bn.running_mean.clone()
    why = failing_groups(model, example, {"conv1": 0.5, "conv2": 0.5})
    assert set(why) == {"conv1"}
    assert "the pruned model fails in training mode, though it runs in eval mode" in why["conv1"]
    pruned, _ = prune_model(model, example, {"conv2": 0.5})
    assert not pruned.training and torch.equal(pruned.bn.running_mean, stats)


def test_macs_shares_are_per_sample_whatever_the_batch_traced(base: nn.Module) -> None:
    # Torch-Pruning divides its total by the batch but not each layer's count: a batch of 4
    # showed shares of 359%
    one = {g.name: g.macs_share for g in describe_groups(base, torch.zeros(SHAPE))}
    four = {g.name: g.macs_share for g in describe_groups(base, torch.zeros(4, *SHAPE[1:]))}
    assert four == pytest.approx(one) and 0 < max(one.values()) <= 1


@pytest.mark.parametrize(("channels", "ratio", "round_to", "kept"), [
    (64, 0.3, 8, 48),     # the documented example
    (64, 0.0, 8, 64),
    (64, 0.99, 8, 8),     # never fewer than round_to
    (64, 0.05, 8, 64),    # 60.8 rounds up to 64: nothing is pruned
    (32, 0.3, 4, 24),     # 22.4 -> 24
    (32, 0.3, 1, 22),
    (6, 0.5, 8, 3),       # fewer channels than round_to: plain rounding
    (10, 0.99, 1, 1),     # never fewer than 1
    (16, 0.5, 4, 8),
    # half-way cases round up as written, whatever the ratio's float error (the sampler gives
    # 0.35000000000000003; 60 * (1 - 0.9) is 5.999999999999998): they kept 24, 4 and 4
    (40, 0.35, 4, 28),
    (40, 0.35000000000000003, 4, 28),
    (20, 0.7000000000000001, 4, 8),
    (60, 0.9, 4, 8),
])
def test_kept_after_rounding(channels: int, ratio: float, round_to: int, kept: int) -> None:
    assert kept_after_rounding(channels, ratio, round_to) == kept


def test_kept_after_rounding_rule_holds_everywhere() -> None:
    for channels in (3, 8, 16, 24, 64, 96, 512):
        for round_to in (1, 2, 4, 8, 16):
            for step in range(20):
                ratio = step / 20
                kept = kept_after_rounding(channels, ratio, round_to)
                assert 1 <= kept <= channels
                if channels >= round_to:
                    assert kept >= round_to
                    assert kept % round_to == 0 or kept == channels
                    assert abs(kept - channels * (1 - ratio)) <= round_to / 2 + 1e-9 or (
                        kept == round_to)


def test_per_group_ratios_remove_channels(base: nn.Module, example: torch.Tensor,
                                          batch: torch.Tensor) -> None:
    pruned, record = prune_model(base, example, RATIOS, importance="l2", round_to=4)
    expected = {n: kept_after_rounding(c, RATIOS[n], 4) if n in RATIOS else c
                for n, c in GROUPS.items()}
    assert expected == {"stem.0": 8, "layer1.0.conv1": 16, "layer2.0.conv1": 24,
                        "layer2.0.shortcut.0": 32, "layer3.0.conv1": 64,
                        "layer3.0.shortcut.0": 48}
    assert record.kept_channels == expected
    assert record.base_channels == GROUPS
    assert record.ratios == RATIOS and record.round_to == 4 and record.importance == "l2"
    # The weights shrank: the stem group couples the stem, the stage-1 residual and the
    # stage-2 inputs; the stage-3 residual group reaches the classifier's input.
    assert pruned.stem[0].weight.shape == (8, 1, 3, 3)
    assert pruned.stem[1].num_features == 8
    assert pruned.layer1[0].conv1.weight.shape == (16, 8, 3, 3)
    assert pruned.layer1[0].conv2.weight.shape == (8, 16, 3, 3)
    assert pruned.layer2[0].conv1.weight.shape == (24, 8, 3, 3)
    assert pruned.layer2[0].conv2.weight.shape == (32, 24, 3, 3)
    assert pruned.layer2[0].shortcut[0].weight.shape == (32, 8, 1, 1)
    assert pruned.layer3[0].conv2.weight.shape == (48, 64, 3, 3)
    assert pruned.fc.weight.shape == (10, 48)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in base.parameters())
    with torch.no_grad():
        assert pruned(batch).shape == (5, 10)


def test_round_to_one_and_empty_ratios(base: nn.Module, example: torch.Tensor,
                                       batch: torch.Tensor) -> None:
    _pruned, record = prune_model(base, example, {"layer2.0.conv1": 0.3})
    assert record.kept_channels["layer2.0.conv1"] == 22
    same, record = prune_model(base, example, {})
    assert record.kept_channels == GROUPS and record.history == []
    with torch.no_grad():
        assert torch.equal(same(batch), base(batch))


def test_kept_channels_follow_rounding_for_many_ratios(base: nn.Module,
                                                       example: torch.Tensor) -> None:
    for ratio in (0.1, 0.45, 0.8):
        ratios = dict.fromkeys(GROUPS, ratio)
        _pruned, record = prune_model(base, example, ratios, round_to=8)
        assert record.kept_channels == {n: kept_after_rounding(c, ratio, 8)
                                        for n, c in GROUPS.items()}


def test_unknown_group_lists_close_matches(base: nn.Module, example: torch.Tensor) -> None:
    with pytest.raises(ConfigError) as info:
        prune_model(base, example, {"layer2.0.conv": 0.5})
    err = info.value
    assert err.path == "ratios.layer2.0.conv"
    assert "close matches: ['layer2.0.conv1'" in err.allowed
    assert "all groups:" in err.allowed and "'layer3.0.shortcut.0'" in err.allowed
    with pytest.raises(ConfigError, match="close matches: none"):
        prune_model(base, example, {"decoder": 0.5})


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_ratio_outside_unit_interval(base: nn.Module, example: torch.Tensor,
                                     ratio: float) -> None:
    with pytest.raises(ConfigError) as info:
        prune_model(base, example, {"stem.0": ratio})
    assert info.value.path == "ratios.stem.0"
    assert info.value.allowed == "a pruning ratio in [0, 1)"


def test_ignored_groups_and_head_cannot_be_pruned(base: nn.Module, example: torch.Tensor) -> None:
    names = {g.name for g in describe_groups(base, example, ignore=["layer2.*"])}
    assert names == {n for n in GROUPS if not n.startswith("layer2.")}
    with pytest.raises(ConfigError, match="ratios.layer2.0.conv1"):
        prune_model(base, example, {"layer2.0.conv1": 0.5}, ignore=["layer2.*"])
    with pytest.raises(ConfigError, match="ratios.fc"):
        prune_model(base, example, {"fc": 0.5})


def test_input_model_untouched(base: nn.Module, example: torch.Tensor,
                               digits: DataBundle) -> None:
    before = {k: v.clone() for k, v in base.state_dict().items()}
    modules_before = [type(m) for m in base.modules()]
    pruned, _record = prune_model(base, example, RATIOS, importance="taylor", round_to=4,
                                  grad_batches=list(digits.calibration_batches(2)))
    after = base.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [type(m) for m in base.modules()] == modules_before
    assert all(p.grad is None for p in base.parameters())
    assert all(p.grad is None for p in pruned.parameters())
    assert pruned is not base and pruned.stem[0] is not base.stem[0]


def test_failed_pruning_leaves_model_untouched(base: nn.Module, example: torch.Tensor) -> None:
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(PruningError, match="model.input_shape: the model does not accept"):
        prune_model(base, torch.zeros(1, 3, 8, 8), RATIOS)
    with pytest.raises(PruningError, match="pruning.importance: got 'l3'"):
        prune_model(base, example, RATIOS, importance="l3")
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


@pytest.mark.parametrize("importance", ["l1", "l2", "taylor", "random", "lamp", "fpgm"])
def test_importances(base: nn.Module, example: torch.Tensor, batch: torch.Tensor,
                     digits: DataBundle, importance: str) -> None:
    grads = list(digits.calibration_batches(2)) if importance == "taylor" else None
    pruned, record = prune_model(base, example, RATIOS, importance, round_to=4,
                                 grad_batches=grads)
    assert record.importance == importance
    assert record.kept_channels["stem.0"] == 8
    assert pruned.stem[0].weight.shape[0] == 8
    with torch.no_grad():
        assert torch.isfinite(pruned(batch)).all()


def test_importance_decides_which_channels_go(base: nn.Module, example: torch.Tensor) -> None:
    # Shrink channels 16-31 of the group layer2.0.conv1 -> bn1 -> conv2 in every member:
    # magnitude importance removes exactly those.
    block = base.layer2[0]
    with torch.no_grad():
        block.conv1.weight[16:] *= 1e-4
        block.bn1.weight[16:] *= 1e-4
        block.bn1.bias[16:] *= 1e-4
        block.conv2.weight[:, 16:] *= 1e-4
    for importance in ("l1", "l2"):
        _pruned, record = prune_model(base, example, {"layer2.0.conv1": 0.5}, importance)
        assert record.history == [("layer2.0.conv1", True, list(range(16, 32)))]
    _pruned, random = prune_model(base, example, {"layer2.0.conv1": 0.5}, "random")
    assert len(random.history[0][2]) == 16


def test_taylor_needs_gradient_batches(base: nn.Module, example: torch.Tensor) -> None:
    with pytest.raises(PruningError, match="needs at least one training batch"):
        prune_model(base, example, RATIOS, "taylor")


def test_replay_gives_identical_outputs(base: nn.Module, example: torch.Tensor,
                                        batch: torch.Tensor) -> None:
    pruned, record = prune_model(base, example, RATIOS, "l2", round_to=4)
    again = replay(base, example, record)
    via_json = replay(base, example,
                      PruneRecord.from_dict(json.loads(json.dumps(record.to_dict()))))
    assert PruneRecord.from_dict(json.loads(json.dumps(record.to_dict()))) == record
    with torch.no_grad():
        expected = pruned(batch)
        assert torch.equal(again(batch), expected)
        assert torch.equal(via_json(batch), expected)
    assert {k: v.shape for k, v in via_json.state_dict().items()} == \
        {k: v.shape for k, v in pruned.state_dict().items()}


def test_save_and_rebuild_without_unpickling(base: nn.Module, example: torch.Tensor,
                                             batch: torch.Tensor, tmp_path: Path) -> None:
    pruned, record = prune_model(base, example, RATIOS, "random", round_to=4)
    # Change the pruned weights, as fine-tuning would, so only a real reload reproduces them.
    with torch.no_grad():
        for p in pruned.parameters():
            p.add_(0.01 * torch.randn_like(p))
    torch.save(pruned.state_dict(), tmp_path / "pruned.pt")
    (tmp_path / "record.json").write_text(json.dumps(record.to_dict()))

    fresh_base = _base(seed=123)  # another init: the architecture is all that replay needs
    loaded = PruneRecord.from_dict(json.loads((tmp_path / "record.json").read_text()))
    rebuilt = replay(fresh_base, example, loaded)
    load_checkpoint(rebuilt, tmp_path / "pruned.pt", field="weights")
    state = torch.load(tmp_path / "pruned.pt", weights_only=True)
    assert state.keys() == rebuilt.state_dict().keys()
    with torch.no_grad():
        assert torch.equal(rebuilt(batch), pruned(batch))


def test_replay_on_another_architecture_fails(example: torch.Tensor, base: nn.Module) -> None:
    _pruned, record = prune_model(base, example, RATIOS, "l2", round_to=4)
    other = build_model("builtin:tiny_cnn", SHAPE, 10).eval()
    with pytest.raises(PruningError, match="the pruning record does not fit this base model"):
        replay(other, example, record)


def test_groups_that_reach_a_recurrent_layer_are_left_out_and_say_why() -> None:
    """Pruning an LSTM failed every trial with an IndexError: its groups are not searched, and
    ``layers`` says why, naming the layer."""
    from test_measure import _ConvLSTM

    from autoprune.groups import left_out_groups

    model = _ConvLSTM().eval()
    x = torch.zeros(1, 1, 400)
    assert [g.name for g in describe_groups(model, x)] == []
    why = left_out_groups(model, x)
    assert why == {n: "it touches rnn, a recurrent layer (LSTM) that Torch-Pruning does not "
                      "prune reliably" for n in ("rnn", "conv.0")}
    # Torch-Pruning traces a GRU as tensor operations: the group stops at a reshape inside it,
    # and the reason names the GRU, not only the reshape
    gru = _ConvLSTM(nn.GRU).eval()
    assert [g.name for g in describe_groups(gru, x)] == []
    assert left_out_groups(gru, x)["conv.0"].startswith(
        "it touches rnn, a recurrent layer (GRU) that Torch-Pruning does not prune reliably "
        "(its channels cross a reshape inside it: ")


class _AttentionMap(nn.Module):
    """Per-channel spatial softmax attention, its width written into the code (``fixed``) or
    read from the tensor."""

    def __init__(self, fixed: bool) -> None:
        super().__init__()
        self.fixed, self.c = fixed, 32
        self.c1 = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.c2 = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c2(self.c1(x))
        width = self.c if self.fixed else x.shape[1]
        att = x.view(x.shape[0], width, -1).softmax(-1).view_as(x)
        return self.fc((x * att).sum((2, 3)))


def test_a_width_written_into_a_reshape_is_caught_not_pruned_into_another_model() -> None:
    """x.view(n, 32, -1) on 16 pruned channels runs and spreads two channels over each
    softmax row: the same output shape, another model, and nothing failed."""
    from autoprune.prune import failing_groups

    x = torch.zeros(1, 1, 8, 8)
    fixed = _AttentionMap(fixed=True).eval()
    why = failing_groups(fixed, x, {"c1.0": 0.5, "c2.0": 0.5})
    assert list(why) == ["c2.0"]
    assert why["c2.0"] == (
        "pruning it to ratio 0.5 fails (a reshape does not follow the pruned channels: "
        "[1, 32, 8, 8] -> [1, 32, 64] before pruning, [1, 16, 8, 8] -> [1, 32, 32] after, so "
        "the pruned model would compute something else (a width written into the model's "
        "code, as in x.view(n, 32, -1)? x.view(n, x.shape[1], -1) follows the pruning))")
    read = _AttentionMap(fixed=False).eval()
    assert failing_groups(read, x, {"c1.0": 0.5, "c2.0": 0.5}) == {}
    pruned, _ = prune_model(read, x, {"c2.0": 0.5})
    assert pruned.c2[0].out_channels == 16


def test_a_reshape_between_widths_torch_pruning_cannot_trace_says_so() -> None:
    """Swin's window reshapes keep the channels whole, but Torch-Pruning finds no width on
    either side (its recursion runs out), and the reason said they do not keep them whole."""
    import torchvision

    from autoprune.groups import left_out_groups

    why = left_out_groups(torchvision.models.swin_t(weights=None).eval(),
                          torch.zeros(1, 3, 224, 224))
    assert why["features.1.1.mlp.3"].startswith("its channels cross a reshape (")
    assert why["features.1.1.mlp.3"].endswith(
        "between layers whose width Torch-Pruning could not trace, so no channel can be "
        "followed through it")
    # a head split, whose widths are known, does not keep them whole
    assert why["features.7.1.mlp.3"] == ("its channels cross a reshape that does not keep "
                                         "them whole (UnsafeViewBackward0 [1, 49, 24, 32] -> "
                                         "[1, 49, 768])")


class _PixelShuffleNet(nn.Module):
    """An upsampler whose conv feeds a PixelShuffle, next to a plain conv block."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.up = nn.Conv2d(16, 64, 1)
        self.shuffle = nn.PixelShuffle(2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.shuffle(self.up(self.stem(x))).mean((2, 3)))


class _MaskedNet(nn.Module):
    """A per-channel buffer used in ``forward``: Torch-Pruning does not shrink it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.register_buffer("mask", torch.ones(1, 32, 1, 1))
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc((self.b(self.a(x)) * self.mask).mean((2, 3)))


class _TiedNet(nn.Module):
    """Two layers holding one weight tensor (weight tying)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU())
        self.p1 = nn.Linear(16, 16)
        self.p2 = nn.Linear(16, 16)
        self.p2.weight = self.p1.weight
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x).mean((2, 3))
        return self.fc(torch.relu(self.p2(torch.relu(self.p1(x)))))


class _ChunkNet(nn.Module):
    """An SE block beside a torch.chunk whose half gets a residual add (Torch-Pruning cannot
    score the trunk's group)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 32, 3, 2, 1)
        self.b1 = nn.BatchNorm2d(32)
        self.se1, self.se2 = nn.Conv2d(32, 8, 1), nn.Conv2d(8, 32, 1)
        self.up = nn.Conv2d(32, 16, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b1(self.c1(x)))
        x = x * torch.sigmoid(self.se2(torch.relu(self.se1(x.mean((2, 3), keepdim=True)))))
        p, q = torch.chunk(x, 2, dim=1)
        return self.fc(torch.cat([p + self.up(x), q], 1).mean((2, 3)))


def test_groups_torch_pruning_cannot_prune_are_found_and_named() -> None:
    """Groups that fail to prune (every trial over them would fail) are named with the error;
    the groups that prune are not, and a model whose groups all prune costs one pass."""
    from autoprune.prune import failing_groups

    x = torch.zeros(1, 1, 8, 8)
    masked = _MaskedNet().eval()
    names = [g.name for g in describe_groups(masked, x)]
    assert sorted(names) == ["a.0", "b.0"]
    why = failing_groups(masked, x, {n: 0.25 for n in names})
    assert list(why) == ["b.0"]
    assert why["b.0"].startswith("pruning it to ratio 0.25 fails (RuntimeError: The size of "
                                 "tensor a (24) must match the size of tensor b (32)")
    shuffle = _PixelShuffleNet().eval()
    why = failing_groups(shuffle, x, {g.name: 0.25 for g in describe_groups(shuffle, x)})
    assert "up" in why and "IndexError" in why["up"]
    # one group Torch-Pruning cannot score failed every other group's pruning too
    chunk = _ChunkNet().eval()
    names = sorted(g.name for g in describe_groups(chunk, x))
    assert names == ["se1", "se2"]
    why = failing_groups(chunk, x, {n: 0.25 for n in names})
    assert list(why) == ["se2"] and "IndexError" in why["se2"]
    pruned, record = prune_model(chunk, x, {"se1": 0.5})
    assert record.kept_channels["se1"] == 4 and pruned.se1.out_channels == 4
    plain = build_model("builtin:resnet_tiny", (1, 1, 8, 8), 10, {"width": 8}).eval()
    assert failing_groups(plain, x, {g.name: 0.5 for g in describe_groups(plain, x)}) == {}


def test_tied_weights_are_never_pruned_apart() -> None:
    """Pruning one of two layers that share a weight would give it a new tensor and silently
    untie them: every group that touches one is left out, and says so."""
    from autoprune.groups import left_out_groups

    model = _TiedNet().eval()
    x = torch.zeros(1, 1, 8, 8)
    assert describe_groups(model, x) == []
    why = left_out_groups(model, x)
    assert why["p1"] == "it touches p1, whose weight is tied to p2 (pruning would untie them)"
    assert set(why) == {"p1", "p2", "conv.0"}
