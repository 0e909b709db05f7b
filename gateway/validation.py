"""Turn a request body into a valid ``Order``, or an InvalidOrder naming every bad field.

The fast path is one typed msgspec decode. Only when it fails do we walk the document field by
field to report *each* problem (msgspec stops at the first), by JSON pointer (RFC 6901).
"""

from __future__ import annotations

import json
import re
from types import NoneType, UnionType
from typing import Annotated, Any, Union, get_args, get_origin

import msgspec

from ordergate.buffer.order import MAX_METADATA_BYTES, MAX_METADATA_KEYS, ORDER_DECODER, Order
from ordergate.gateway.currencies import ISO_4217
from ordergate.gateway.errors import InvalidOrder, MalformedJson

_any_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()
_AT = re.compile(r" - at `\$(.*)`$")
_SEGMENT = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]|\[\.\.\.\]")

Error = dict[str, str]


MAX_DEPTH = 32  # an order nests 3 levels (order, items, item); a document past 32 is not one
MAX_ERRORS = 20  # reported by pointer; the walk stops after one more


class _Enough(Exception):
    """The walk found more errors than are reported: stop it (the CPU of a hostile body)."""


def parse_order(body: bytes) -> Order:
    """Decode and check an order; raises InvalidOrder or MalformedJson."""
    try:
        order = ORDER_DECODER.decode(body)
    except msgspec.ValidationError:
        raise _all_errors(body) from None
    except msgspec.DecodeError as exc:
        raise MalformedJson(f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise _too_deep() from None
    duplicate = _duplicate_key(body, order)
    if duplicate is not None:
        raise InvalidOrder(
            f"the key {duplicate!r} appears twice in one object: send each key once",
            errors=[{"pointer": "#", "detail": f"duplicate key {duplicate!r}"}],
        )
    errors = _cross_field(order)
    if errors:
        raise _invalid(errors)
    return order


def _duplicate_key(body: bytes, order: Order) -> str | None:
    """A key given twice in one object, if any. msgspec keeps the last silently, while a proxy
    or a log reader may take the first: the same bytes would mean two orders. The fast path
    counts each key of the schema in the body (a few C-speed ``count`` calls): when every count
    is what the decoded order implies, no key of the schema can be repeated. Otherwise (a key's
    name inside a string, escapes, metadata's free keys) Python's parser looks for real."""
    expected = {
        b'"storefront_order_id"': 1,
        b'"customer"': 1,
        b'"items"': 1,
        b'"currency"': 1,
        b'"total_minor"': 1,
        b'"id"': 1,
        b'"email"': 1 if order.customer.email is not None else 0,
        b'"sku"': len(order.items),
        b'"quantity"': len(order.items),
        b'"unit_price_minor"': len(order.items),
    }
    if order.metadata is None and b"\\u" not in body and b'"metadata"' not in body:
        if all(body.count(key) == n for key, n in expected.items()):
            return None
    found: list[str] = []

    def pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen and not found:
                found.append(key)
            seen.add(key)
        return dict(pairs)

    json.loads(body, object_pairs_hook=pairs_hook)
    return found[0] if found else None


def _too_deep() -> MalformedJson:
    return MalformedJson(f"the body nests arrays or objects deeper than {MAX_DEPTH} levels")


def nesting_depth(body: bytes, limit: int = MAX_DEPTH) -> int:
    """How deep the body's arrays and objects nest, counted up to ``limit + 1``, at C speed:
    drop the strings, keep the brackets, then peel innermost pairs one level per pass."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return 0  # cannot nest deeper than it has brackets
    brackets = _STRING.sub(b"", body).translate(None, _NOT_BRACKETS)
    depth = 0
    while brackets and depth <= limit:
        peeled = _INNERMOST.sub(b"", brackets)
        if peeled == brackets:
            break  # unbalanced: the decoder says what is wrong with it
        brackets, depth = peeled, depth + 1
    return depth


_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")
_INNERMOST = re.compile(rb"\[\]|\{\}")


def _invalid(errors: list[Error]) -> InvalidOrder:
    """The problem for ``errors``: at most MAX_ERRORS of them, then a last entry saying more
    were found (the walk stopped there)."""
    shown = list(errors[:MAX_ERRORS])
    more = len(errors) > MAX_ERRORS
    if more:
        shown.append({"pointer": "#", "detail": f"more than {MAX_ERRORS} errors, not listed"})
    detail = "; ".join(f"{e['pointer']}: {e['detail']}" for e in shown[:5])
    if more:
        detail += f"; and more (the first {MAX_ERRORS} in errors)"
    elif len(shown) > 5:
        detail += f"; and {len(shown) - 5} more"
    return InvalidOrder(detail, errors=shown)


def _pointer(path: list[str | int]) -> str:
    return (
        "#/" + "/".join(str(p).replace("~", "~0").replace("/", "~1") for p in path) if path else "#"
    )


def _cross_field(order: Order) -> list[Error]:
    errors: list[Error] = []
    if order.currency not in ISO_4217:
        errors.append(
            {
                "pointer": "#/currency",
                "detail": f"{order.currency!r} is not an ISO 4217 currency code",
            }
        )
    total = sum(i.quantity * i.unit_price_minor for i in order.items)
    if total != order.total_minor:
        errors.append(
            {
                "pointer": "#/total_minor",
                "detail": "must equal the sum of quantity * unit_price_minor over the items"
                f" ({total})",
            }
        )
    if order.metadata is not None:
        if len(order.metadata) > MAX_METADATA_KEYS:
            errors.append({"pointer": "#/metadata", "detail": f"at most {MAX_METADATA_KEYS} keys"})
        elif len(_encoder.encode(order.metadata)) > MAX_METADATA_BYTES:
            errors.append(
                {"pointer": "#/metadata", "detail": f"at most {MAX_METADATA_BYTES} bytes of JSON"}
            )
    return errors


def _all_errors(body: bytes) -> InvalidOrder | MalformedJson:
    if nesting_depth(body) > MAX_DEPTH:
        return _too_deep()
    try:
        doc = _any_decoder.decode(body)
    except msgspec.DecodeError as exc:
        return MalformedJson(f"the body is not valid JSON: {exc}")
    except RecursionError:
        return _too_deep()
    errors = _Bounded()
    try:
        _check(doc, Order, [], errors)
    except _Enough:
        pass
    if not errors:  # the typed decode failed for a reason the walk did not see
        try:
            ORDER_DECODER.decode(body)
        except msgspec.ValidationError as exc:
            errors.append(_from_msgspec(exc, []))
    return _invalid(errors)


class _Bounded(list[Error]):
    """The error list of one walk, which ends it once it holds one more than is reported."""

    def append(self, error: Error) -> None:
        super().append(error)
        if len(self) > MAX_ERRORS:
            raise _Enough


def _unwrap(tp: Any) -> tuple[Any, tuple[Any, ...]]:
    if get_origin(tp) is Annotated:
        base, *metas = get_args(tp)
        return base, tuple(metas)
    return tp, ()


def _struct_of(tp: Any) -> type[msgspec.Struct] | None:
    base, _ = _unwrap(tp)
    if isinstance(base, type) and issubclass(base, msgspec.Struct):
        return base
    if get_origin(base) in (Union, UnionType):  # Optional[Struct]
        for arg in get_args(base):
            if isinstance(arg, type) and issubclass(arg, msgspec.Struct):
                return arg
    return None


def _check(value: Any, tp: Any, path: list[str | int], errors: list[Error]) -> None:
    struct = _struct_of(tp)
    base, metas = _unwrap(tp)
    if struct is not None:
        if value is None and NoneType in get_args(base):
            return
        if not isinstance(value, dict):
            errors.append({"pointer": _pointer(path), "detail": "expected an object"})
            return
        fields = {f.encode_name: f for f in msgspec.structs.fields(struct)}
        for name in value:
            if name not in fields:
                errors.append({"pointer": _pointer([*path, name]), "detail": "unknown field"})
        for name, f in fields.items():
            if name not in value:
                if f.required:
                    errors.append(
                        {"pointer": _pointer([*path, name]), "detail": "required field is missing"}
                    )
            else:
                _check(value[name], f.type, [*path, name], errors)
        return
    if get_origin(base) is list and _struct_of(get_args(base)[0]) is not None:
        try:
            msgspec.convert(value, Annotated[list[Any], *metas] if metas else list[Any])
        except msgspec.ValidationError as exc:
            errors.append(_from_msgspec(exc, path))
            return
        for i, item in enumerate(value):
            _check(item, get_args(base)[0], [*path, i], errors)
        return
    dict_args = _dict_args(base)
    if dict_args is not None and isinstance(value, dict):
        key_tp, value_tp = dict_args
        for k, v in value.items():
            for part, part_tp in ((k, key_tp), (v, value_tp)):
                try:
                    msgspec.convert(part, part_tp, strict=True)
                except msgspec.ValidationError as exc:
                    errors.append(_from_msgspec(exc, [*path, k]))
        return
    try:
        msgspec.convert(value, tp, strict=True)
    except msgspec.ValidationError as exc:
        errors.append(_from_msgspec(exc, path))


def _dict_args(tp: Any) -> tuple[Any, Any] | None:
    """(key type, value type) of ``dict[K, V]`` or ``dict[K, V] | None``."""
    candidates = get_args(tp) if get_origin(tp) in (Union, UnionType) else (tp,)
    for c in candidates:
        if get_origin(c) is dict:
            k, v = get_args(c)
            return k, v
    return None


def _from_msgspec(exc: msgspec.ValidationError, path: list[str | int]) -> Error:
    message = str(exc)
    sub: list[str | int] = []
    match = _AT.search(message)
    if match:
        message = message[: match.start()]
        for name, index in _SEGMENT.findall(match.group(1)):
            sub.append(name if name else int(index) if index else "*")
    return {"pointer": _pointer([*path, *sub]), "detail": message}
