"""Model tests: shapes, block wiring, initialisation, depth rules, parameter and FLOP counts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mnist_resnet.config import (
    PRESETS,
    ConfigError,
    DataConfig,
    ModelConfig,
    TrainConfig,
    from_dict,
    stem_from_flags,
)
from mnist_resnet.model import (
    BaselineNet,
    BottleneckBlock,
    PlainBlock,
    ResNet,
    build_model,
    conv_weight_count,
    count_parameters,
    flops_per_image,
    fold_batchnorm,
    folded_copy,
    resnet,
    stack_members,
    summary,
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _randomise_bn(module: nn.Module) -> None:
    """Non-trivial BN statistics and affine parameters, so a wrong wiring cannot hide."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)


def _main_path_convs(model: nn.Module) -> list[nn.Conv2d]:
    shortcut_convs = {
        id(m)
        for block in model.modules()
        if isinstance(block, PlainBlock | BottleneckBlock) and block.shortcut is not None
        for m in block.shortcut.modules()
    }
    return [m for m in model.modules() if isinstance(m, nn.Conv2d) and id(m) not in shortcut_convs]


# --- shapes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_gives_logits_of_shape_batch_by_classes(name: str) -> None:
    model = build_model(PRESETS[name].model).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 28, 28))
    assert out.shape == (2, 10)


@pytest.mark.parametrize(
    "arch,block", [("resnet", "plain"), ("resnet", "bottleneck"), ("baseline", "plain")]
)
def test_in_channels_and_num_classes_are_honoured(arch: str, block: str) -> None:
    depth = 20 if block == "plain" else 29
    cfg = ModelConfig(arch=arch, block=block, depth=depth, in_channels=3, num_classes=5)
    model = build_model(cfg).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 28, 28))
    assert out.shape == (2, 5)


