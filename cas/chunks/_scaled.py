"""Scaled difference deltas of fp32 elements: the base times a factor, then the difference.

Some state decays by a known factor between two checkpoints: Adam's second
moment ``exp_avg_sq`` is multiplied by ``beta2`` at every step, 0.999**20 =
0.980 over 20 steps, and only then grows by the new squared gradients.
Most of its elements move by that factor alone, so their plain difference
from the base is as large as 2 % of the value, where the difference from
the base times 0.980 is only what the new gradients added. On a real
training run this stores ``exp_avg_sq`` 2.6 % smaller than the plain
difference (docs/performance.md, "torch.save files, and a training run").

The factor is chosen by the writer, per chunk, and recorded in it (codec 5,
docs/format.md). The prediction of an element is the binary32 product of
its base element and the factor, rounded to nearest, for base elements
whose exponent field is 2 to 253; any other base element (zero,
subnormal, the smallest normals, the largest, infinity, NaN) is its own
prediction. With the factor in [0.5, 2) the products of those elements are
normal and finite: no subnormal goes in or comes out, so a process that
flushes subnormals to zero computes the same predictions as one that does
not. The difference from the prediction is then coded as codec 4 codes a
difference (:func:`cas.chunks._floatcodec.difference`): any bits round-trip.
"""

from __future__ import annotations

import math
import struct
from typing import Any

from . import _floatcodec as floatcodec

#: The factor as it is stored: a little-endian binary32.
SCALE = struct.Struct("<f")
#: The factors a chunk may record: [LOW, HIGH).
LOW, HIGH = 0.5, 2.0
# The exponent field of a binary32, and the lowest and highest words (with
# that field 2 and 253, the rest zero) of the elements that are scaled.
_EXPONENT, _LOWEST, _HIGHEST = 0x7F800000, 0x01000000, 0x7E800000
# Elements of the strided sample on which candidate factors are tried.
_SAMPLE = 4096
# Candidate factors: these percentiles of the ratios of the sample's elements
# to their base elements. Decay by a factor leaves most ratios at the factor
# itself and the rest above it, so the low percentiles find it.
_PERCENTILES = (0.0, 1.0, 5.0)
# A candidate is tried when this share of the sample's elements are within
# this fraction of it: in exp_avg_sq 13 to 26 % within 1 % of its decay; in
# weights and exp_avg, whose ratios spread out, 0.5 % at most.
_SHARE, _NEAR = 0.02, 0.01


def valid(scale: float) -> bool:
    """Whether ``scale`` may be a chunk's factor."""
    return math.isfinite(scale) and LOW <= scale < HIGH


def predict(base: bytes | bytearray | memoryview, scale: float) -> Any:
    """The predictions of the elements from ``base`` (fp32 bytes) and ``scale``: a new array."""
    import numpy as np  # numpy on first use, as in floatcodec

    if not valid(scale):
        raise ValueError(f"scale {scale!r} is outside [{LOW}, {HIGH})")
    words = np.frombuffer(memoryview(base).cast("B"), dtype="<u4")
    # Exponent fields 0 and 1 wrap round to the largest words: one comparison.
    exponent = words & np.uint32(_EXPONENT)
    exponent -= np.uint32(_LOWEST)
    kept = exponent > np.uint32(_HIGHEST - _LOWEST)
    # Every product, then the base back where it is its own prediction: faster
    # than a masked multiply. The products thrown away may overflow; no flag
    # they raise matters.
    with np.errstate(all="ignore"):
        out = np.multiply(words.view("<f4"), np.float32(scale)).view("<u4")
    np.copyto(out, words, where=kept)
    return out


def difference(
    data: bytes | bytearray | memoryview, base: bytes | bytearray | memoryview, scale: float
) -> memoryview:
    """The zigzag-coded difference of the fp32 elements of ``data`` from their predictions."""
    return floatcodec.difference(data, predict(base, scale), 4)


def undo_difference(
    coded: bytes | bytearray | memoryview, base: bytes | bytearray | memoryview, scale: float
) -> memoryview:
    """The elements :func:`difference` was given, from its result, the base and the factor."""
    return floatcodec.undo_difference(coded, predict(base, scale), 4)


def choose(data: memoryview, base: bytes | bytearray | memoryview) -> float:
    """The factor that codes ``data`` smallest against ``base``, judged on a sample; 1.0 for none.

    Candidates are low percentiles of the sample's ratios (see
    ``_PERCENTILES``) that many elements moved by, and 1.0, a plain
    difference; each is tried by coding the sample's difference as the
    chunk would be coded. The cost is a few codings of 16 KiB per chunk
    where a factor may pay, next to nothing elsewhere.
    """
    import numpy as np

    new = np.frombuffer(data, dtype="<u4")
    old = np.frombuffer(memoryview(base).cast("B"), dtype="<u4")
    step = max(1, len(new) // _SAMPLE)
    new, old = np.ascontiguousarray(new[::step]), np.ascontiguousarray(old[::step])
    with np.errstate(all="ignore"):
        ratios = new.view("<f4").astype(np.float64) / old.view("<f4")
    ratios = ratios[(ratios >= LOW) & (ratios < HIGH)]
    candidates = {1.0}
    if len(ratios):
        for value in np.percentile(ratios, _PERCENTILES):
            scale = float(np.float32(value))
            # Tried only when enough elements moved by about that factor:
            # not for ratios spread out, as they are where nothing decays.
            near = np.count_nonzero(np.abs(ratios - scale) < _NEAR * scale)
            if valid(scale) and near >= _SHARE * len(new):
                candidates.add(scale)
    if len(candidates) == 1:
        return 1.0

    def size(scale: float) -> int:
        if scale == 1.0:
            coded = floatcodec.difference(new.data, old.data, 4)
        else:
            coded = difference(new.data, old.data, scale)
        return len(floatcodec.encode(coded, 4, floatcodec.Layout.PLAIN))

    # Ties go to 1.0 (a plain difference, codec 4), then to the smaller factor.
    return min(sorted(candidates), key=lambda s: (size(s), s != 1.0))
