"""Token ids packed as little-endian uint32 bytes: what the piece cache stores, the
router chains keys over, and the engines receive (``pack_ids`` / ``unpack_ids``)."""

from __future__ import annotations

from array import array
from collections.abc import Sequence


def pack_ids(ids: Sequence[int]) -> bytes:
    """Token ids as little-endian uint32 bytes (the layout keys are chained over)."""
    packed = array("I", ids)
    if packed.itemsize != 4:  # pragma: no cover - every supported platform has a 4-byte "I"
        packed = array("L", ids)
    if packed.itemsize == 4 and array("I", [1]).tobytes() != b"\x01\x00\x00\x00":  # pragma: no cover
        packed.byteswap()
    return packed.tobytes()


def unpack_ids(data: bytes) -> list[int]:
    """``pack_ids``'s inverse."""
    if len(data) % 4:
        raise ValueError(f"packed token ids must be a multiple of 4 bytes, got {len(data)}")
    out = array("I")
    out.frombytes(data)
    if array("I", [1]).tobytes() != b"\x01\x00\x00\x00":  # pragma: no cover - big-endian hosts
        out.byteswap()
    return out.tolist()