def test_width_scales_every_stage_and_rounds_to_at_least_one_channel() -> None:
    half = resnet(20, width=0.5)
    convs = [[m for m in s.modules() if isinstance(m, nn.Conv2d)] for s in half.stages]
    assert [c[-1].out_channels for c in convs] == [8, 16, 32]
    tiny = resnet(20, width=0.01)
    assert tiny.conv1.out_channels == 1
    assert tiny(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_stages_are_the_three_layers_with_strides_1_2_2() -> None:
    model = resnet(20)
    assert model.stages == (model.layer1, model.layer2, model.layer3)
    assert [s[0].conv1.stride for s in model.stages] == [(1, 1), (2, 2), (2, 2)]
    assert all(len(s) == 3 for s in model.stages)


# --- block structure ------------------------------------------------------------------------


@pytest.mark.parametrize("stride", [1, 2])
def test_plain_block_layers_in_order(stride: int) -> None:
    block = PlainBlock(16, 32, stride)
    children = list(block.named_children())
    assert [name for name, _ in children] == ["conv1", "bn1", "relu", "conv2", "bn2", "shortcut"]
    conv1, bn1, relu, conv2, bn2 = (m for _, m in children[:5])
    assert isinstance(conv1, nn.Conv2d) and isinstance(conv2, nn.Conv2d)
    assert (conv1.kernel_size, conv1.stride, conv1.padding) == ((3, 3), (stride, stride), (1, 1))
    assert (conv2.kernel_size, conv2.stride, conv2.padding) == ((3, 3), (1, 1), (1, 1))
    assert (conv1.in_channels, conv1.out_channels, conv2.out_channels) == (16, 32, 32)
    assert isinstance(bn1, nn.BatchNorm2d) and isinstance(bn2, nn.BatchNorm2d)
    assert isinstance(relu, nn.ReLU)
    assert PlainBlock.expansion == 1


def test_no_conv_anywhere_has_a_bias() -> None:
    for model in (resnet(20), resnet(29, "bottleneck"), resnet(20, shortcut=False)):
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        assert convs and all(c.bias is None for c in convs)


def test_identity_shortcut_when_shape_is_kept() -> None:
    assert isinstance(PlainBlock(16, 16, 1).shortcut, nn.Identity)


@pytest.mark.parametrize("in_channels,stride", [(16, 2), (8, 1), (8, 2)])
def test_projection_shortcut_when_shape_changes(in_channels: int, stride: int) -> None:
    shortcut = PlainBlock(in_channels, 16, stride).shortcut
    assert isinstance(shortcut, nn.Sequential)
    conv, bn = shortcut
    assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
    assert (conv.kernel_size, conv.stride, conv.bias) == ((1, 1), (stride, stride), None)
    assert (conv.in_channels, conv.out_channels, bn.num_features) == (in_channels, 16, 16)


def test_bottleneck_block_kernels_channels_and_stride() -> None:
    block = BottleneckBlock(64, 32, stride=2)
    assert BottleneckBlock.expansion == 4
    convs = [block.conv1, block.conv2, block.conv3]
    assert [c.kernel_size for c in convs] == [(1, 1), (3, 3), (1, 1)]
    assert [c.stride for c in convs] == [(1, 1), (2, 2), (1, 1)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(64, 32), (32, 32), (32, 128)]
    assert isinstance(block.shortcut, nn.Sequential)
    assert block.shortcut[0].stride == (2, 2)
    assert isinstance(BottleneckBlock(128, 32).shortcut, nn.Identity)


@pytest.mark.numerics
@pytest.mark.parametrize("in_channels,stride", [(16, 1), (8, 2)])
def test_plain_block_forward_is_conv_bn_relu_conv_bn_add_relu(
    in_channels: int, stride: int
) -> None:
    block = PlainBlock(in_channels, 16, stride)
    _randomise_bn(block)
    block.eval()
    x = torch.randn(2, in_channels, 8, 8)
    assert block.shortcut is not None
    with torch.no_grad():
        expected = F.relu(
            block.bn2(block.conv2(F.relu(block.bn1(block.conv1(x))))) + block.shortcut(x)
        )
        actual = block(x)
    torch.testing.assert_close(actual, expected)


@pytest.mark.numerics
def test_bottleneck_block_forward_matches_manual_recomputation() -> None:
    block = BottleneckBlock(16, 8, stride=2)
    _randomise_bn(block)
    block.eval()
    x = torch.randn(2, 16, 8, 8)
    assert block.shortcut is not None
    with torch.no_grad():
        out = F.relu(block.bn1(block.conv1(x)))
        out = F.relu(block.bn2(block.conv2(out)))
        expected = F.relu(block.bn3(block.conv3(out)) + block.shortcut(x))
        actual = block(x)
    torch.testing.assert_close(actual, expected)


def test_forward_calls_submodules_in_order() -> None:
    block = PlainBlock(8, 16, 2)
    calls: list[str] = []
    for name, module in block.named_modules():
        if name:
            module.register_forward_hook(lambda m, i, o, name=name: calls.append(name))
    block(torch.randn(2, 8, 8, 8))
    assert calls == [
        "conv1", "bn1", "relu", "conv2", "bn2",
        "shortcut.0", "shortcut.1", "shortcut", "relu",
    ]  # fmt: skip


def test_stem_stride_2_halves_every_stage_without_a_pool() -> None:
    cfg = ModelConfig(depth=14, stem="stride2")
    model = build_model(cfg)
    assert isinstance(model, ResNet) and model.conv1.stride == (2, 2)
    assert isinstance(model.stem_pool, nn.Identity)
    sizes: list[int] = []
    for stage in model.stages:
        stage.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1]))
    model(torch.randn(2, 1, 28, 28))
    assert sizes == [14, 7, 4]
    # Same weights as the stride-1 network, a quarter of its convolution work.
    assert count_parameters(model) == count_parameters(build_model(ModelConfig(depth=14)))
    assert flops_per_image(model) < flops_per_image(build_model(ModelConfig(depth=14))) / 3.5
    text = summary(cfg)
    assert "stride-2 stem" in text and "16x14x14" in text and "64x4x4" in text


