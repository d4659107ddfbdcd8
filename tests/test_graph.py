"""The channel dependency graph of any functional Keras 3 model (ke_tf/surgery/graph.py): its groups
against Torch-Pruning's on the same architectures, slicing == masking in float64 on Keras
applications and on a model of our own (nested model, squeeze-excitation, concatenation, Flatten ->
Dense, non-layer ops), params/MACs predicted == counted, boundaries and refusals."""

import collections
import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from ke_tf.layers.gates import set_masks  # noqa: E402
from ke_tf.models import available_archs, build_model  # noqa: E402
from ke_tf.surgery.flops import complexity  # noqa: E402
from ke_tf.surgery.gating import insert_gates  # noqa: E402
from ke_tf.surgery.graph import ChannelGraph, UnsupportedLayerError  # noqa: E402
from ke_tf.surgery.slicing import slice_channels  # noqa: E402
from tests.numerics import assert_identical, float64, randomise_statistics  # noqa: E402

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "depgraph_torchvision.json")
L = keras.layers
APPS = {
    "resnet50": lambda **kw: keras.applications.ResNet50(weights=None, **kw),
    "mobilenet_v2": lambda **kw: keras.applications.MobileNetV2(weights=None, **kw),
    "densenet121": lambda **kw: keras.applications.DenseNet121(weights=None, **kw),
    "vgg16": lambda **kw: keras.applications.VGG16(weights=None, **kw),
}


def own_model():
    """Nested functional block with a depthwise conv, `x + y` and keras.ops.relu (non-layer ops),
    squeeze-excitation (Dense -> Reshape -> Multiply), Concatenate, Flatten -> Dense."""
    block_in = keras.Input((8, 8, 8))
    y = L.Conv2D(12, 1, name="expand")(block_in)
    y = L.BatchNormalization(name="expand_bn")(y)
    y = L.DepthwiseConv2D(3, padding="same", name="depthwise")(L.ReLU()(y))
    y = L.BatchNormalization(name="depthwise_bn")(y)
    block = keras.Model(block_in, L.Conv2D(8, 1, name="project")(y), name="block")
    inputs = keras.Input((8, 8, 3), name="image")
    x = keras.ops.relu(L.BatchNormalization(name="stem_bn")(L.Conv2D(8, 3, padding="same", name="stem")(inputs)))
    x = x + block(x)
    s = L.Dense(4, activation="relu", name="se_reduce")(L.GlobalAveragePooling2D()(x))
    s = L.Reshape((1, 1, 8))(L.Dense(8, activation="sigmoid", name="se_expand")(s))
    x = L.Multiply()([x, s])
    x = L.Concatenate()([x, L.Conv2D(6, 3, padding="same", name="side")(x)])
    x = L.ReLU()(L.BatchNormalization(name="cat_bn")(x))
    x = L.Flatten()(L.MaxPooling2D(4)(x))
    return keras.Model(inputs, L.Dense(5, name="head")(x), name="own")


def grouped_model(input_shape=(8, 8, 3), classes=5):
    """Grouped convolutions (a ResNeXt bottleneck, one reading the residual stream so the stream is
    cut into blocks), a per-channel grouped conv (groups == input channels, two filters each) and a
    depthwise conv with depth_multiplier 2."""
    inputs = keras.Input(input_shape, name="image")
    x = L.ReLU()(L.BatchNormalization(name="stem_bn")(L.Conv2D(8, 3, padding="same", name="stem")(inputs)))
    y = L.ReLU()(L.BatchNormalization(name="reduce_bn")(L.Conv2D(8, 1, name="reduce")(x)))
    y = L.ReLU()(L.BatchNormalization(name="grouped_bn")(L.Conv2D(8, 3, padding="same", groups=4, name="grouped")(y)))
    x = L.ReLU()(x + L.BatchNormalization(name="expand_bn")(L.Conv2D(8, 1, name="expand")(y)))
    x = L.ReLU()(x + L.BatchNormalization(name="g2_bn")(L.Conv2D(8, 1, groups=2, name="g2")(x)))
    y = L.BatchNormalization(name="dw2_bn")(L.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="dw2")(x))
    y = L.ReLU()(L.BatchNormalization(name="pw_bn")(L.Conv2D(6, 1, name="pw")(y)))
    y = L.Conv2D(12, 3, padding="same", groups=6, name="per_channel")(y)
    y = L.GlobalAveragePooling2D()(L.ReLU()(L.BatchNormalization(name="per_channel_bn")(y)))
    return keras.Model(inputs, L.Dense(classes, name="head")(y), name="grouped")


