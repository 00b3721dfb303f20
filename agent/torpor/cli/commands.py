"""torporctl's commands: each takes the client and the parsed arguments and returns an exit code.

Text goes to stdout; `--json` prints the RPC's response as grpcurl would
(proto field names, int64 as strings, as grpcurl 1.8 prints them); the progress
bar and errors go to stderr.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from collections.abc import Callable

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from torpor.cli import progress, render
from torpor.cli.catalogue import policy_from_args, source_path
from torpor.client import Client
from torpor.errors import TorporError
from torpor.v1 import common_pb2, models_pb2, node_pb2

__all__ = ["EXIT_INTERRUPTED", "EXIT_UNAVAILABLE", "HANDLERS", "Handler"]

EXIT_UNAVAILABLE = 3
EXIT_INTERRUPTED = 130

Handler = Callable[[Client, argparse.Namespace], int]


def _print(text: str) -> None:
    print(text, file=sys.stdout, flush=True)


def _emit(args: argparse.Namespace, message: Message, text: Callable[[], str]) -> int:
    if args.json:
        _print(json_format.MessageToJson(message, indent=2, preserving_proto_field_name=True))
    else:
        _print(text())
    return 0


def cmd_node(client: Client, args: argparse.Namespace) -> int:
    node = client.get_node()
    return _emit(args, node_pb2.GetNodeResponse(node=node), lambda: render.node_details(node))


def cmd_list(client: Client, args: argparse.Namespace) -> int:
    models = client.list_models(registered=args.registered)
    response = models_pb2.ListModelsResponse(models=models)
    return _emit(args, response, lambda: render.model_table(models) if models else "No models.")


def cmd_get(client: Client, args: argparse.Namespace) -> int:
    view = models_pb2.MODEL_VIEW_FULL if args.full else models_pb2.MODEL_VIEW_BASIC
    model = client.get_model(args.model_id, view=view)
    return _emit(
        args,
        models_pb2.GetModelResponse(model=model),
        lambda: render.model_details(model, tensors=args.full),
    )


def _mutate(
    client: Client,
    args: argparse.Namespace,
    call: Callable[[], common_pb2.Model],
    wrap: Callable[[common_pb2.Model], Message],
    text: Callable[[common_pb2.Model], str] = render.model_details,
) -> int:
    """Run a mutation, with a progress bar on a terminal while it blocks."""
    bar = (
        progress.ProgressBar(client, args.model_id, sys.stderr)
        if args.wait and progress.wanted(sys.stderr)
        else None
    )
    if bar is not None:
        bar.start()
    try:
        model = call()
    except TorporError as err:
        if err.code == grpc.StatusCode.DEADLINE_EXCEEDED and args.wait:
            err.message += (
                "; torpord keeps running the transition "
                f"(follow it with `torporctl watch {args.model_id}`)"
            )
        raise
    except KeyboardInterrupt:
        if bar is not None:
            bar.stop()
        print(
            "torporctl: interrupted; torpord keeps running the transition "
            f"(follow it with `torporctl watch {args.model_id}`)",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    finally:
        if bar is not None:
            bar.stop()
    return _emit(args, wrap(model), lambda: text(model))


def cmd_load(client: Client, args: argparse.Namespace) -> int:
    return _mutate(
        client,
        args,
        lambda: client.load_model(
            args.model_id,
            source_path(args.source),
            device=args.device,
            target_tier=common_pb2.TIER_HOST if args.host else common_pb2.TIER_DEVICE,
            wait=args.wait,
            request_id=args.request_id,
            policy=policy_from_args(args),
        ),
        lambda model: models_pb2.LoadModelResponse(model=model),
    )


def cmd_sleep(client: Client, args: argparse.Namespace) -> int:
    return _mutate(
        client,
        args,
        lambda: client.sleep_model(
            args.model_id,
            args.level,
            wait=args.wait,
            request_id=args.request_id,
            disk_copy=args.disk_copy,
        ),
        lambda model: models_pb2.SleepModelResponse(model=model),
    )


def cmd_wake(client: Client, args: argparse.Namespace) -> int:
    return _mutate(
        client,
        args,
        lambda: client.wake_model(
            args.model_id, wait=args.wait, request_id=args.request_id, verify=args.verify
        ),
        lambda model: models_pb2.WakeModelResponse(model=model),
    )


_TIERS = {
    "host": common_pb2.TIER_HOST,
    "device": common_pb2.TIER_DEVICE,
    "disk": common_pb2.TIER_DISK,
}


def cmd_offload(client: Client, args: argparse.Namespace) -> int:
    return _mutate(
        client,
        args,
        lambda: client.offload_model(
            args.model_id,
            args.layers,
            _TIERS[args.tier],
            wait=args.wait,
            request_id=args.request_id,
            verify=args.verify,
        ),
        lambda model: models_pb2.OffloadModelResponse(model=model),
    )


def _unloaded(model: common_pb2.Model) -> str:
    # The answer of an unload that waited is the model as it was last, gone
    # (UNLOADED); --no-wait's is the model still UNLOADING.
    if model.state == common_pb2.MODEL_STATE_UNLOADED:
        return render.unloaded_text(model)
    return render.model_details(model)


def cmd_unload(client: Client, args: argparse.Namespace) -> int:
    return _mutate(
        client,
        args,
        lambda: client.unload_model(
            args.model_id, wait=args.wait, request_id=args.request_id, force=args.force
        ),
        lambda model: models_pb2.UnloadModelResponse(model=model),
        _unloaded,
    )


def cmd_watch(client: Client, args: argparse.Namespace) -> int:
    """Print every message until Ctrl-C (exit 0). The daemon ending the stream
    (it stops) or dropping it is said on stderr, exit 3: a script watching
    must not take the end of the daemon for the end of the story."""
    watch = client.watch_models(args.model_id)
    try:
        for response in watch:
            if args.json:
                _print(
                    json_format.MessageToJson(
                        response, indent=None, preserving_proto_field_name=True
                    )
                )
                continue
            now = datetime.datetime.now().strftime("%H:%M:%S")
            for line in render.event_lines(response):
                _print(f"{now}  {line}")
    except KeyboardInterrupt:
        return 0
    finally:
        watch.cancel()
    print(
        "torporctl: error: torpord ended the watch (shutting down or restarting?):"
        f" {client.target}",
        file=sys.stderr,
    )
    return EXIT_UNAVAILABLE


HANDLERS: dict[str, Handler] = {
    "node": cmd_node,
    "list": cmd_list,
    "get": cmd_get,
    "load": cmd_load,
    "sleep": cmd_sleep,
    "wake": cmd_wake,
    "offload": cmd_offload,
    "unload": cmd_unload,
    "watch": cmd_watch,
}