def test_unshuffled_stem_runs_every_stage_at_a_quarter_of_the_pixels() -> None:
    cfg = ModelConfig(depth=14, stem="unshuffle")
    model = build_model(cfg)
    assert isinstance(model, ResNet) and model.conv1.in_channels == 4
    assert model.conv1.stride == (1, 1) and isinstance(model.stem_pool, nn.Identity)
    sizes: list[int] = []
    for module in (model.conv1, *model.stages):
        module.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1]))
    x = torch.randn(2, 1, 28, 28, requires_grad=True)
    model(x)[:, 3].sum().backward()
    assert sizes == [14, 14, 7, 4]  # the stem conv never builds a 28x28 map
    # Unlike a pool, nothing is thrown away: every input pixel reaches the logits.
    assert x.grad is not None and bool((x.grad != 0).all())
    assert flops_per_image(model) < flops_per_image(build_model(ModelConfig(depth=14))) / 3.5
    text = summary(cfg)
    assert "unshuffled stem" in text and "16x14x14" in text and "64x4x4" in text


@pytest.mark.parametrize(
    "flags", [{"stem_pool": True}, {"stem_stride": 2}], ids=["with-pool", "with-stride-2"]
)
def test_old_unshuffled_stem_flags_reject_a_second_downsampling(flags: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="--stem-unshuffle already quarters the pixels"):
        stem_from_flags(stem_unshuffle=True, **flags)


@pytest.mark.parametrize("pool_before_norm", [False, True])
def test_pooled_stem_order(pool_before_norm: bool) -> None:
    cfg = ModelConfig(depth=14, stem="pool-first" if pool_before_norm else "pool")
    model = build_model(cfg)
    assert isinstance(model, ResNet)
    calls: list[tuple[str, int]] = []
    for name in ("conv1", "stem_pool", "bn1", "layer1"):
        getattr(model, name).register_forward_hook(
            lambda m, i, o, name=name: calls.append((name, o.shape[-1]))
        )
    model(torch.randn(2, 1, 28, 28))
    if pool_before_norm:
        # BN (and the ReLU after it) see the pooled 14x14 map: a quarter of the work.
        assert calls == [("conv1", 28), ("stem_pool", 14), ("bn1", 14), ("layer1", 14)]
    else:
        assert calls == [("conv1", 28), ("bn1", 28), ("stem_pool", 14), ("layer1", 14)]


@pytest.mark.numerics
def test_pool_before_norm_matches_pool_after_when_bn_is_a_positive_affine_map() -> None:
    # In eval mode with gamma > 0, BN is monotonic per channel, so max-pool commutes with it
    # (and with ReLU): both orders give the same logits from the same weights.
    after = build_model(ModelConfig(depth=8, stem="pool"))
    _randomise_bn(after)
    before = build_model(ModelConfig(depth=8, stem="pool-first"))
    before.load_state_dict(after.state_dict())
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(before.eval()(x), after.eval()(x))


@pytest.mark.numerics
@pytest.mark.parametrize(
    "cfg",
    [
        ModelConfig(depth=14),
        ModelConfig(depth=20, width=0.5, shortcut=False),
        ModelConfig(block="bottleneck", depth=29),
        ModelConfig(depth=8, stem="pool"),
        ModelConfig(depth=8, stem="pool-first"),
        ModelConfig(depth=8, stem="unshuffle"),
        ModelConfig(arch="baseline"),
        ModelConfig(depth=8, members=3),
    ],
    ids=[
        "resnet14",
        "plain20",
        "bottleneck29",
        "pooled-stem",
        "pool-before-norm",
        "unshuffled-stem",
        "baseline",
        "ensemble",
    ],
)
def test_fold_batchnorm_keeps_eval_logits_and_removes_every_foldable_norm(
    cfg: ModelConfig,
) -> None:
    model = build_model(cfg)
    _randomise_bn(model)
    for m in model.modules():  # negative scales too: the stem's pool must then keep its BN
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, -1.5, 1.5)
    folded = build_model(cfg)
    folded.load_state_dict(model.state_dict())
    assert fold_batchnorm(folded) is folded and not folded.training
    # The copying form leaves its source (e.g. the model being trained) as it was.
    model.train()
    before = [type(m) for m in model.modules()]
    copied = folded_copy(model)
    assert model.training and [type(m) for m in model.modules()] == before
    assert not copied.training and copied is not model
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model.eval()(x), rtol=1e-4, atol=1e-5)
    norms = [name for name, m in folded.named_modules() if isinstance(m, nn.BatchNorm2d)]
    # Only the stem norm behind a max-pool stays: pool and BN commute only for positive scales.
    assert norms == (["bn1"] if cfg.pool_before_norm else [])
    convs = [m for m in folded.modules() if isinstance(m, nn.Conv2d)]
    if cfg.arch == "resnet":
        assert sum(c.bias is not None for c in convs) == len(convs) - cfg.pool_before_norm


