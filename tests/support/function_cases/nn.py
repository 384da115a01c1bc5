"""Example invocations of the Call allowlist:
Neural-network layers, activations and losses."""

from __future__ import annotations

import numpy as np

from support.function_cases.arrays import Case, bools, ints, pos, probs, randn, uniform


def cases() -> list[Case]:
    """The cases, made when called: the arrays come from one shared generator, drawn in
    the order support.function_cases calls the families."""
    return [
        # Neural-network layers, activations and losses.
        ("softmax", (randn(3, 5), 1), {}),
        ("softmax", (randn(3, 5).astype(np.float32),), {"dim": 0, "dtype": "float64"}),
        ("log_softmax", (randn(3, 5),), {"dim": -1}),
        ("nn.functional.relu", (randn(3, 4),), {}),
        ("nn.functional.leaky_relu", (randn(3, 4), 0.2), {}),
        ("nn.functional.elu", (randn(3, 4),), {"alpha": 0.5}),
        ("nn.functional.gelu", (randn(3, 4),), {}),
        ("nn.functional.gelu", (randn(3, 4),), {"approximate": "tanh"}),
        ("nn.functional.silu", (randn(3, 4),), {}),
        ("nn.functional.softplus", (randn(3, 4),), {"beta": 2.0}),
        ("nn.functional.logsigmoid", (randn(3, 4),), {}),
        ("nn.functional.glu", (randn(3, 6),), {"dim": -1}),
        ("nn.functional.linear", (randn(3, 4), randn(5, 4), randn(5)), {}),
        ("nn.functional.layer_norm", (randn(2, 3, 4), (4,), randn(4), randn(4)), {}),
        ("nn.functional.group_norm", (randn(2, 4, 3), 2), {}),
        ("nn.functional.normalize", (randn(3, 4),), {"dim": 1}),
        (
            "nn.functional.scaled_dot_product_attention",
            (randn(2, 3, 4, 8), randn(2, 3, 5, 8), randn(2, 3, 5, 8)),
            {},
        ),
        (
            "nn.functional.scaled_dot_product_attention",
            (randn(1, 2, 4, 8), randn(1, 2, 4, 8), randn(1, 2, 4, 8)),
            {"is_causal": True, "scale": 0.5},
        ),
        (
            "nn.functional.scaled_dot_product_attention",
            (
                randn(1, 2, 4, 8),
                randn(1, 2, 5, 8),
                randn(1, 2, 5, 8),
                bools(4, 5) | np.eye(4, 5, dtype=bool),
            ),
            {},
        ),
        ("nn.functional.mse_loss", (randn(3, 4), randn(3, 4)), {}),
        ("nn.functional.mse_loss", (randn(3, 4), randn(3, 4)), {"reduction": "none"}),
        ("nn.functional.l1_loss", (randn(3, 4), randn(3, 4)), {"reduction": "sum"}),
        ("nn.functional.smooth_l1_loss", (randn(3, 4), randn(3, 4)), {"beta": 0.5}),
        ("nn.functional.huber_loss", (randn(3, 4), randn(3, 4)), {"delta": 0.5}),
        ("nn.functional.cross_entropy", (randn(4, 5), ints(0, 5, 4)), {}),
        (
            "nn.functional.cross_entropy",
            (randn(4, 5), np.array([0, -100, 4, 2])),
            {"weight": pos(5), "label_smoothing": 0.1},
        ),
        ("nn.functional.cross_entropy", (randn(2, 5, 3), ints(0, 5, 2, 3)), {"reduction": "none"}),
        ("nn.functional.cross_entropy", (randn(4, 5), probs(4, 5)), {}),
        ("nn.functional.nll_loss", (randn(4, 5), ints(0, 5, 4)), {}),
        ("nn.functional.nll_loss", (randn(4, 5), np.array([1, 3, 3, 0])), {"ignore_index": 3}),
        ("nn.functional.binary_cross_entropy_with_logits", (randn(6), uniform(0, 1, 6)), {}),
        ("nn.functional.kl_div", (np.log(probs(3, 4)), probs(3, 4)), {"reduction": "batchmean"}),
        ("nn.functional.pairwise_distance", (randn(3, 4), randn(3, 4)), {}),
    ]
