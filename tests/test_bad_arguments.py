"""Every bijector rejects bad arguments with ValueError/TypeError naming them.

One table row per mistake: `id: (call, exception type, regex the message
must match)`. The regex names the argument (or the allowed values), so a
user reading the message knows what to change.
"""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp
from bijector_registry import small_multi_scale

from tfp_glow import bijectors as B
from tfp_glow import nets

tfb = tfp.bijectors
IMAGE = (4, 4, 4)


def zeros(*shape):
    return tf.zeros(shape, tf.float32)


def affine(mask="channel", parity=0, event_shape=IMAGE, net=None):
    c = event_shape[-1]
    out = 2 * (c // 2 if mask == "channel" else c)
    net = nets.GlowCouplingNet(4, out) if net is None else net
    return B.AffineCoupling(net, mask=mask, parity=parity, event_shape=event_shape)


def additive(**kwargs):
    return B.AdditiveCoupling(nets.GlowCouplingNet(4, 2), **kwargs)


CASES = {
    # --- coupling masks and parity
    "channel_mask_odd_channels_affine": (
        lambda: B.AffineCoupling(nets.GlowCouplingNet(4, 2), event_shape=(4, 4, 3)),
        ValueError,
        r"mask='channel' needs an even number of channels.*event_shape",
    ),
    "channel_mask_odd_channels_additive": (
        lambda: additive(event_shape=(4, 4, 3)),
        ValueError,
        r"even number of channels.*event_shape.*got 3",
    ),
    "channel_mask_odd_channels_at_call_time": (
        lambda: B.AdditiveCoupling(nets.GlowCouplingNet(4, 1)).forward(zeros(2, 4, 4, 3)),
        ValueError,
        r"even number of channels.*`x`",
    ),
    "unknown_mask_name": (
        lambda: affine(mask="stripes"),
        ValueError,
        r"`mask` must be one of \('channel', 'checkerboard'\); got 'stripes'",
    ),
    "parity_2": (lambda: affine(parity=2), ValueError, r"`parity` must be 0 or 1; got 2"),
    "parity_true": (
        lambda: affine(parity=True),
        TypeError,
        r"`parity` must be the int 0 or 1; got True",
    ),
    "parity_float": (
        lambda: additive(parity=1.0, event_shape=IMAGE),
        TypeError,
        r"`parity` must be the int",
    ),
    "parity_minus_1": (
        lambda: additive(parity=-1, event_shape=IMAGE),
        ValueError,
        r"`parity` must be 0 or 1",
    ),
    "coupling_event_shape_rank_2": (
        lambda: affine(event_shape=(4, 4)),
        ValueError,
        r"`event_ndims` must be 3 .* or 1",
    ),
    "coupling_event_ndims_2": (
        lambda: B.AffineCoupling(nets.GlowCouplingNet(4, 4), event_ndims=2),
        ValueError,
        r"`event_ndims` must be 3",
    ),
    "coupling_net_not_callable": (
        lambda: B.AffineCoupling(42, event_shape=IMAGE),
        TypeError,
        r"coupling network must be a callable.*got 42",
    ),
    "coupling_net_not_callable_additive": (
        lambda: B.AdditiveCoupling("conv", event_shape=IMAGE),
        TypeError,
        r"coupling network must be a callable.*'conv'",
    ),
    # --- Squeeze
    "squeeze_event_shape_not_divisible": (
        lambda: B.Squeeze(event_shape=(5, 4, 2)),
        ValueError,
        r"Squeeze\(factor=2\) needs height divisible by 2; `event_shape`",
    ),
    "squeeze_event_shape_width_not_divisible": (
        lambda: B.Squeeze(factor=3, event_shape=(6, 4, 2)),
        ValueError,
        r"needs width divisible by 3; `event_shape`",
    ),
    "squeeze_input_not_divisible_at_call_time": (
        lambda: B.Squeeze().forward(zeros(2, 5, 4, 2)),
        ValueError,
        r"needs height divisible by 2; `x` has shape \(2, 5, 4, 2\)",
    ),
    "squeeze_inverse_channels_not_divisible": (
        lambda: B.Squeeze().inverse(zeros(2, 2, 2, 6)),
        ValueError,
        r"Squeeze inverse needs channels divisible by 4; `y`",
    ),
    "squeeze_factor_1": (lambda: B.Squeeze(factor=1), ValueError, r"`factor` must be >= 2; got 1"),
    "squeeze_factor_float": (
        lambda: B.Squeeze(factor=2.0),
        ValueError,
        r"`factor` must be a positive int",
    ),
    "squeeze_event_shape_rank_2": (
        lambda: B.Squeeze(event_shape=(4, 4)),
        ValueError,
        r"`event_shape` must be an image",
    ),
    # --- wrong input rank
    "actnorm_rank_2_input": (
        lambda: B.ActNorm(4).forward(zeros(2, 4)),
        ValueError,
        r"`x` must have at least 3 dimensions",
    ),
    "actnorm_initialize_rank_2_input": (
        lambda: B.ActNorm(4).initialize(zeros(2, 4)),
        ValueError,
        r"`x` must have at least 3 dimensions",
    ),
    "conv1x1_rank_2_input": (
        lambda: B.InvertibleConv1x1(4).forward(zeros(2, 4)),
        ValueError,
        r"`x` must have at least 3 dimensions",
    ),
    "conv1x1_rank_2_input_inverse": (
        lambda: B.InvertibleConv1x1(4).inverse(zeros(2, 4)),
        ValueError,
        r"`x` must have at least 3 dimensions",
    ),
    "coupling_rank_2_input": (
        lambda: affine().forward(zeros(2, 4)),
        ValueError,
        r"`x` must have at least 3 dimensions",
    ),
    "squeeze_rank_2_input": (
        lambda: B.Squeeze().forward(zeros(2, 4)),
        ValueError,
        r"`x` must have at least 3 dimensions",
    ),
    "factor_out_rank_2_input": (
        lambda: B.FactorOut(4).forward(zeros(2, 4)),
        ValueError,
        r"`x` must have at least 3 dimensions",
    ),
    "learned_prior_rank_2_input": (
        lambda: B.LearnedPrior(IMAGE).forward(zeros(2, 4)),
        ValueError,
        r"`x` must end in the event shape \(4, 4, 4\)",
    ),
    # --- wrong channel count at call time
    "actnorm_wrong_channels": (
        lambda: B.ActNorm(4).forward(zeros(2, 4, 4, 3)),
        ValueError,
        r"`x` must have 4 channels",
    ),
    "actnorm_initialize_wrong_channels": (
        lambda: B.ActNorm(4).initialize(zeros(2, 4, 4, 3)),
        ValueError,
        r"`x` must have 4 channels",
    ),
    "actnorm_vector_wrong_channels": (
        lambda: B.ActNorm(4, event_ndims=1).forward(zeros(2, 5)),
        ValueError,
        r"`x` must have 4 channels",
    ),
    "conv1x1_wrong_channels": (
        lambda: B.InvertibleConv1x1(4).forward(zeros(2, 4, 4, 6)),
        ValueError,
        r"`x` must have 4 channels",
    ),
    "coupling_channel_mask_wrong_channels": (
        lambda: affine().forward(zeros(2, 4, 4, 6)),
        ValueError,
        r"`x` must have 4 channels",
    ),
    "coupling_checkerboard_wrong_channels": (
        lambda: affine(mask="checkerboard").inverse(zeros(2, 4, 4, 2)),
        ValueError,
        r"`x` must have 4 channels",
    ),
    "factor_out_wrong_channels": (
        lambda: B.FactorOut(4).forward(zeros(2, 4, 4, 6)),
        ValueError,
        r"`x` must have 4 channels",
    ),
    "learned_prior_wrong_channels": (
        lambda: B.LearnedPrior(IMAGE).inverse(zeros(2, 4, 4, 6)),
        ValueError,
        r"`x` must end in the event shape \(4, 4, 4\)",
    ),
    # --- ActNorm / conv constructor arguments
    "actnorm_channels_0": (
        lambda: B.ActNorm(0),
        ValueError,
        r"`channels` must be a positive int; got 0",
    ),
    "actnorm_channels_2_5": (
        lambda: B.ActNorm(2.5),
        ValueError,
        r"`channels` must be a positive int; got 2\.5",
    ),
    "actnorm_channels_bool": (
        lambda: B.ActNorm(True),
        ValueError,
        r"`channels` must be a positive int",
    ),
    "actnorm_event_ndims_2": (
        lambda: B.ActNorm(4, event_ndims=2),
        ValueError,
        r"`event_ndims` must be 3 \(images \[H, W, C\]\) or 1 \(vectors \[D\]\); got 2",
    ),
    "conv1x1_event_ndims_2": (
        lambda: B.InvertibleConv1x1(4, event_ndims=2),
        ValueError,
        r"`event_ndims` must be 3",
    ),
    "conv1x1_channels_negative": (
        lambda: B.InvertibleConv1x1(-3),
        ValueError,
        r"`channels` must be a positive int",
    ),
    "conv1x1_lu_yes": (
        lambda: B.InvertibleConv1x1(4, lu="yes"),
        TypeError,
        r"`lu` must be a bool; got 'yes'",
    ),
    "conv1x1_lu_1": (lambda: B.InvertibleConv1x1(4, lu=1), TypeError, r"`lu` must be a bool"),
    # --- LogitPreprocess
    "logit_alpha_0_7": (
        lambda: B.LogitPreprocess(alpha=0.7),
        ValueError,
        r"`alpha` must be in \[0, 0\.5\); got 0\.7",
    ),
    "logit_alpha_string": (
        lambda: B.LogitPreprocess(alpha="a"),
        TypeError,
        r"`alpha` must be a float in \[0, 0\.5\); got 'a'",
    ),
    "logit_alpha_0_5": (
        lambda: B.LogitPreprocess(alpha=0.5),
        ValueError,
        r"`alpha` must be in \[0, 0\.5\)",
    ),
    "logit_alpha_negative": (
        lambda: B.LogitPreprocess(alpha=-0.1),
        ValueError,
        r"`alpha` must be in \[0, 0\.5\)",
    ),
    # --- FactorOut / LearnedPrior
    "factor_out_split_fraction_0": (
        lambda: B.FactorOut(4, split_fraction=0),
        ValueError,
        r"`split_fraction` must be in \(0, 1\); got 0",
    ),
    "factor_out_split_fraction_1": (
        lambda: B.FactorOut(4, split_fraction=1),
        ValueError,
        r"`split_fraction` must be in \(0, 1\); got 1",
    ),
    "factor_out_split_fraction_0_1_of_4": (
        lambda: B.FactorOut(4, split_fraction=0.1),
        ValueError,
        r"`split_fraction`=0\.1 of 4 channels leaves nothing on one side",
    ),
    "factor_out_split_fraction_0_9_of_4": (
        lambda: B.FactorOut(4, split_fraction=0.9),
        ValueError,
        r"`split_fraction`=0\.9 of 4 channels",
    ),
    "factor_out_num_classes_0": (
        lambda: B.FactorOut(4, num_classes=0),
        ValueError,
        r"`num_classes` must be a positive int",
    ),
    "factor_out_event_ndims_2": (
        lambda: B.FactorOut(4, event_ndims=2),
        ValueError,
        r"`event_ndims` must be 3",
    ),
    "factor_out_conditional_without_conditional_input": (
        lambda: B.FactorOut(4, num_classes=3).forward(zeros(2, 4, 4, 4)),
        ValueError,
        r"num_classes=3.*`conditional_input`",
    ),
    "factor_out_conditional_inverse_without_conditional_input": (
        lambda: B.FactorOut(4, num_classes=3).inverse(zeros(2, 4, 4, 4)),
        ValueError,
        r"`conditional_input`",
    ),
    "learned_prior_conditional_without_conditional_input": (
        lambda: B.LearnedPrior(IMAGE, num_classes=3).forward(zeros(2, 4, 4, 4)),
        ValueError,
        r"num_classes=3.*`conditional_input`",
    ),
    "learned_prior_conditional_inverse_without_conditional_input": (
        lambda: B.LearnedPrior(IMAGE, num_classes=3).inverse(zeros(2, 4, 4, 4)),
        ValueError,
        r"`conditional_input`",
    ),
    "learned_prior_conditional_input_bad_rank": (
        lambda: B.LearnedPrior(IMAGE, num_classes=3).forward(
            zeros(2, 4, 4, 4), conditional_input=tf.zeros([2, 1], tf.int32)
        ),
        ValueError,
        r"Integer `conditional_input` labels must have shape \[batch\]",
    ),
    "learned_prior_conditional_input_wrong_one_hot_width": (
        lambda: B.LearnedPrior(IMAGE, num_classes=3).forward(
            zeros(2, 4, 4, 4), conditional_input=tf.zeros([2, 5])
        ),
        ValueError,
        r"One-hot `conditional_input` must have shape \[batch, 3\]",
    ),
    "learned_prior_event_ndims_2": (
        lambda: B.LearnedPrior((4, 4)),
        ValueError,
        r"`event_ndims` must be 3",
    ),
    # --- permutations
    "channel_permutation_unknown_kind": (
        lambda: B.channel_permutation("zigzag", 4),
        ValueError,
        r"`kind` must be one of \('reverse', 'shuffle'\); got 'zigzag'",
    ),
    "channel_permutation_channels_0": (
        lambda: B.channel_permutation("reverse", 0),
        ValueError,
        r"`channels` must be a positive int",
    ),
    # --- MultiScaleFlow
    "multi_scale_latent_too_small_to_inverse": (
        lambda: small_multi_scale(tf.float32).inverse(zeros(2, 31)),
        ValueError,
        r"latent must have shape \[batch, 32\]; got \(2, 31\)",
    ),
    "multi_scale_latent_too_big_to_inverse": (
        lambda: small_multi_scale(tf.float32).inverse(zeros(2, 33)),
        ValueError,
        r"latent must have shape \[batch, 32\]",
    ),
    "multi_scale_wrong_input_shape": (
        lambda: small_multi_scale(tf.float32).forward(zeros(2, 4, 4, 3)),
        ValueError,
        r"`x` must have shape \[batch, 4, 4, 2\]",
    ),
    "multi_scale_no_levels": (
        lambda: B.MultiScaleFlow((4, 4, 2), []),
        ValueError,
        r"`levels` must contain at least one",
    ),
    "multi_scale_factor_out_wrong_channels": (
        lambda: B.MultiScaleFlow((4, 4, 2), [(B.Squeeze(), B.FactorOut(4))]),
        ValueError,
        r"FactorOut expects 4 channels.*\(2, 2, 8\)",
    ),
    "multi_scale_factor_out_wrong_type": (
        lambda: B.MultiScaleFlow((4, 4, 2), [(B.Squeeze(), B.ActNorm(8))]),
        TypeError,
        r"factor_out must be a FactorOut",
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_raises_on_invalid_argument(name):
    call, error, pattern = CASES[name]
    with pytest.raises(error, match=pattern):
        call()


TRACED_CASES = {
    "actnorm_rank_2_input": (
        lambda: B.ActNorm(4),
        [None, 4],
        r"`x` must have at least 3 dimensions",
    ),
    "conv1x1_wrong_channels": (
        lambda: B.InvertibleConv1x1(4),
        [None, 4, 4, 6],
        r"`x` must have 4 channels",
    ),
    "coupling_channel_mask_wrong_channels": (affine, [None, 4, 4, 6], r"`x` must have 4 channels"),
    "squeeze_input_not_divisible": (
        lambda: B.Squeeze(),
        [None, 5, 4, 2],
        r"needs height divisible by 2; `x`",
    ),
}


@pytest.mark.parametrize("name", sorted(TRACED_CASES))
def test_raises_on_invalid_input_shape_inside_tf_function(name):
    """Static shape checks also fire while tracing with an unknown batch."""
    make, shape, pattern = TRACED_CASES[name]
    fn = tf.function(make().forward, input_signature=[tf.TensorSpec(shape, tf.float32)])
    with pytest.raises(ValueError, match=pattern):
        fn.get_concrete_function()


def test_valid_arguments_of_the_table_pass():
    """The same constructors with valid values build fine (the table is not vacuous)."""
    affine(event_shape=(4, 4, 4))
    affine(mask="checkerboard", parity=1, event_shape=(4, 4, 3))
    B.Squeeze(event_shape=(4, 6, 2))
    B.ActNorm(1, event_ndims=1)
    B.InvertibleConv1x1(4, lu=False)
    B.LogitPreprocess(alpha=0.0)
    assert B.FactorOut(4, split_fraction=0.25).num_factored == 1
    assert B.FactorOut(4, split_fraction=0.75).num_factored == 3
    y = B.FactorOut(4, num_classes=3).forward(
        zeros(2, 4, 4, 4), conditional_input=tf.constant([0, 2])
    )
    assert y.shape == (2, 4, 4, 4)
    assert small_multi_scale(tf.float32).inverse(zeros(2, 32)).shape == (2, 4, 4, 2)
    np.testing.assert_array_equal(
        B.channel_permutation("reverse", 3).forward(tf.constant([[1.0, 2.0, 3.0]])),
        [[3.0, 2.0, 1.0]],
    )