def test_stem_is_one_named_choice_and_the_old_flags_map_onto_it() -> None:
    with pytest.raises(ConfigError, match="unknown stem 'pooled'"):
        build_model(ModelConfig(stem="pooled"))
    with pytest.raises(ConfigError, match="--stem-stride must be 1 or 2, got 3"):
        stem_from_flags(stem_stride=3)
    with pytest.raises(ConfigError, match="--pool-before-norm only applies with --stem-pool"):
        stem_from_flags(pool_before_norm=True)
    old = {"depth": 8, "stem_pool": True, "pool_before_norm": True, "stem_stride": 1}
    assert from_dict(ModelConfig, old).stem == "pool-first"
    assert from_dict(ModelConfig, {"depth": 8, "stem_stride": 2}).stem == "stride2"
    assert from_dict(ModelConfig, {"depth": 8}).stem == "conv"
    with pytest.raises(ConfigError, match=r"ModelConfig\.stem_pool: expected bool"):
        from_dict(ModelConfig, {"depth": 8, "stem_pool": 1})
    # The parts the builder reads, from the one choice.
    cfg = ModelConfig(stem="pool-first")
    assert (cfg.stem_pool, cfg.pool_before_norm, cfg.stem_stride, cfg.stem_unshuffle) == (
        True, True, 1, False,
    )  # fmt: skip


# --- shortcut=False: the paper's plain net --------------------------------------------------


@pytest.mark.parametrize("in_channels,stride", [(16, 1), (8, 2)])
def test_plain_net_block_has_no_skip_and_no_projection(in_channels: int, stride: int) -> None:
    block = PlainBlock(in_channels, 16, stride, shortcut=False)
    assert block.shortcut is None
    assert sum(isinstance(m, nn.Conv2d) for m in block.modules()) == 2
    _randomise_bn(block)
    block.eval()
    x = torch.randn(2, in_channels, 8, 8)
    with torch.no_grad():
        expected = F.relu(block.bn2(block.conv2(F.relu(block.bn1(block.conv1(x))))))
        actual = block(x)
    torch.testing.assert_close(actual, expected)


def test_plain_net_has_the_residual_nets_layers_minus_projections() -> None:
    residual, plain = resnet(20), resnet(20, shortcut=False)
    assert len(_main_path_convs(plain)) == len(_main_path_convs(residual))
    # Two projections (16->32, 32->64): 1x1 conv weights plus BN gamma and beta.
    assert count_parameters(residual) - count_parameters(plain) == 16 * 32 + 64 + 32 * 64 + 128


# --- initialisation -------------------------------------------------------------------------


def test_zero_init_residual_zeroes_every_last_bn_and_blocks_start_as_identity() -> None:
    for model in (
        resnet(20, zero_init_residual=True),
        resnet(29, "bottleneck", zero_init_residual=True),
    ):
        blocks = [b for b in model.modules() if isinstance(b, PlainBlock | BottleneckBlock)]
        assert len(blocks) == 9
        for block in blocks:
            last_bn = block.bn3 if isinstance(block, BottleneckBlock) else block.bn2
            assert torch.all(last_bn.weight == 0)
        model.eval()
        # First block of stage 2 has a projection shortcut, later blocks an identity.
        for first in (model.layer2[0], model.layer2[1]):
            assert isinstance(first, PlainBlock | BottleneckBlock) and first.shortcut is not None
            x = torch.randn(2, first.conv1.in_channels, 14, 14)
            with torch.no_grad():
                torch.testing.assert_close(first(x), F.relu(first.shortcut(x)))


def test_zero_init_is_skipped_without_shortcuts_and_when_disabled() -> None:
    for model in (resnet(20, shortcut=False, zero_init_residual=True), resnet(20)):
        blocks = [b for b in model.modules() if isinstance(b, PlainBlock)]
        assert all(torch.all(b.bn2.weight == 1) for b in blocks)


