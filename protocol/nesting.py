"""The nesting-depth bound that every decoder of outside input applies.

msgspec (and tomllib) decode nested arrays and objects by recursion, so a
document nested deep enough raises RecursionError instead of a decode error;
how deep is "enough" depends on the stack the decoder runs on, and a value
that decoded on a shallow stack can still fail when it is encoded again on a
deeper one (a push, a webhook). So the bound is explicit, the same for every
binding, and far below the recursion limit: `MAX_NESTING_DEPTH`.

The check is kept off the hot path: a document holds at most as many
containers as it has bytes that can open one (`[` or `{` in JSON, a map or
array header in MessagePack), and counting those runs at C speed. Only a
document with more of them than the limit (code in a message text, say) has
its decoded value walked, level by level, which costs in proportion to its
values and not to its bytes. The whole document counts: a typed decoder
drops the fields it does not know, so for one the document is decoded once
more, untyped, to be walked.

The same decoders refuse what no store of the broker can hold (`Unstorable`):
an integer outside SQLite's signed 64-bit range, which would also stop the
MessagePack link between gateway and writer, and a MessagePack extension
value. The same kind of pre-check keeps that off the hot path: only a JSON
document with a run of 19 digits outside a string's start, or a MessagePack
document with a byte that can open a uint64 or an extension, is walked.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import msgspec

# Deepest nesting accepted in a decoded document, the document itself being
# level 1 (`{"data":{"a":[1]}}` is 3 levels). 64 leaves ample room for
# structured `data` (what the API itself nests stays under 10 levels) and
# for the 3 levels a pushed `deliver` frame wraps around a message's `data`,
# while staying far below Python's recursion limit (1000 frames, fewer left
# on a deep stack) that msgspec and tomllib run into.
MAX_NESTING_DEPTH = 64

# Bytes that open a container in MessagePack: fixmap, fixarray, array 16/32, map 16/32.
_MSGPACK_OPENERS = bytes([*range(0x80, 0xA0), 0xDC, 0xDD, 0xDE, 0xDF])
_MSGPACK_NOT_OPENERS = bytes(b for b in range(256) if b not in _MSGPACK_OPENERS)
_CONTAINERS = (dict, list, tuple, set, frozenset, msgspec.Struct)
_CONTAINER_TYPES = frozenset({dict, list, tuple, set, frozenset})


# The integers a document may hold: SQLite's, a signed 64-bit integer.
MIN_INTEGER, MAX_INTEGER = -(2**63), 2**63 - 1

# A JSON document read as digits (`0`), characters after which no number
# starts (`"`: a word character, a point, a quote, any non-ASCII byte) and
# the rest (` `): a number of 19 digits or more outside a string then shows
# as ` ` and nineteen `0`, while a string of digits such as an id shows as
# `"` and the zeros. One pass at C speed, then one search.
_DIGIT_MAP = bytes(
    ord("0") if chr(b).isdigit() and b < 128
    else ord('"') if b >= 128 or chr(b).isalpha() or chr(b) in '_".' else ord(" ")
    for b in range(256))
_LONG_NUMBER = b" " + b"0" * 19
# Bytes that open a uint64 (0xcf) or an extension (ext 8/16/32, fixext 1 to 16).
_MSGPACK_WIDE = bytes([0xC7, 0xC8, 0xC9, 0xCF, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8])
_MSGPACK_NOT_WIDE = bytes(b for b in range(256) if b not in _MSGPACK_WIDE)


class NestingTooDeep(msgspec.DecodeError):
    """A document nested deeper than the limit.

    A `msgspec.DecodeError`, so a caller that refuses undecodable input
    refuses this one the same way. `limit`: the depth that was exceeded.
    """

    def __init__(self, limit: int = MAX_NESTING_DEPTH) -> None:
        super().__init__(f"nested deeper than {limit} levels")
        self.limit = limit


class Unstorable(msgspec.ValidationError):
    """A document holding a value no store of the broker can hold (see `unstorable`).

    A `msgspec.ValidationError`: the document is well formed, its content is refused.
    """


def unstorable(value: Any) -> str | None:
    """What in a decoded document the broker cannot store, said for a person; None if nothing.

    An integer outside `MIN_INTEGER`..`MAX_INTEGER`, or a MessagePack
    extension value. Walks dicts (keys too), lists and tuples without
    recursion.
    """
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is int:
            if not MIN_INTEGER <= item <= MAX_INTEGER:
                digits = str(item)
                shown = digits if len(digits) <= 40 else f"{digits[:20]}...({len(digits)} digits)"
                return f"an integer outside the signed 64-bit range: {shown}"
        elif kind is dict:
            stack += item
            stack += item.values()
        elif kind is list or kind is tuple:
            stack += item
        elif kind is msgspec.msgpack.Ext:
            return f"a MessagePack extension value (type {item.code})"
    return None


def json_may_be_unstorable(data: str | bytes) -> bool:
    """Whether a JSON document may hold an integer `unstorable` refuses (a cheap pre-check:
    a run of 19 digits not inside a word, a fraction or right after a quote)."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    return _LONG_NUMBER in b" " + raw.translate(_DIGIT_MAP)


