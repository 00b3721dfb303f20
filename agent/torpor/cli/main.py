"""torporctl: drive torpord from a shell.

Exit codes: 0 success, 1 the daemon refused or failed the request, 2 usage
error, 3 the daemon could not be reached (or, for watch, went away), 4 the
socket's directory is unsafe (someone else could have put their socket
there; nothing was sent), 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence

import grpc

from torpor.cli.catalogue import HANDLERS as CATALOGUE_HANDLERS
from torpor.cli.catalogue import add_commands, add_policy_flags
from torpor.cli.commands import EXIT_INTERRUPTED, EXIT_UNAVAILABLE, HANDLERS
from torpor.cli.stats import HANDLERS as STATS_HANDLERS
from torpor.cli.stats import add_command as add_stats_command
from torpor.client import Client
from torpor.errors import TorporError
from torpor.transport import UNSAFE_SOCKET_DIR

__all__ = [
    "EXIT_ERROR",
    "EXIT_OK",
    "EXIT_UNAVAILABLE",
    "EXIT_UNSAFE_SOCKET",
    "EXIT_USAGE",
    "build_parser",
    "main",
]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNSAFE_SOCKET = 4

PROG = "torporctl"

_EPILOG = """\
The socket defaults to $TORPOR_SOCKET, else /run/torpor/torpor.sock for root,
else $XDG_RUNTIME_DIR/torpor/torpor.sock, else /tmp/torpor-$UID/torpor.sock.
Its directory must be owned by you or root (or be one root made for torpord's
user, like /run/torpor) and not be writable by group or others.
Over TCP (--address), give the credentials torpord asks for: --token-file (or
$TORPOR_TOKEN_FILE), and/or --cacert (TLS) with --cert and --key (mutual TLS).