def test_conv_weights_are_kaiming_normal_fan_out() -> None:
    model = resnet(56)
    weights = torch.cat(
        [
            m.weight.flatten()
            for m in model.layer3.modules()
            if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)
        ]
    )
    # fan_out = 64 * 3 * 3, gain sqrt(2): std = sqrt(2 / 576).
    assert weights.std().item() == pytest.approx((2 / 576) ** 0.5, rel=0.02)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.all(bn.bias == 0) for bn in bns)


# --- depth rules and layer counts -----------------------------------------------------------


@pytest.mark.parametrize(
    "depth,block",
    [(21, "plain"), (2, "plain"), (21, "bottleneck"), (30, "bottleneck"), (8, "bottleneck")],
)
def test_invalid_depth_raises_config_error(depth: int, block: str) -> None:
    with pytest.raises(ConfigError, match=f"depth {depth} is not valid for {block} blocks"):
        resnet(depth, block)


def test_depth_20_is_valid_for_both_block_kinds() -> None:
    # 20 = 6*3 + 2 = 9*2 + 2: two bottleneck blocks per stage, not an invalid depth.
    assert len(resnet(20, "plain").layer1) == 3
    assert len(resnet(20, "bottleneck").layer1) == 2


def test_unknown_block_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown block"):
        resnet(20, "basic")


def test_build_model_validates_the_config() -> None:
    assert isinstance(build_model(ModelConfig()), ResNet)
    assert isinstance(build_model(ModelConfig(arch="baseline")), BaselineNet)
    with pytest.raises(ConfigError):
        build_model(ModelConfig(depth=21))


@pytest.mark.parametrize(
    "depth,block", [(20, "plain"), (56, "plain"), (29, "bottleneck"), (56, "bottleneck")]
)
def test_depth_counts_main_path_convs_plus_fc(depth: int, block: str) -> None:
    model = resnet(depth, block)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(_main_path_convs(model)) + len(linears) == depth


# --- parameter and FLOP counts --------------------------------------------------------------


def test_resnet20_parameter_count() -> None:
    # stem 144 + 32; stage 1: 3 x (2 x 2,304 + 64); stage 2: 4,608 + 9,216 + 128 + projection
    # 512 + 64, then 2 x (2 x 9,216 + 128); stage 3 likewise at 64 channels; fc 650.
    assert count_parameters(resnet(20)) == 272_186
    # With 3 input channels it is the widely quoted CIFAR ResNet-20 (projection shortcuts)
    # count, 0.27M as in He et al. 2015, Table 6.
    assert count_parameters(resnet(20, in_channels=3)) == 272_474


def test_baseline_matches_pytorch_examples_mnist_cnn() -> None:
    model = BaselineNet()
    assert count_parameters(model) == 1_199_882
    assert model.fc1.in_features == 64 * 12 * 12
    assert [type(m) for m in model.children()] == [
        nn.Conv2d,
        nn.Conv2d,
        nn.Dropout,
        nn.Dropout,
        nn.Linear,
        nn.Linear,
    ]
    assert (model.dropout1.p, model.dropout2.p) == (0.25, 0.5)


def test_baseline_returns_logits_not_log_probabilities() -> None:
    model = BaselineNet().eval()
    with torch.no_grad():
        out = model(torch.randn(4, 1, 28, 28))
    # log_softmax output would have logsumexp exactly 0 in every row.
    assert not torch.allclose(out.logsumexp(dim=1), torch.zeros(4), atol=1e-3)


def test_baseline_flops_are_the_conv_and_linear_arithmetic() -> None:
    expected = 2 * (26 * 26 * 32 * 9 + 24 * 24 * 64 * 32 * 9 + 9216 * 128 + 128 * 10)
    assert flops_per_image(BaselineNet()) == expected == 23_984_896


def test_resnet_flops_scale_with_depth() -> None:
    small, large = flops_per_image(resnet(20)), flops_per_image(resnet(56))
    assert small > 0
    assert 2.5 < large / small < 56 / 20 + 0.5
    # Stem plus 18 3x3 convs at 16/32/64 channels on 28/14/7 pixels, in MACs x 2 (plus fc and
    # projections): the CIFAR ResNet-20's ~41M MACs at 32x32 scaled by (28/32)^2.
    assert small == 62_043_904


