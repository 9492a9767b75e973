"""How a tensor chunk is stored: byte-grouped whole, or as a delta of a base chunk.

The put's writer (:mod:`cas.tensors._writer`) and repacking (:mod:`cas.gc._repack`)
decide alike: a delta is kept only when it saves enough to pay for the read
of its base that every read of it costs.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..chunks import _codec as codec
from ..chunks import _scaled as scaled
from ..chunks._floatcodec import LAYOUT_ITEMSIZE, Layout

# Chunks up to twice this size are encoded whole to compare with their delta; for
# larger ones a sample of this size estimates the whole encoding.
_SAMPLE = 128 * 1024
#: A delta must beat the estimated whole encoding by this much: every read of
#: the chunk (and of each chunk based on it) then reads and decodes its base
#: as well, which a saving of a few percent does not pay for.
DELTA_GAIN = 0.9
#: When a chain's root is due for renewal, a delta against it is kept only
#: below this fraction of the chunk stored whole; past it the chunk is stored
#: whole, as the root of the chains that follow (:mod:`cas.tensors._writer`).
RENEWAL_GAIN = 0.25
#: Element sizes a difference delta handles; others are coded as an XOR.
_DIFFERENCE_ITEMSIZES = (2, 4, 8)


@dataclass(frozen=True, slots=True)
class Elements:
    """What a tensor chunk holds: its element size, and how its bytes are grouped."""

    itemsize: int
    layout: Layout

    @classmethod
    def of_blob(cls, blob: bytes) -> Elements | None:
        """The elements of a stored chunk, as its own header records them, when it does.

        A byte-grouped chunk (codec 2) names both; a delta names only the
        element size (its payload groups plainly), so it gives PLAIN.
        """
        if len(blob) < codec.HEADER.size + 2 or blob[:3] != codec.MAGIC:
            return None
        if blob[3] == codec.Codec.GROUPED:
            payload = codec.HEADER.size
        elif blob[3] in codec.DELTA_CODECS:
            payload = codec.HEADER.size + codec.BASE.size
            if blob[3] == codec.Codec.SCALED:
                payload += scaled.SCALE.size
            if len(blob) < payload + 2:
                return None
            return cls(blob[payload], Layout.PLAIN) if blob[payload] else None
        else:
            return None
        itemsize, layout_id = blob[payload], blob[payload + 1]
        try:
            layout = Layout(layout_id)
        except ValueError:
            return None
        if not itemsize or LAYOUT_ITEMSIZE.get(layout, itemsize) != itemsize:
            return None
        return cls(itemsize, layout)


@dataclass(frozen=True, slots=True)
class TensorCodec:
    """A store's way of coding tensor chunks: zstd level, FSE exponents, delta codec."""

    level: int = codec.DEFAULT_LEVEL
    fse: bool = False
    method: codec.Codec = codec.Codec.DELTA

    def grouped(self, view: memoryview, elements: Elements) -> bytes:
        return codec.encode_grouped(view, elements.itemsize, elements.layout, fse=self.fse)

    def delta_or_whole(
        self,
        view: memoryview,
        elements: Elements,
        base: bytes | memoryview,
        base_digest: bytes,
        gain: float = DELTA_GAIN,
    ) -> tuple[bytes, bool]:
        """The chunk as a delta of ``base`` when that pays, else whole; and which it is.

        The delta pays when it is under ``gain`` times the whole encoding.
        """
        itemsize = elements.itemsize
        method = self.method
        if method == codec.Codec.SCALED and elements.layout != Layout.FP32:
            method = codec.Codec.DIFFERENCE  # a factor is for fp32 elements only
        if itemsize not in _DIFFERENCE_ITEMSIZES:
            method = codec.Codec.DELTA
        delta = codec.encode_delta(view, base, base_digest, itemsize, method)
        whole = self._whole_if_smaller(view, elements, len(delta), gain)
        return (delta, True) if whole is None else (whole, False)

    def _whole_if_smaller(
        self, view: memoryview, elements: Elements, delta: int, gain: float
    ) -> bytes | None:
        """The whole (byte-grouped) encoding if ``gain`` times it is not above a delta
        of ``delta`` bytes, else None.

        A large chunk is judged on a sample, so that a delta that wins, the
        usual case, costs one encoding and not two.
        """
        size = elements.itemsize
        if len(view) > 2 * _SAMPLE:
            middle = (len(view) // 2) // size * size
            sample = view[middle : middle + _SAMPLE // size * size]
            ratio = len(self.grouped(sample, elements)) / len(sample)
            if delta < ratio * len(view) * gain:
                return None
            return self.grouped(view, elements)
        whole = self.grouped(view, elements)
        return None if delta < len(whole) * gain else whole
