"""An engine for the policy tests: attaches to a model and, asked to let go
of its weights, holds the daemon's transition until told to release it.

    python holder_engine.py SOCKET MODEL

It prints {"ready": true}, then {"event": "quiesce"} when asked to let go.
Commands on stdin: "release" (let go now, and at once from then on), "quit".
No torch: it maps the weights and never runs anything on them.
"""

from __future__ import annotations

import json
import sys
import threading

from torpor import Client
from torpor.agent import attach


def say(value: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(value) + "\n")
    sys.stdout.flush()


def main() -> None:
    socket, model_id = sys.argv[1:3]
    client = Client(socket=socket)
    attached = attach(model_id, client=client, engine="holder")
    gate = threading.Event()

    @attached.on_quiesce
    def hold(layers: list[str]) -> None:
        say({"event": "quiesce"})
        gate.wait()

    say({"ready": True})
    for line in sys.stdin:
        command = line.strip()
        if command == "release":
            gate.set()
            say({"released": True})
        elif command == "quit":
            break
    gate.set()
    attached.close()
    client.close()


if __name__ == "__main__":
    main()