def test_flops_per_image_keeps_training_mode_and_gradients_untouched() -> None:
    model = resnet(20).train()
    flops_per_image(model)
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_summary_reports_name_params_flops_and_stage_shapes() -> None:
    text = summary(PRESETS["resnet20"].model)
    assert "model: resnet-20 (plain blocks, shortcuts on)" in text
    assert "parameters: 272,186" in text
    assert "forward FLOPs/image: 62.0 M" in text
    assert "16x28x28" in text and "32x14x14" in text and "64x7x7" in text
    plain = summary(ModelConfig(block="bottleneck", depth=29, shortcut=False))
    assert "(bottleneck blocks, shortcuts off)" in plain and "256x7x7" in plain
    assert "baseline" in summary(PRESETS["baseline"].model)


# --- it learns ------------------------------------------------------------------------------


@pytest.mark.numerics
@pytest.mark.parametrize("shortcut", [True, False])
def test_a_few_sgd_steps_lower_the_loss_on_a_fixed_batch(shortcut: bool) -> None:
    model = resnet(20, width=0.5, shortcut=shortcut, zero_init_residual=shortcut)
    x = torch.randn(32, 1, 28, 28)
    y = torch.randint(0, 10, (32,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            value = F.cross_entropy(model(x), y).item()
        return float(value)

    before = eval_loss()
    model.train()
    for _ in range(15):
        optimizer.zero_grad()
        loss: Tensor = F.cross_entropy(model(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    assert eval_loss() < before


# --- ensembles in one module ------------------------------------------------------------------


@pytest.mark.numerics
@pytest.mark.parametrize(
    "cfg",
    [
        ModelConfig(depth=8),
        ModelConfig(block="bottleneck", depth=11, stem="pool-first", tta="shift-x"),
        ModelConfig(depth=8, width=0.5, in_channels=3, num_classes=4),
    ],
    ids=["plain", "bottleneck-pooled-tta", "rgb-4-classes"],
)
def test_a_packed_ensemble_predicts_the_mean_probability_of_its_members(
    cfg: ModelConfig,
) -> None:
    members = []
    for _ in range(3):
        net = build_model(cfg)
        _randomise_bn(net)
        members.append(net.eval())
    packed_cfg = ModelConfig(**{**cfg.__dict__, "members": 3})
    packed = build_model(packed_cfg)
    packed.load_state_dict(stack_members([m.state_dict() for m in members]))
    packed.eval()
    # Three members' weights, each counted once; none shared.
    assert count_parameters(packed) == 3 * count_parameters(members[0])
    assert conv_weight_count(packed_cfg) == 3 * conv_weight_count(cfg)
    x = torch.randn(5, cfg.in_channels, 28, 28)
    with torch.no_grad():
        mean = torch.stack([m(x).softmax(1) for m in members]).mean(0)
        torch.testing.assert_close(packed(x).softmax(1), mean, rtol=1e-4, atol=1e-6)
        # Folded for inference, it still does.
        folded = fold_batchnorm(packed)(x).softmax(1)
        torch.testing.assert_close(folded, mean, rtol=1e-4, atol=1e-6)
    assert "ensemble of 3" in summary(packed_cfg)


def test_members_of_different_shapes_do_not_stack_and_an_ensemble_is_never_trained(
    tmp_path: Path,
) -> None:
    small, large = build_model(ModelConfig(depth=8)), build_model(ModelConfig(depth=14))
    with pytest.raises(ConfigError, match="same shape"):
        stack_members([small.state_dict(), large.state_dict()])
    with pytest.raises(ConfigError, match="needs a resnet"):
        ModelConfig(arch="baseline", members=2).validate()
    from mnist_resnet.train import train

    runs = tmp_path / "runs"
    with pytest.raises(ConfigError, match="train its members one by one"):
        train(
            ModelConfig(depth=8, members=2),
            TrainConfig(runs_dir=str(runs)),
            DataConfig(data_dir=str(tmp_path)),
            log=lambda _: None,
        )
    assert not runs.exists()  # refused before a run folder was made
