"""Example invocations of the Call allowlist:
Fourier transforms, convolutions, pooling and resampling."""

from __future__ import annotations

from support.function_cases.arrays import Case, complexes, randn


def cases() -> list[Case]:
    """The cases, made when called: the arrays come from one shared generator, drawn in
    the order support.function_cases calls the families."""
    return [
        # Fourier transforms.
        ("fft.fft", (randn(8),), {}),
        ("fft.fft", (complexes(2, 8),), {"n": 16, "norm": "ortho"}),
        ("fft.ifft", (complexes(8),), {}),
        ("fft.rfft", (randn(3, 8),), {"dim": -1}),
        ("fft.irfft", (complexes(5),), {"n": 8}),
        ("fft.hfft", (complexes(5),), {"n": 8}),
        ("fft.ihfft", (randn(8),), {}),
        ("fft.fft2", (randn(4, 6),), {}),
        ("fft.ifft2", (complexes(4, 6),), {}),
        ("fft.rfft2", (randn(4, 6),), {}),
        ("fft.irfft2", (complexes(4, 4),), {"s": (4, 6)}),
        ("fft.fftn", (randn(2, 4, 6),), {"dim": (1, 2)}),
        ("fft.ifftn", (complexes(2, 4, 6),), {}),
        ("fft.rfftn", (randn(2, 4, 6),), {}),
        ("fft.irfftn", (complexes(2, 4, 4),), {"s": (2, 4, 6)}),
        ("fft.fftshift", (randn(8),), {}),
        ("fft.fftshift", (randn(3, 5),), {"dim": (0, 1)}),
        ("fft.ifftshift", (randn(3, 5),), {"dim": 1}),
        # Convolutions, pooling and resampling.
        ("conv1d", (randn(2, 3, 10), randn(4, 3, 3)), {"padding": 1}),
        ("conv1d", (randn(2, 3, 10), randn(4, 3, 3), randn(4)), {"stride": 2}),
        ("conv2d", (randn(2, 3, 8, 8), randn(4, 3, 3, 3), randn(4)), {"padding": 1}),
        ("conv2d", (randn(1, 4, 6, 6), randn(4, 2, 3, 3)), {"padding": "same", "groups": 2}),
        ("conv3d", (randn(1, 2, 5, 5, 5), randn(3, 2, 3, 3, 3)), {}),
        ("conv_transpose1d", (randn(2, 3, 6), randn(3, 4, 3)), {"stride": 2}),
        (
            "conv_transpose2d",
            (randn(1, 3, 4, 4), randn(3, 2, 3, 3), randn(2)),
            {"stride": 2, "padding": 1, "output_padding": 1},
        ),
        ("conv_transpose3d", (randn(1, 2, 3, 3, 3), randn(2, 2, 2, 2, 2)), {}),
        ("nn.functional.max_pool1d", (randn(2, 3, 10), 2), {}),
        ("nn.functional.max_pool2d", (randn(1, 2, 6, 6), 2), {}),
        ("nn.functional.max_pool2d", (randn(1, 2, 6, 6), 3), {"stride": 2, "return_indices": True}),
        ("nn.functional.avg_pool1d", (randn(2, 3, 10),), {"kernel_size": 3, "stride": 2}),
        ("nn.functional.avg_pool2d", (randn(1, 2, 6, 6), 3), {"stride": 1, "padding": 1}),
        (
            "nn.functional.interpolate",
            (randn(1, 2, 4, 4),),
            {"scale_factor": 2.0, "mode": "bilinear", "align_corners": False},
        ),
        ("nn.functional.interpolate", (randn(1, 2, 5),), {"size": 8, "mode": "linear"}),
        ("nn.functional.interpolate", (randn(1, 1, 3, 3),), {"size": (4, 5)}),
        ("nn.functional.pad", (randn(1, 2, 3, 3), (1, 1, 2, 0)), {}),
        ("nn.functional.pad", (randn(1, 2, 3, 3), (1, 2)), {"value": 0.5}),
        ("nn.functional.pad", (randn(1, 2, 4, 4), (1, 1, 1, 1)), {"mode": "reflect"}),
    ]