def _half(graph, rng):
    return {n: rng.choice(g.channels, max(1, g.channels // 2), replace=False) for n, g in graph.prunable().items()}


CASES = {
    "resnet50": lambda: APPS["resnet50"](input_shape=(32, 32, 3), classes=10, classifier_activation=None),
    "mobilenet_v2": lambda: APPS["mobilenet_v2"](input_shape=(32, 32, 3), alpha=0.35, classes=10),
    "densenet121": lambda: APPS["densenet121"](input_shape=(32, 32, 3), classes=10, classifier_activation=None),
    "vgg16": lambda: APPS["vgg16"](input_shape=(32, 32, 3), classes=10, classifier_activation=None),
    "own": own_model,
    "grouped": grouped_model,
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_half_of_every_group_sliced_equals_masked(name):
    """Uniform 50% pruning of every prunable group: the physically narrower model == the model with
    0/1 gates on the same channels (float64), params and MACs == the graph's prediction."""
    rng = np.random.default_rng(0)
    with float64():
        model = CASES[name]()
        randomise_statistics(model, seed=int(rng.integers(1 << 30)))
        graph = ChannelGraph(model)
        keep = _half(graph, rng)
        narrow = slice_channels(model, keep, graph)
        gated, gates = insert_gates(model, graph)
        set_masks(gates, keep)
        x = rng.normal(size=(2, *model.input_shape[1:]))
        assert_identical(narrow(x, training=False).numpy(), gated(x, training=False).numpy())
    widths = graph.widths(keep)
    assert complexity(narrow) == {"params": graph.params(widths), "macs": graph.macs(widths)}
    assert complexity(model) == {"params": graph.params(graph.widths()), "macs": graph.macs(graph.widths())}
    # Conv -> conv MACs quarter; per-channel convs (a large share of "grouped") and the stem only halve.
    assert complexity(narrow)["macs"] < (0.4 if name == "grouped" else 0.35) * complexity(model)["macs"]


def test_own_model_groups_and_keras_round_trip(tmp_path):
    """The couplings a user's model needs, and the sliced model saves and loads as .keras."""
    model = own_model()
    graph = ChannelGraph(model)
    writers = {n: sorted(op.name for op in g.producers) for n, g in graph.prunable().items()}
    # The residual stream: stem, the nested block's projection (x + y) and SE's expand (Multiply).
    assert sorted(writers.values()) == [["expand"], ["project", "se_expand", "stem"], ["se_reduce"], ["side"]]
    assert graph.boundaries == []
    keep = {n: [0, 2] for n in graph.prunable()}
    narrow = slice_channels(model, keep, graph)
    assert narrow.get_layer("head").kernel.shape == (2 * 2 * (2 + 2), 5)  # Flatten rows follow the concat
    path = str(tmp_path / "narrow.keras")
    narrow.save(path)
    x = np.random.default_rng(1).normal(size=(2, 8, 8, 3)).astype("float32")
    np.testing.assert_array_equal(keras.models.load_model(path)(x).numpy(), narrow(x).numpy())


def test_grouped_convolutions_cut_their_groups_into_blocks(tmp_path):
    """A grouped conv ties the same in-block index across its groups (input channels and filters):
    the residual stream read by a 2-group conv prunes in 2 blocks, the ResNeXt branch in 4; pruning
    keeps every group equally wide and a per-channel grouped conv one group per kept channel. The
    pruned model and the gated one (tiled gates) save and load as .keras."""
    model = grouped_model()
    graph = ChannelGraph(model)
    blocks = {n: (g.channels, g.blocks) for n, g in graph.prunable().items()}
    assert blocks == {"stem": (4, 2), "reduce": (2, 4), "grouped": (2, 4), "pw": (6, 1)}
    assert graph.boundaries == []
    keep = {"stem": [1, 3], "reduce": [0], "grouped": [1], "pw": [0, 4]}
    narrow = slice_channels(model, keep, graph)
    assert narrow.get_layer("grouped").kernel.shape == (3, 3, 1, 4) and narrow.get_layer("grouped").groups == 4
    assert narrow.get_layer("g2").kernel.shape == (1, 1, 2, 4)
    assert narrow.get_layer("dw2").kernel.shape == (3, 3, 4, 2) and narrow.get_layer("pw").kernel.shape[-2] == 8
    assert narrow.get_layer("per_channel").kernel.shape == (3, 3, 1, 4) and narrow.get_layer("per_channel").groups == 2
    x = np.random.default_rng(1).normal(size=(2, 8, 8, 3)).astype("float32")
    gated, gates = insert_gates(model, graph)
    set_masks(gates, keep)
    for name, built in (("narrow", narrow), ("gated", gated)):
        path = str(tmp_path / f"{name}.keras")
        built.save(path)
        np.testing.assert_array_equal(keras.models.load_model(path)(x).numpy(), built(x).numpy())


def _summary(graph, group):
    """Members of `group` by kind, counted by layer, as in the Torch-Pruning golden."""
    kinds = collections.Counter()
    for roles in _roles(graph, group).values():
        for role in roles:
            kinds[role] += 1
    return tuple(sorted((k, v) for k, v in kinds.items()))


def _roles(graph, group):
    roles = collections.defaultdict(set)
    for s in group.slots:
        layer = s.layer
        if isinstance(layer, L.BatchNormalization):
            roles[id(layer)].add("bn")
        elif isinstance(layer, L.DepthwiseConv2D):
            roles[id(layer)].add("depthwise")
        elif s.variable is getattr(layer, "kernel", None):
            kind = "linear" if isinstance(layer, L.Dense) else "conv"
            roles[id(layer)].add(f"{kind}_out" if s.axis == len(s.variable.shape) - 1 else f"{kind}_in")
    return roles


@pytest.mark.parametrize("arch", ["resnet50", "mobilenet_v2", "densenet121"])
def test_groups_match_torch_pruning(arch):
    """Number of prunable groups, their channel counts and their members by kind equal Torch-Pruning's
    DependencyGraph on torchvision's version of the architecture (tests/golden, made by
    tests/conformance/make_depgraph_golden.py). Keras's ResNet50 gives its convs biases and strides
    its first 1x1 conv instead of the 3x3 (v1 vs torchvision's v1.5): the groups are the same."""
    with open(GOLDEN) as f:
        golden = json.load(f)["models"][arch]
    kinds = ("bn", "conv_in", "conv_out", "depthwise", "linear_in", "linear_out")
    expected = collections.Counter(
        (g["channels"], tuple(sorted((k, v) for k, v in g["summary"].items() if v and k in kinds)))
        for g in golden["groups"]
    )
    graph = ChannelGraph(APPS[arch](input_shape=(32, 32, 3), classes=10))
    found = collections.Counter((g.channels, _summary(graph, g)) for g in graph.prunable().values())
    assert golden["num_groups"] == len(graph.prunable())
    assert found == expected


@pytest.mark.parametrize("arch", [a for a in available_archs() if a.startswith("resnet")])
def test_graph_finds_the_groups_builders_name(arch):
    """ke_tf's builders name groups with `channel_group` tags; the graph partitions channels on its
    own: every group's writers carry exactly one tag and no tag spans two groups."""
    model = build_model(
        arch, 10, (32, 32, 3), **({} if arch in ("resnet18", "resnet34", "resnet50") else {"shortcut": "B"})
    )
    graph = ChannelGraph(model)
    tags = {}
    for name, group in graph.prunable().items():
        group_tags = {op.channel_group for op in group.producers}
        assert group_tags == {name}, f"{name}: writers tagged {group_tags}"
        tags[name] = tags.get(name, 0) + 1
    assert all(count == 1 for count in tags.values())
    assert len(graph.prunable()) == len({op.channel_group for op in model.layers if getattr(op, "channel_group", None)})


def test_unknown_layer_is_a_reported_boundary_and_strict_raises():
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(4, 3, name="first")(inputs)
    x = L.Lambda(lambda t: t * 2.0, name="doubling")(x)
    x = L.Conv2D(4, 3, name="second")(x)
    model = keras.Model(inputs, L.Dense(2, name="out")(L.GlobalAveragePooling2D()(x)))
    graph = ChannelGraph(model)
    assert [b[0] for b in graph.boundaries] == ["doubling"]
    assert graph.groups["first"].kept_by == ["boundary doubling"]
    assert graph.groups["second"].prunable
    assert graph.report()["boundaries"][0]["layer"] == "doubling"
    with pytest.raises(UnsupportedLayerError, match="'doubling'"):
        ChannelGraph(model, strict=True)
    with pytest.raises(ValueError, match="'first' cannot be pruned: kept by boundary doubling"):
        slice_channels(model, {"first": [0]})


def test_layer_normalization_over_channels_prunes_and_normalises_over_the_kept_channels():
    """LayerNormalization over the channel axis prunes with the conv before it (gamma and beta
    sliced) and is listed as inexact: the sliced net normalises over the kept channels only, checked
    here against numpy (float64). Over more than the channel axis it is a boundary."""
    rng = np.random.default_rng(3)
    with float64():
        inputs = keras.Input((6, 6, 3), dtype="float64")  # the numpy reference reads x unrounded
        conv, ln, head = L.Conv2D(8, 3, name="conv"), L.LayerNormalization(name="ln"), L.Conv2D(2, 1, name="head")
        model = keras.Model(inputs, head(ln(conv(inputs))))
        randomise_statistics(model, seed=4)
        ln.gamma.assign(rng.uniform(0.5, 1.5, 8))
        graph = ChannelGraph(model)
        assert graph.groups["conv"].prunable and [name for name, _ in graph.inexact] == ["ln"]
        keep = np.array([0, 2, 5, 7])
        narrow = slice_channels(model, {"conv": keep}, graph)
        x = rng.normal(size=(2, 6, 6, 3))
        h = keras.ops.convert_to_numpy(conv(x))[..., keep]
        normalised = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + ln.epsilon)
        expected = (normalised * ln.gamma.numpy()[keep] + ln.beta.numpy()[keep]) @ head.kernel.numpy()[0, 0][keep]
        assert_identical(narrow(x), expected + head.bias.numpy())
        widths = graph.widths({"conv": keep})
        assert complexity(narrow) == {"params": graph.params(widths), "macs": graph.macs(widths)}
        spatial = L.LayerNormalization(axis=(1, 2, 3), name="spatial_ln")(L.Conv2D(4, 3, name="c")(inputs))
        wide = ChannelGraph(keras.Model(inputs, L.Conv2D(2, 1)(spatial)))
    assert not wide.groups["c"].prunable and wide.boundaries[0][0] == "spatial_ln"


def test_subclassed_model_is_refused_with_how_to_fix():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.conv = L.Conv2D(2, 3)

        def call(self, x):
            return self.conv(x)

    with pytest.raises(ValueError, match="build it functionally"):
        ChannelGraph(Net())
