"""An example engine: serves text generation from a TinyLM whose weights are
the daemon's, and keeps serving through Sleep and Wake.

    python -m torpor.examples.tinylm ~/models/tiny        # a checkpoint
    torporctl load tiny ~/models/tiny/model.safetensors
    python -m torpor.examples.engine tiny --port 8000
    curl -s localhost:8000/generate -d '{"prompt": "Hello", "max_tokens": 16}'
    torporctl sleep tiny; torporctl wake tiny             # and ask again

The engine attaches once: the weights are mapped at fixed addresses and the
module's parameters are views on them. While the model sleeps, requests wait
(up to --wait seconds) and are answered as soon as it wakes; with a
progressive wake the first layers already run while the last are coming back.

POST /generate {"prompt": str, "max_tokens": int} -> {"text": str, "tokens": [int]}
GET  /health -> {"model": str, "attached": bool, "ready": bool, "served": int}
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc

from torpor.agent import AttachedModel, attach
from torpor.agent.modules import empty_parameters, load_module, wait_hooks
from torpor.client import Client
from torpor.errors import TorporError
from torpor.examples.tinylm import TinyConfig, TinyLM, decode, encode, generate

MAX_TOKENS = 256


class Engine:
    def __init__(self, attached: AttachedModel, *, wait: float) -> None:
        self.attached = attached
        self.wait = wait
        state = attached.state_dict()
        with empty_parameters():
            self.model = TinyLM(TinyConfig.from_state_dict(state))
        load_module(self.model, attached)
        self.hooks = wait_hooks(self.model, attached, timeout=wait)
        self.lock = threading.Lock()  # one generation at a time: it is a tiny demo
        self.served = 0
        attached.on_quiesce(lambda layers: _say("quiesce", layers=layers or "all"))
        attached.on_resume(lambda layers: _say("resume", layers=len(layers)))

    def generate(self, prompt: str, max_tokens: int) -> list[int]:
        with self.lock:
            while True:
                try:
                    with self.attached.use(wait=False, timeout=self.wait):
                        tokens = generate(self.model, encode(prompt), max_tokens)
                    self.served += 1
                    return tokens
                except TorporError as err:
                    if err.reason != "WEIGHTS_WITHDRAWN":
                        raise
                    # Taken away mid-request (a sleep): wait for them and retry.


def _say(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), file=sys.stderr, flush=True)


def _handler(engine: Engine) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/health":
                return self._reply(HTTPStatus.NOT_FOUND, {"error": "GET /health"})
            a = engine.attached
            self._reply(
                HTTPStatus.OK,
                {
                    "model": a.model_id,
                    "attached": a.ended is None,
                    "ready": a.ended is None and a.ready(),
                    "served": engine.served,
                },
            )

        def do_POST(self) -> None:
            if self.path != "/generate":
                return self._reply(HTTPStatus.NOT_FOUND, {"error": "POST /generate"})
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                prompt = body["prompt"]
                max_tokens = int(body.get("max_tokens", 16))
                if not isinstance(prompt, str) or not 0 <= max_tokens <= MAX_TOKENS:
                    raise ValueError
            except (ValueError, KeyError, TypeError):
                return self._reply(
                    HTTPStatus.BAD_REQUEST,
                    {"error": f'send {{"prompt": str, "max_tokens": 0..{MAX_TOKENS}}}'},
                )
            try:
                tokens = engine.generate(prompt, max_tokens)
            except TorporError as err:
                status = (
                    HTTPStatus.GATEWAY_TIMEOUT
                    if err.code is grpc.StatusCode.DEADLINE_EXCEEDED
                    else HTTPStatus.SERVICE_UNAVAILABLE
                )
                return self._reply(status, {"error": err.message, "reason": err.reason})
            self._reply(HTTPStatus.OK, {"text": decode(tokens), "tokens": tokens})

        def _reply(self, status: HTTPStatus, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m torpor.examples.engine", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("model_id")
    parser.add_argument("--socket", default=None, help="torpord's socket (default: as torporctl)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument(
        "--wait", type=float, default=300.0, help="how long a request waits for a wake (seconds)"
    )
    args = parser.parse_args(argv)
    client = Client(socket=args.socket) if args.socket else Client()
    try:
        attached = attach(args.model_id, client=client, engine="torpor-example")
    except TorporError as err:
        print(f"engine: cannot attach to {args.model_id!r}: {err}", file=sys.stderr)
        return 1
    engine = Engine(attached, wait=args.wait)
    server = ThreadingHTTPServer((args.host, args.port), _handler(engine))
    port = server.server_address[1]
    url = f"http://{args.host}:{port}"
    print(json.dumps({"listening": url, "model": args.model_id}), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        attached.close()
        client.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