exit codes: 0 ok, 1 request failed in torpord (or refused: UNAUTHENTICATED),
2 usage error, 3 torpord unreachable (watch: torpord went away), 4 unsafe
socket directory (nothing sent), 130 interrupted.
"""


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _add_global_options(parser: argparse.ArgumentParser, *, in_subcommand: bool) -> None:
    """The global flags, accepted before or after the command.

    In a subcommand their defaults are SUPPRESS, so an absent flag there does
    not overwrite one given before the command.
    """

    def default(value: object) -> object:
        return argparse.SUPPRESS if in_subcommand else value

    group = parser.add_argument_group("connection and output")
    target = group.add_mutually_exclusive_group()
    target.add_argument(
        "--socket", metavar="PATH", default=default(None), help="torpord's Unix socket"
    )
    target.add_argument(
        "--address", metavar="HOST:PORT", default=default(None), help="torpord's TCP address"
    )
    for flag, metavar, text in (
        (
            "--token-file",
            "PATH",
            "--address: a file holding torpord's bearer token (default: $TORPOR_TOKEN_FILE)",
        ),
        ("--cacert", "PATH", "--address: TLS, trusting this CA for torpord's certificate"),
        ("--cert", "PATH", "--address: mutual TLS, this client certificate (with --key)"),
        ("--key", "PATH", "--address: mutual TLS, the client certificate's private key"),
    ):
        group.add_argument(flag, metavar=metavar, default=default(None), help=text)
    group.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print the response as JSON (as grpcurl does); watch: one object per line",
    )
    group.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_positive_float,
        default=default(None),
        help="deadline of each call, waits included (default: none; not applied to watch)",
    )


def _add_mutation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-wait",
        dest="wait",
        action="store_false",
        help="return at once with the model in its transitional state",
    )
    parser.add_argument(
        "--request-id",
        metavar="ID",
        default="",
        help="idempotency key: a retry with the same id returns the first call's result",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Drive torpord: load, sleep, wake, offload and unload model weights.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_global_options(parser, in_subcommand=False)
    common = argparse.ArgumentParser(add_help=False)
    _add_global_options(common, in_subcommand=True)

    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=help, parents=[common])

    command("node", "show the node: devices, host pool, disk cache")
    listing = command("list", "list every model")
    listing.add_argument(
        "--registered",
        action="store_true",
        help="also the catalogue's models that are not loaded (unloaded)",
    )

    get = command("get", "show one model and where each of its layers is")
    get.add_argument("model_id", metavar="MODEL_ID")
    get.add_argument("--full", action="store_true", help="also list every tensor")

    load = command("load", "load a checkpoint (a .safetensors file or a directory)")
    load.add_argument("model_id", metavar="MODEL_ID")
    load.add_argument(
        "source",
        metavar="SOURCE",
        nargs="?",
        default="",
        help="path; relative paths are made absolute (none: a registered model's)",
    )
    load.add_argument("--device", metavar="UUID", default="", help="default: the freest device")
    load.add_argument(
        "--host",
        action="store_true",
        help="preload into the host pool only (the model is asleep at level 1)",
    )
    add_policy_flags(load)
    _add_mutation_options(load)

    sleep = command("sleep", "free a model's device memory")
    sleep.add_argument("model_id", metavar="MODEL_ID")
    sleep.add_argument(
        "--level",
        type=int,
        choices=(1, 2),
        default=1,
        help="1: keep the weights in host memory (default); 2: discard them",
    )
    sleep.add_argument(
        "--disk-copy",
        action="store_true",
        help="level 2: keep a copy in the disk cache, so wake needs no source",
    )
    _add_mutation_options(sleep)

    wake = command("wake", "bring a model's layers back to its device")
    wake.add_argument("model_id", metavar="MODEL_ID")
    wake.add_argument(
        "--verify", action="store_true", help="check each slab against its checksum on arrival"
    )
    _add_mutation_options(wake)

    offload = command("offload", "move layers of an awake model between device, host and disk")
    offload.add_argument("model_id", metavar="MODEL_ID")
    offload.add_argument(
        "layers", metavar="LAYER", nargs="*", help="pre, layers.N, post (default: every layer)"
    )
    offload.add_argument(
        "--tier",
        choices=("host", "device", "disk"),
        default="host",
        help="where to (default: host)",
    )
    offload.add_argument(
        "--verify", action="store_true", help="--tier device: check each slab on arrival"
    )
    _add_mutation_options(offload)

    unload = command("unload", "free every slab of a model and forget it")
    unload.add_argument("model_id", metavar="MODEL_ID")
    unload.add_argument(
        "--force",
        action="store_true",
        help="cancel a transition in progress (a slow load, say) and unload once it rolled back",
    )
    _add_mutation_options(unload)

    watch = command(
        "watch", "print a snapshot, then every event, until Ctrl-C (or torpord stops: exit 3)"
    )
    watch.add_argument("model_id", metavar="MODEL_ID", nargs="?", default="")
    add_commands(command)
    add_stats_command(command)
    return parser


def _report(err: TorporError, args: argparse.Namespace) -> None:
    label = err.code.name if err.reason == err.code.name else f"{err.code.name} {err.reason}"
    lines = [f"{PROG}: error: {err.message} ({label})"]
    lines.extend(f"  {key}: {value}" for key, value in sorted(err.metadata.items()))
    if err.reason == UNSAFE_SOCKET_DIR:
        lines.append(
            "  hint: remove that directory if it is not torpord's, or pick the socket"
            " with --socket or $TORPOR_SOCKET"
        )
    elif err.code == grpc.StatusCode.UNIMPLEMENTED:
        lines.append("  hint: this torpord does not offer that call yet (an older version?)")
    elif err.code == grpc.StatusCode.UNAUTHENTICATED:
        lines.append(
            "  hint: give torpord's token with --token-file or $TORPOR_TOKEN_FILE"
            " (or use its Unix socket)"
        )
    elif err.unavailable and args.address is not None and args.cacert is not None:
        lines.append(
            "  hint: is torpord running? Over TLS it also ends the connection when it wants"
            " a client certificate (mutual TLS) and --cert gave none it accepts"
        )
    elif err.unavailable:
        lines.append("  hint: is torpord running? Pick its socket with --socket or $TORPOR_SOCKET")
    print("\n".join(lines), file=sys.stderr)


def _client(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Client:
    """The Client the flags ask for; exits 2 (argparse) for TCP flags without --address."""
    tcp_flags = {
        "--token-file": args.token_file,
        "--cacert": args.cacert,
        "--cert": args.cert,
        "--key": args.key,
    }
    given = [flag for flag, value in tcp_flags.items() if value is not None]
    if args.address is None:
        if given:
            parser.error(f"argument {given[0]}: only with --address (the socket needs none)")
        return Client(socket=args.socket, timeout=args.timeout)
    return Client(
        address=args.address,
        timeout=args.timeout,
        token_file=args.token_file or os.environ.get("TORPOR_TOKEN_FILE") or None,
        ca_cert=args.cacert,
        client_cert=args.cert,
        client_key=args.key,
    )


def _exit_code(err: TorporError) -> int:
    if err.reason == UNSAFE_SOCKET_DIR:
        return EXIT_UNSAFE_SOCKET
    return EXIT_UNAVAILABLE if err.unavailable else EXIT_ERROR


def _exit_status(code: str | int | None) -> int:
    if code is None:
        return EXIT_OK
    return code if isinstance(code, int) else EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """Run torporctl with `argv` (default: sys.argv[1:]); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.socket is not None and args.address is not None:
            parser.error("argument --address: not allowed with argument --socket")
        client = _client(args, parser)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return _exit_status(exc.code)
    except ValueError as exc:  # a bad credential combination or file
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except TorporError as err:  # an unsafe socket directory
        _report(err, args)
        return _exit_code(err)
    try:
        return {**HANDLERS, **CATALOGUE_HANDLERS, **STATS_HANDLERS}[args.command](client, args)
    except TorporError as err:
        _report(err, args)
        return _exit_code(err)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `torporctl list | head`: the reader left; that is not an error. Point
        # stdout at /dev/null so the flush at exit does not complain again.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
