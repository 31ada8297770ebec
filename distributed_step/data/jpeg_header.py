"""Which files --decode device can hand to the device's JPEG decoder, from their first bytes.

The loader worker asks this of every file, so it reads markers only: the SOI marker, then each
segment's length up to the frame header (SOF), whose type, precision and component count say
what a decoder must support. nvjpeg (torchvision's CUDA decode_jpeg) takes 8-bit Huffman-coded
baseline / extended / progressive frames with 1 (grayscale: decoded to RGB by mode=RGB) or 3
(YCbCr) components. What it does not take is left to the worker, which decodes it exactly as
--decode workers would: files that are not JPEGs whatever their name (ImageNet has a PNG named
.JPEG), CMYK / YCCK JPEGs (4 components; ImageNet's train set has 22), 12-bit, lossless,
arithmetic-coded or hierarchical frames, and RGB-coded JPEGs (Adobe APP14 transform 0), whose
colours a decoder that assumes YCbCr would get wrong without raising. Anything malformed here is
left to the worker too, whose decoder names the file if it cannot read it either.
"""
from __future__ import annotations

from typing import NamedTuple

SOI = b"\xff\xd8"
# Frame headers: 0xC0-0xCF less DHT (C4), JPG (C8) and DAC (CC), which are not frames.
SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
DEVICE_FRAMES = frozenset({0xC0, 0xC1, 0xC2})  # baseline, extended and progressive Huffman
STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM and RSTn have no length field
ADOBE = 0xEE  # APP14, whose transform byte says how 3 components are coded (0: RGB, 1: YCbCr)


class Frame(NamedTuple):
    marker: int
    precision: int
    width: int
    height: int
    components: int
    adobe_transform: int | None  # None without an Adobe APP14 segment

    @property
    def device_decodable(self) -> bool:
        return (self.marker in DEVICE_FRAMES and self.precision == 8 and self.width > 0 and self.height > 0
                and (self.components == 1 or (self.components == 3 and self.adobe_transform != 0)))


def read_frame(data: bytes | bytearray) -> Frame | None:
    """The frame header of a JPEG held in `data`, or None: not a JPEG, or no readable SOF
    before the image data (the worker's decoder then decides)."""
    if data[:2] != SOI:
        return None
    pos, end, transform = 2, len(data), None
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # a fill byte before the marker
            pos += 1
            continue
        if marker in STANDALONE:
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker in SOF_MARKERS:  # precision, height, width, component count
            segment = data[pos + 4:pos + 10]
            if len(segment) < 6:
                return None
            return Frame(marker, segment[0], int.from_bytes(segment[3:5], "big"),
                         int.from_bytes(segment[1:3], "big"), segment[5], transform)
        if marker == ADOBE and length >= 14 and data[pos + 4:pos + 9] == b"Adobe":
            transform = data[pos + 15] if pos + 15 < end else None
        if marker in (0xD9, 0xDA) or length < 2:  # EOI / image data before any frame: malformed
            return None
        pos += 2 + length
    return None
