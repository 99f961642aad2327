"""msgpack, the encoding of every request and response (docs/abi.md), in pure Python.

Only what the ABI uses: nil, booleans, integers, floats, strings, bytes, arrays and maps.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any


def pack(value: Any) -> bytes:
    out = bytearray()
    _pack(value, out)
    return bytes(out)


def _pack(value: Any, out: bytearray) -> None:
    packer = _PACKERS.get(type(value))  # by exact type first: most of a request's cost
    if packer is None:
        packer = _packer_for(value)
    packer(value, out)


def _packer_for(value: Any) -> Callable[[Any, bytearray], None]:
    """The packer of a value whose exact type is not in `_PACKERS` (a subclass)."""
    for kind in (bool, int, float, str, bytes, bytearray, list, tuple, dict):
        if isinstance(value, kind):
            return _PACKERS[kind]
    raise TypeError(f"cannot encode {type(value).__name__} as msgpack")


def _pack_none(value: None, out: bytearray) -> None:
    out.append(0xC0)


def _pack_bool(value: bool, out: bytearray) -> None:
    out.append(0xC3 if value else 0xC2)


def _pack_float(value: float, out: bytearray) -> None:
    out.append(0xCB)
    out += struct.pack(">d", value)


def _pack_str(value: str, out: bytearray) -> None:
    data = value.encode("utf-8")
    _header(len(data), out, 0xA0, 32, 0xD9, 0xDA, 0xDB)
    out += data


def _pack_bytes(value: bytes | bytearray, out: bytearray) -> None:
    _header(len(value), out, None, 0, 0xC4, 0xC5, 0xC6)
    out += value


def _pack_list(value: list[Any] | tuple[Any, ...], out: bytearray) -> None:
    _header(len(value), out, 0x90, 16, None, 0xDC, 0xDD)
    if len(value) > 2 and all(type(item) is int for item in value):
        _pack_ints(value, out)
    else:
        for item in value:
            _pack(item, out)


def _pack_dict(value: dict[Any, Any], out: bytearray) -> None:
    _header(len(value), out, 0x80, 16, None, 0xDE, 0xDF)
    for key, item in value.items():
        _pack(key, out)
        _pack(item, out)


def _header(length: int, out: bytearray, fix: int | None, fix_limit: int,
            one: int | None, two: int, four: int) -> None:
    if fix is not None and length < fix_limit:
        out.append(fix | length)
    elif one is not None and length < 0x100:
        out += bytes((one, length))
    elif length < 0x10000:
        out.append(two)
        out += struct.pack(">H", length)
    else:
        out.append(four)
        out += struct.pack(">I", length)


def _pack_int(value: int, out: bytearray) -> None:
    if 0 <= value < 0x80:
        out.append(value)
    elif -32 <= value < 0:
        out.append(value & 0xFF)
    elif 0 <= value < 1 << 32:
        out.append(0xCE)
        out += struct.pack(">I", value)
    elif 0 <= value < 1 << 64:
        out.append(0xCF)
        out += struct.pack(">Q", value)
    else:
        out.append(0xD3)
        out += struct.pack(">q", value)


def _pack_ints(items: list[int] | tuple[int, ...], out: bytearray) -> None:
    """The items of an int list (pages, positions, tokens: every forward's bulk), packed at C
    speed: one byte each when all are fixints, else each a uint32 (0xCE and 4 bytes), else
    one by one."""
    low, high = min(items), max(items)
    if low >= 0 and high < 0x80:
        out += bytes(items)
    elif low >= 0 and high < 1 << 32:
        count = len(items)
        words = struct.pack(f">{count}I", *items)
        packed = bytearray(5 * count)
        packed[0::5] = b"\xce" * count
        for byte in range(4):
            packed[byte + 1::5] = words[byte::4]
        out += packed
    else:
        for item in items:
            _pack_int(item, out)


_PACKERS: dict[type, Callable[[Any, bytearray], None]] = {
    type(None): _pack_none, bool: _pack_bool, int: _pack_int, float: _pack_float,
    str: _pack_str, bytes: _pack_bytes, bytearray: _pack_bytes, list: _pack_list,
    tuple: _pack_list, dict: _pack_dict,
}


def unpack(data: bytes) -> Any:
    value, _ = _unpack(data, 0)
    return value


_FIXED = {0xC0: None, 0xC2: False, 0xC3: True}
_NUMBERS = {0xCA: ">f", 0xCB: ">d", 0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q",
            0xD0: ">b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q"}
_LENGTHS = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4, 0xDC: 2, 0xDD: 4,
            0xDE: 2, 0xDF: 4}
_LENGTH_FORMAT = {1: ">B", 2: ">H", 4: ">I"}


def _unpack(data: bytes, at: int) -> tuple[Any, int]:
    byte = data[at]
    at += 1
    if byte < 0x80:
        return byte, at
    if byte >= 0xE0:
        return byte - 0x100, at
    if 0xA0 <= byte <= 0xBF:
        end = at + (byte & 0x1F)
        return data[at:end].decode("utf-8"), end
    if 0x90 <= byte <= 0x9F:
        return _array(data, at, byte & 0x0F)
    if 0x80 <= byte <= 0x8F:
        return _map(data, at, byte & 0x0F)
    if byte in _FIXED:
        return _FIXED[byte], at
    if byte in _NUMBERS:
        fmt = _NUMBERS[byte]
        size = struct.calcsize(fmt)
        return struct.unpack_from(fmt, data, at)[0], at + size
    width = _LENGTHS.get(byte)
    if width is None:
        raise ValueError(f"unsupported msgpack byte 0x{byte:02x}")
    length = struct.unpack_from(_LENGTH_FORMAT[width], data, at)[0]
    at += width
    if byte in (0xC4, 0xC5, 0xC6):
        return bytes(data[at:at + length]), at + length
    if byte in (0xD9, 0xDA, 0xDB):
        return data[at:at + length].decode("utf-8"), at + length
    if byte in (0xDC, 0xDD):
        return _array(data, at, length)
    return _map(data, at, length)


def _array(data: bytes, at: int, count: int) -> tuple[list[Any], int]:
    items = []
    for _ in range(count):
        item, at = _unpack(data, at)
        items.append(item)
    return items, at


def _map(data: bytes, at: int, count: int) -> tuple[dict[Any, Any], int]:
    entries = {}
    for _ in range(count):
        key, at = _unpack(data, at)
        entries[key], at = _unpack(data, at)
    return entries, at
