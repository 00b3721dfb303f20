"""Bounds on every request message, checked as it comes in.

Anything a caller sends may be kept (a request_id for ten minutes), logged,
or echoed in an error, so every string, bytes and repeated field of every
request (the Attach stream's messages, health and reflection included) is
bounded before any work: a field over its limit is INVALID_ARGUMENT with
reason FIELD_TOO_LONG or TOO_MANY_ITEMS, naming the field and the limit and
never quoting the value. The check walks the message's descriptor, so a new
field is bounded (by the defaults) the day it is added; the tables below
name the fields that need another limit.
"""

from __future__ import annotations

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from torpord.core.requests import MAX_REQUEST_ID
from torpord.errors import InvalidArgument
from torpord.storage.catalogue import MAX_FINGERPRINT, MAX_GROUP_TENSORS
from torpord.storage.layers import MAX_LAYERS

__all__ = [
    "DEFAULT_ITEMS",
    "DEFAULT_STRING",
    "ITEM_LIMITS",
    "MAX_MESSAGE_BYTES",
    "MAX_NAME",
    "MAX_NAMES",
    "MAX_PATH",
    "STRING_LIMITS",
    "check_request",
    "too_long",
    "too_many",
]

# A whole message (grpc.max_receive_message_length); grpc refuses a larger
# one itself, as RESOURCE_EXHAUSTED without an ErrorInfo. With every field
# bounded the largest valid request is about 1 MiB (MAX_NAMES names); this
# leaves room for a request just over a field's limit to get its reason.
MAX_MESSAGE_BYTES = 4 << 20
DEFAULT_STRING = 256  # bytes: ids, names, devices
DEFAULT_ITEMS = 1024
MAX_PATH = 4096  # bytes: Linux's PATH_MAX
MAX_NAME = DEFAULT_STRING  # a layer's name
MAX_NAMES = 4096  # layers in one request: far more than any model has

# Bytes, by field: a full name ("torpor.v1.LoadModelRequest.source"), or a
# plain name for that field in every message.
STRING_LIMITS: dict[str, int] = {
    "request_id": MAX_REQUEST_ID,
    "torpor.v1.LoadModelRequest.source": MAX_PATH,
    "torpor.v1.Publish.fingerprint": MAX_FINGERPRINT,
    "torpor.v1.ListModelsRequest.fingerprint": MAX_FINGERPRINT,
}
# Items of a repeated field, by full name (each item is checked as well).
ITEM_LIMITS: dict[str, int] = {
    "torpor.v1.OffloadModelRequest.layers": MAX_NAMES,
    "torpor.v1.Publish.groups": MAX_LAYERS,
    # (A fused MoE block has a handful; unfused experts, a few hundred.)
    "torpor.v1.PublishGroup.tensors": MAX_GROUP_TENSORS,
}


def too_long(field: str, size: int, limit: int) -> InvalidArgument:
    return InvalidArgument(
        f"{field} is {size:,} bytes long; at most {limit:,} are allowed",
        reason="FIELD_TOO_LONG",
        metadata={"field": field, "limit": limit, "size": size},
    )


def too_many(field: str, count: int, limit: int) -> InvalidArgument:
    return InvalidArgument(
        f"{field} has {count:,} items; at most {limit:,} are allowed",
        reason="TOO_MANY_ITEMS",
        metadata={"field": field, "limit": limit, "count": count},
    )


def _string_limit(field: FieldDescriptor) -> int:
    return STRING_LIMITS.get(field.full_name) or STRING_LIMITS.get(field.name, DEFAULT_STRING)


def _size(value: str | bytes) -> int:
    return len(value.encode()) if isinstance(value, str) else len(value)


def _check_value(field: FieldDescriptor, value: object, path: str) -> None:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        assert isinstance(value, Message)
        _check(value, path + ".")
    elif field.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES):
        assert isinstance(value, str | bytes)
        limit = _string_limit(field)
        # (a str has at least as many bytes as characters: no encoding needed
        # to refuse a long one)
        if len(value) > limit or _size(value) > limit:
            raise too_long(path, _size(value), limit)


def _check(message: Message, prefix: str) -> None:
    for field, value in message.ListFields():
        path = prefix + field.name
        if not field.is_repeated:
            _check_value(field, value, path)
            continue
        limit = ITEM_LIMITS.get(field.full_name, DEFAULT_ITEMS)
        if len(value) > limit:
            raise too_many(path, len(value), limit)
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            key_field, value_field = entry.fields_by_name["key"], entry.fields_by_name["value"]
            for key, item in value.items():
                _check_value(key_field, key, f"{path} (a key)")
                _check_value(value_field, item, f"{path} (a value)")
            continue
        for index, item in enumerate(value):
            _check_value(field, item, f"{path}[{index}]")


def check_request(message: Message) -> None:
    """InvalidArgument (FIELD_TOO_LONG, TOO_MANY_ITEMS) for the first field of
    `message` over its limit, at any depth."""
    _check(message, "")
