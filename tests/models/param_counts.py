"""Closed-form parameter counts of every architecture kdpipe registers, written from the layer lists of the papers and
the CRD reference layout, independently of the model code: a model whose count differs is built differently.

Shorthands: a conv without bias is ``k*k*c_in*c_out / groups``; a BN layer is ``2*c`` (weight and bias; the running
statistics are buffers, not parameters); a linear head is ``c*classes + classes``.
"""

from __future__ import annotations

__all__ = ["ARCHITECTURE_PARAMS"]


def _head(chs: int, classes: int) -> int:
    return chs * classes + classes


def _resnet_params(depth: int, widths: tuple[int, int, int, int], classes: int = 100) -> int:
    """3x3 stem conv + BN, basic blocks (two 3x3 conv + BN, 1x1 conv + BN shortcut when the width changes), head."""
    n = (depth - 2) // 6
    total = 9 * 3 * widths[0] + 2 * widths[0]
    c_in = widths[0]
    for w in widths[1:]:
        for _ in range(n):
            total += 9 * c_in * w + 2 * w + 9 * w * w + 2 * w
            total += (c_in * w + 2 * w) if c_in != w else 0
            c_in = w
    return total + _head(c_in, classes)


def _resnet50_params(classes: int = 100) -> int:
    """3x3 stem conv to 64 + BN; bottlenecks 3-4-6-3 at widths 64..512 (1x1 + BN, 3x3 + BN, 1x1 to 4w + BN), the
    first of each stage with a 1x1 conv + BN shortcut; head on 2048 channels."""
    total = 9 * 3 * 64 + 2 * 64
    c_in = 64
    for n, w in ((3, 64), (4, 128), (6, 256), (3, 512)):
        for i in range(n):
            total += c_in * w + 2 * w + 9 * w * w + 2 * w + w * 4 * w + 2 * 4 * w
            total += (c_in * 4 * w + 2 * 4 * w) if i == 0 else 0
            c_in = 4 * w
    return total + _head(c_in, classes)


def _wrn_params(depth: int, k: int, classes: int = 100) -> int:
    """3x3 stem conv, pre-activation blocks (BN, 3x3 conv, BN, 3x3 conv, bias-free 1x1 shortcut when the width
    changes), final BN, head."""
    n = (depth - 4) // 6
    total = 9 * 3 * 16
    c_in = 16
    for w in (16 * k, 32 * k, 64 * k):
        for _ in range(n):
            total += 2 * c_in + 9 * c_in * w + 2 * w + 9 * w * w + (c_in * w if c_in != w else 0)
            c_in = w
    return total + 2 * c_in + _head(c_in, classes)


def _vgg_params(convs_per_block: tuple[int, ...], classes: int = 100) -> int:
    """Blocks of 3x3 convs *with bias* + BN at widths 64, 128, 256, 512, 512; head on 512 channels."""
    total, c_in = 0, 3
    for n, w in zip(convs_per_block, (64, 128, 256, 512, 512), strict=True):
        for _ in range(n):
            total += 9 * c_in * w + w + 2 * w
            c_in = w
    return total + _head(512, classes)


def _mobilenetv2_half_params(classes: int = 100) -> int:
    """Stem 3x3 conv to 16 + BN; per block 1x1 expand + BN, 3x3 depthwise + BN, 1x1 project + BN (the t=1 block
    keeps its 1x1 expand); 1x1 conv to 1280 + BN; head."""
    total = 9 * 3 * 16 + 2 * 16
    c_in = 16
    for t, c, n in ((1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3), (6, 160, 3), (6, 320, 1)):
        for _ in range(n):
            hidden = c_in * t
            total += c_in * hidden + 2 * hidden + 9 * hidden + 2 * hidden + hidden * (c // 2) + 2 * (c // 2)
            c_in = c // 2
    return total + c_in * 1280 + 2 * 1280 + _head(1280, classes)


def _shufflenet_v1_params(classes: int = 100) -> int:
    """1x1 stem conv to 24 + BN; g=3 bottlenecks (grouped 1x1 to a quarter width + BN, 3x3 depthwise + BN, grouped
    1x1 + BN); a stage's first block makes width - c_in channels (the avg-pooled input is concatenated), and the
    net's first block has a dense first 1x1; stages 240x4, 480x8, 960x4; head on 960."""
    g = 3
    total = 3 * 24 + 2 * 24
    c_in = 24
    for w, n in ((240, 4), (480, 8), (960, 4)):
        for i in range(n):
            out = w - c_in if i == 0 else w
            mid = out // 4
            total += c_in * mid // (1 if c_in == 24 else g) + 2 * mid + 9 * mid + 2 * mid + mid * out // g + 2 * out
            c_in = w
    return total + _head(960, classes)


def _shufflenet_v2_params(classes: int = 100) -> int:
    """1x1 stem conv to 24 + BN; per stage a down block (left: 3x3 depthwise + BN, 1x1 to w/2 + BN; right: 1x1 to
    w/2 + BN, 3x3 depthwise + BN, 1x1 + BN) and n basic blocks on half the channels (1x1 + BN, 3x3 depthwise + BN,
    1x1 + BN); stages 116/3, 232/7, 464/3; 1x1 conv to 1024 + BN; head on 1024."""
    total = 3 * 24 + 2 * 24
    c_in = 24
    for w, n in ((116, 3), (232, 7), (464, 3)):
        m = w // 2
        total += 9 * c_in + 2 * c_in + c_in * m + 2 * m  # left branch
        total += c_in * m + 2 * m + 9 * m + 2 * m + m * m + 2 * m  # right branch
        total += n * (m * m + 2 * m + 9 * m + 2 * m + m * m + 2 * m)
        c_in = w
    return total + c_in * 1024 + 2 * 1024 + _head(1024, classes)


ARCHITECTURE_PARAMS = {
    **{f"resnet{d}": _resnet_params(d, (16, 16, 32, 64)) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": _resnet_params(8, (32, 64, 128, 256)),
    "resnet32x4": _resnet_params(32, (32, 64, 128, 256)),
    "resnet50_cifar": _resnet50_params(),
    **{f"wrn_{d}_{k}": _wrn_params(d, k) for d, k in ((16, 1), (16, 2), (16, 8), (40, 1), (40, 2))},
    "vgg8_cifar": _vgg_params((1, 1, 1, 1, 1)),
    "vgg11_cifar": _vgg_params((1, 1, 2, 2, 2)),
    "vgg13_cifar": _vgg_params((2, 2, 2, 2, 2)),
    "vgg16_cifar": _vgg_params((2, 2, 3, 3, 3)),
    "vgg19_cifar": _vgg_params((2, 2, 4, 4, 4)),
    "mobilenetv2_x0_5_cifar": _mobilenetv2_half_params(),
    "shufflenet_v1": _shufflenet_v1_params(),
    "shufflenet_v2": _shufflenet_v2_params(),
}
