"""Pure mask utilities: geometry of a binary mask, its PNG encoding, and a compact packed form.

The callback's bbox/area/center are computed from the mask itself, so they always agree with the PNG
the app server downloads (SAM-2's own XYWH box is one pixel narrower: it uses inclusive max indices).
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image

BoolMask = npt.NDArray[np.bool_]

# zlib level 1: masks are long runs of 0/1 bits, so higher levels cost several times the CPU for a few
# percent smaller files.
PNG_COMPRESS_LEVEL = 1
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class MaskGeometry:
    x: int
    y: int
    width: int
    height: int
    area: int

    @property
    def center(self) -> tuple[int, int]:
        """The bbox centre as the contract defines it: x + width/2, y + height/2, floored."""
        return self.x + self.width // 2, self.y + self.height // 2


def mask_geometry(mask: BoolMask) -> MaskGeometry | None:
    """Tight bounding box (in pixels, width = last - first + 1) and pixel count; None for an empty mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    y0, y1 = int(rows[0]), int(rows[-1])
    x0, x1 = int(cols[0]), int(cols[-1])
    return MaskGeometry(x=x0, y=y0, width=x1 - x0 + 1, height=y1 - y0 + 1, area=int(np.count_nonzero(mask)))


def mask_filename(index: int) -> str:
    return f"mask_{index:03d}.png"


def encode_png(mask: BoolMask) -> bytes:
    """A 1-bit grayscale PNG of the mask (white = inside)."""
    return encode_packed_png(np.packbits(mask, axis=1), mask.shape[1])


def encode_packed_png(packed: npt.NDArray[np.uint8], width: int) -> bytes:
    """A 1-bit grayscale PNG straight from bit-packed rows (`np.packbits(mask, axis=1)`), written directly.

    PNG stores 1-bit pixels MSB first with each row padded to a byte, which is exactly packbits' layout, so
    no full-resolution mask is ever rebuilt. The format needs only IHDR, one zlib stream of rows (each
    prefixed by filter type 0) and IEND; doing it here is ~8x faster than Pillow's encoder, and zlib
    releases the GIL, so masks encode in parallel.
    """
    height = packed.shape[0]
    rows = np.zeros((height, packed.shape[1] + 1), dtype=np.uint8)  # column 0: the filter byte
    rows[:, 1:] = packed
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"".join(
        (
            PNG_SIGNATURE,
            _chunk(b"IHDR", header),
            _chunk(b"IDAT", zlib.compress(rows.tobytes(), PNG_COMPRESS_LEVEL)),
            _chunk(b"IEND", b""),
        )
    )


def packed_geometry(packed: npt.NDArray[np.uint8], width: int) -> MaskGeometry | None:
    """`mask_geometry` of a bit-packed mask, without unpacking it (8x less memory than the bool mask)."""
    rows = np.flatnonzero(packed.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(np.unpackbits(np.bitwise_or.reduce(packed, axis=0), count=width))
    y0, y1 = int(rows[0]), int(rows[-1])
    x0, x1 = int(cols[0]), int(cols[-1])
    area = int(np.bitwise_count(packed).sum(dtype=np.int64))
    return MaskGeometry(x=x0, y=y0, width=x1 - x0 + 1, height=y1 - y0 + 1, area=area)


class PackedMasks:
    """N bit-packed masks in a `.npy` file, read one mask at a time.

    The segment→persist hand-off: at the 40 MP pixel cap a mask is 5 MB packed (40 MB as bool), so persist
    holds a few masks in memory, never all of them (nor two full-resolution copies).
    """

    def __init__(self, path: Path, width: int) -> None:
        self.path = path
        self.width = width
        with path.open("rb") as src:
            version = np.lib.format.read_magic(src)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(src)
            self.offset = src.tell()
        if fortran or dtype != np.uint8 or len(shape) != 3 or shape[2] != (width + 7) // 8:
            raise ValueError(f"{path} does not hold packed masks of width {width}: {shape} {dtype}")
        self.count, self.height, self.row_bytes = (int(v) for v in shape)

    def __len__(self) -> int:
        return self.count

    def read(self, index: int) -> npt.NDArray[np.uint8]:
        size = self.height * self.row_bytes
        with self.path.open("rb") as src:
            src.seek(self.offset + index * size)
            data = src.read(size)
        return np.frombuffer(data, dtype=np.uint8).reshape(self.height, self.row_bytes)


def write_packed_masks(path: Path, masks: Iterable[BoolMask], count: int, height: int, width: int) -> None:
    """Write masks as one `(count, height, ceil(width/8))` uint8 `.npy`, packing one mask at a time."""
    row_bytes = (width + 7) // 8
    with path.open("wb") as out:
        header = {"descr": "|u1", "fortran_order": False, "shape": (count, height, row_bytes)}
        np.lib.format.write_array_header_1_0(out, header)
        written = 0
        for mask in masks:
            if mask.shape != (height, width):
                raise ValueError(f"mask {written} is {mask.shape}, expected {(height, width)}")
            out.write(np.packbits(mask, axis=1).tobytes())
            written += 1
    if written != count:
        raise ValueError(f"wrote {written} masks, announced {count}")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def decode_png(data: bytes) -> BoolMask:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("L")) > 0


def write_mask_pngs(masks: Sequence[BoolMask] | npt.NDArray[np.bool_], out_dir: Path) -> list[Path]:
    """Encode and write mask_000.png, mask_001.png, … in parallel (zlib releases the GIL)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / mask_filename(i) for i in range(len(masks))]

    def write(index: int) -> None:
        paths[index].write_bytes(encode_png(masks[index]))

    workers = min(len(paths), os.cpu_count() or 1, 8)
    if workers <= 1:
        for i in range(len(paths)):
            write(i)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(write, range(len(paths))))
    return paths


def pack_masks(masks: npt.NDArray[np.bool_]) -> npt.NDArray[np.uint8]:
    """(N, H, W) bool → (N, H, ceil(W/8)) bits: the segment→persist hand-off is 8x smaller on disk."""
    return np.packbits(masks, axis=-1)


def unpack_masks(packed: npt.NDArray[np.uint8], width: int) -> npt.NDArray[np.bool_]:
    return np.unpackbits(packed, axis=-1, count=width).astype(bool)
