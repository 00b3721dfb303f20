"""torporctl's catalogue and policy commands: acquire, register, deregister,
policy; and the policy flags `load` shares with them."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable

from google.protobuf import json_format
from google.protobuf.message import Message

from torpor.cli import render
from torpor.cli.format import seconds
from torpor.client import Client
from torpor.policy import EVICT_TIERS, make_policy
from torpor.v1 import common_pb2, models_pb2
from torpor.windows import parse_window

__all__ = ["HANDLERS", "add_commands", "add_policy_flags", "policy_from_args", "source_path"]

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)?")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def _duration(text: str) -> float:
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(
            f'expected a duration like "5m", "90s", "1h" or "0s" (never), got {text!r}'
        )
    return float(match.group(1)) * _UNITS[match.group(2)]


def _window(text: str) -> str:
    try:
        parse_window(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None
    return text


def _priority(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def source_path(source: str) -> str:
    """What the user meant: the daemon resolves paths in its own working
    directory. URIs (later: hf://, s3://) and "" (a registered model's
    source) go as they are."""
    if "://" in source or not source:
        return source
    return os.path.abspath(os.path.expanduser(source))


def add_policy_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that set a model's policy; those not given are left unset."""
    group = parser.add_argument_group(
        "policy (flags not given: the model's catalogue entry's, else torpord's defaults)"
    )
    group.add_argument(
        "--idle-timeout",
        metavar="DURATION",
        type=_duration,
        help='sleep after this long without use ("5m", "1h"; "0s": never)',
    )
    group.add_argument(
        "--idle-level", type=int, choices=(1, 2), help="the level an idle model sleeps at"
    )
    group.add_argument(
        "--priority", metavar="N", type=_priority, help="higher is kept longer when room is needed"
    )
    pin = group.add_mutually_exclusive_group()
    pin.add_argument(
        "--pin",
        dest="pinned",
        action="store_const",
        const=True,
        help="never evict it, never put it to sleep for idleness",
    )
    pin.add_argument("--unpin", dest="pinned", action="store_const", const=False)
    group.add_argument("--evict-to", choices=tuple(EVICT_TIERS), help="where it goes when evicted")
    group.add_argument(
        "--window",
        dest="windows",
        metavar="WINDOW",
        action="append",
        type=_window,
        default=[],
        help='weekly times (UTC) it is wanted, repeatable: "Mon-Fri 08:00-18:00",'
        ' "daily 20:00-02:00", "Sat 10:00-12:00 device lead 10m"',
    )


def policy_from_args(args: argparse.Namespace) -> common_pb2.Policy | None:
    """The Policy the flags set; None when none was given."""
    policy = make_policy(
        idle_timeout=args.idle_timeout,
        idle_level=args.idle_level,
        priority=args.priority,
        pinned=args.pinned,
        evict_to=args.evict_to,
        windows=args.windows,
    )
    return policy if policy.ListFields() else None


def add_commands(command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    acquire = command("acquire", "make a model ready now (a request for it arrived)")
    acquire.add_argument("model_id", metavar="MODEL_ID")
    acquire.add_argument("--request-id", metavar="ID", default="", help="idempotency key")

    register = command("register", "add (or replace) a catalogue entry: a model Acquire may load")
    register.add_argument("model_id", metavar="MODEL_ID")
    register.add_argument("source", metavar="SOURCE", help="path; relative paths are made absolute")
    register.add_argument("--device", metavar="UUID", default="", help="default: the freest")
    add_policy_flags(register)

    deregister = command("deregister", "remove a catalogue entry (a loaded model stays loaded)")
    deregister.add_argument("model_id", metavar="MODEL_ID")

    policy = command("policy", "show a model's policy, or set the fields the flags give")
    policy.add_argument("model_id", metavar="MODEL_ID")
    add_policy_flags(policy)
    policy.add_argument(
        "--clear-windows",
        action="store_true",
        help="remove every time window of the model (not with --window)",
    )


def _print(args: argparse.Namespace, message: Message, text: Callable[[], str]) -> int:
    if args.json:
        print(json_format.MessageToJson(message, indent=2, preserving_proto_field_name=True))
    else:
        print(text())
    sys.stdout.flush()
    return 0


def _acquired(response: models_pb2.AcquireModelResponse) -> str:
    model = response.model
    state = render.state_label(model.state)
    if response.hit:
        return f"hit: {model.model_id!r} was {state}, ready at once"
    return f"miss: {model.model_id!r} is {state}, ready in {seconds(response.time_to_ready)}"


def cmd_acquire(client: Client, args: argparse.Namespace) -> int:
    response = client.acquire_model(args.model_id, request_id=args.request_id)
    return _print(args, response, lambda: _acquired(response))


def cmd_register(client: Client, args: argparse.Namespace) -> int:
    model = client.register_model(
        args.model_id,
        source_path(args.source),
        device=args.device,
        policy=policy_from_args(args),
    )
    response = models_pb2.RegisterModelResponse(model=model)
    return _print(args, response, lambda: render.model_details(model))


def cmd_deregister(client: Client, args: argparse.Namespace) -> int:
    client.deregister_model(args.model_id)
    response = models_pb2.DeregisterModelResponse()
    return _print(args, response, lambda: f"Deregistered model {args.model_id!r}")


def cmd_policy(client: Client, args: argparse.Namespace) -> int:
    policy = policy_from_args(args)
    if policy is None and not args.clear_windows:  # nothing to set: show it
        model = client.get_model(args.model_id)
        got: Message = models_pb2.GetModelResponse(model=model)
    else:
        model = client.set_model_policy(
            args.model_id, policy or common_pb2.Policy(), clear_windows=args.clear_windows
        )
        got = models_pb2.SetModelPolicyResponse(model=model)
    return _print(args, got, lambda: render.model_details(model))


HANDLERS: dict[str, Callable[[Client, argparse.Namespace], int]] = {
    "acquire": cmd_acquire,
    "register": cmd_register,
    "deregister": cmd_deregister,
    "policy": cmd_policy,
}