def msgpack_may_be_unstorable(data: bytes) -> bool:
    """Whether a MessagePack document may hold a uint64 or an extension (a cheap pre-check:
    a byte that can open one)."""
    return bool(data.translate(None, _MSGPACK_NOT_WIDE))


def json_openers(data: str | bytes) -> int:
    """How many `[` and `{` `data` holds: an upper bound on a JSON document's containers."""
    if isinstance(data, str):
        return data.count("[") + data.count("{")
    return data.count(b"[") + data.count(b"{")


def msgpack_openers(data: bytes) -> int:
    """How many bytes of `data` could open a MessagePack container (an upper bound, as above)."""
    return len(data.translate(None, _MSGPACK_NOT_OPENERS))


def nesting_exceeds(value: Any, limit: int = MAX_NESTING_DEPTH) -> bool:
    """Whether a decoded value nests deeper than `limit` levels (a scalar is level 0).

    Walks one level at a time, without recursion, and stops at level
    `limit + 1`: the cost is bounded by the values within the limit.
    Dicts (their keys too), lists, tuples, sets and msgspec Structs count.
    """
    level = [value] if _is_container(value) else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return True
        values: list[Any] = []
        for container in level:
            if type(container) is dict:
                values += container
                values += container.values()
            elif isinstance(container, msgspec.Struct):
                values += msgspec.structs.astuple(container)
            else:
                values += container
        level = [v for v in values if type(v) in _CONTAINER_TYPES
                 or (type(v) not in _SCALARS and isinstance(v, _CONTAINERS))]
    return False


# Types that never hold a value: most of a document, skipped by one set lookup
# (an isinstance check against msgspec.Struct costs several times more).
_SCALARS = frozenset({str, int, float, bool, type(None), bytes})


def _is_container(value: Any) -> bool:
    kind = type(value)
    return kind in _CONTAINER_TYPES or (
        kind not in _SCALARS and isinstance(value, _CONTAINERS))


def check_nesting(value: Any, limit: int = MAX_NESTING_DEPTH) -> None:
    """Raise NestingTooDeep when `value` nests deeper than `limit` levels."""
    if nesting_exceeds(value, limit):
        raise NestingTooDeep(limit)


def decode_json(
    decoder: msgspec.json.Decoder[Any], data: str | bytes, *, limit: int = MAX_NESTING_DEPTH
) -> Any:
    """`decoder.decode(data)`, refusing documents nested deeper than `limit`
    and documents holding what `unstorable` finds.

    The whole document counts, fields a typed decoder ignores included.
    Raises NestingTooDeep for a document too deep (also when msgspec itself
    ran out of recursion), Unstorable, else what the decoder raises
    (DecodeError, ValidationError).
    """
    return _decode(decoder, data, json_openers, json_may_be_unstorable, _ANY_JSON, limit)


def decode_msgpack(
    decoder: msgspec.msgpack.Decoder[Any], data: bytes, *, limit: int = MAX_NESTING_DEPTH
) -> Any:
    """`decoder.decode(data)`, refusing documents nested deeper than `limit` and
    unstorable ones (as decode_json)."""
    return _decode(decoder, data, msgpack_openers, msgpack_may_be_unstorable, _ANY_MSGPACK,
                   limit)


def _decode(decoder: Any, data: Any, openers: Callable[[Any], int],
            may_be_unstorable: Callable[[Any], bool], whole_decoder: Any, limit: int) -> Any:
    try:
        value = decoder.decode(data)
        deep, wide = openers(data) > limit, may_be_unstorable(data)
        if deep or wide:
            # A typed decoder drops unknown fields: walk the document, not what was kept.
            whole = value if decoder.type is Any else whole_decoder.decode(data)
            if deep and nesting_exceeds(whole, limit):
                raise NestingTooDeep(limit)
            problem = unstorable(whole) if wide else None
            if problem is not None:
                raise Unstorable(problem)
    except RecursionError:
        raise NestingTooDeep(limit) from None
    return value


_ANY_JSON = msgspec.json.Decoder()
_ANY_MSGPACK = msgspec.msgpack.Decoder()


# -- the members before the first nested value -----------------------------------------------
#
# A frame refused as too deep is still answered when its `id` can be read. It
# cannot be decoded (that is the point), so it is cut down to the top-level
# members that precede its first nested value, which clients write first
# (`{"v":1,"id":"c1","type":...,"data":{...}}`), and that much is decoded.

# From the opening brace up to the first `[`/`{` outside a string. Possessive
# quantifiers: no backtracking, so the match is linear even on hostile input.
_JSON_HEAD_STR = re.compile(r'\s*+\{(?:[^"\[\]{}]++|"(?:[^"\\]++|\\.)*+")*+')
_JSON_HEAD_BYTES = re.compile(rb'\s*+\{(?:[^"\[\]{}]++|"(?:[^"\\]++|\\.)*+")*+')


def json_head(data: str | bytes) -> str | bytes | None:
    """The object `data` opens, cut at its first nested value (which becomes `null`).

    None when `data` does not open an object followed by a nested value.
    The result is valid JSON only if `data` was, up to the cut.
    """
    if isinstance(data, str):
        match = _JSON_HEAD_STR.match(data)
        if match is None or data[match.end():match.end() + 1] not in ("[", "{"):
            return None
        return data[:match.end()] + "null}"
    found = _JSON_HEAD_BYTES.match(data)
    if found is None or data[found.end():found.end() + 1] not in (b"[", b"{"):
        return None
    return data[:found.end()] + b"null}"


def _msgpack_scalar_end(data: bytes, at: int) -> int | None:
    """Where the scalar starting at `at` ends; None for a container, a bad byte or the end."""
    if at >= len(data):
        return None
    head = data[at]
    if head <= 0x7F or head >= 0xE0 or head in (0xC0, 0xC2, 0xC3):
        end = at + 1
    elif 0xA0 <= head <= 0xBF:
        end = at + 1 + (head & 0x1F)
    elif head in _MSGPACK_FIXED:
        end = at + _MSGPACK_FIXED[head]
    elif head in _MSGPACK_SIZED:
        width, extra = _MSGPACK_SIZED[head]
        size = int.from_bytes(data[at + 1:at + 1 + width], "big")
        end = at + 1 + width + extra + size
    else:
        return None
    return end if end <= len(data) else None


# Scalars of a fixed size (header included): floats, ints, fixext.
_MSGPACK_FIXED = {0xCA: 5, 0xCB: 9, 0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9, 0xD0: 2, 0xD1: 3,
                  0xD2: 5, 0xD3: 9, 0xD4: 3, 0xD5: 4, 0xD6: 6, 0xD7: 10, 0xD8: 18}
# Scalars with a length: (bytes of the length, bytes between length and data).
_MSGPACK_SIZED = {0xC4: (1, 0), 0xC5: (2, 0), 0xC6: (4, 0), 0xC7: (1, 1), 0xC8: (2, 1),
                  0xC9: (4, 1), 0xD9: (1, 0), 0xDA: (2, 0), 0xDB: (4, 0)}


def msgpack_head(data: bytes) -> bytes | None:
    """The map `data` opens, with only its members before the first nested value.

    Walks the top-level members one by one (they are few: it stops at the
    first container). None when `data` does not open a map.
    """
    if not data:
        return None
    head = data[0]
    if 0x80 <= head <= 0x8F:
        count, at = head & 0x0F, 1
    elif head in (0xDE, 0xDF):
        width = 2 if head == 0xDE else 4
        count, at = int.from_bytes(data[1:1 + width], "big"), 1 + width
    else:
        return None
    start, taken = at, 0
    while taken < count:
        key_end = _msgpack_scalar_end(data, at)
        value_end = None if key_end is None else _msgpack_scalar_end(data, key_end)
        if value_end is None:
            break
        at, taken = value_end, taken + 1
    if taken < 0x10:
        header = bytes([0x80 | taken])
    elif taken <= 0xFFFF:
        header = b"\xde" + taken.to_bytes(2, "big")
    else:
        header = b"\xdf" + taken.to_bytes(4, "big")
    return header + data[start:at]
