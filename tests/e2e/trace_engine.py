"""An engine for the trace test: attached to a TinyLM, it runs one forward
pass per "run" command (inside use(), waiting for the weights) and prints its
logits' digest; the daemon may sleep and wake the model in between.

    python trace_engine.py SOCKET MODEL

Prints {"ready": true} once started; attaches on "attach" ({"attached":
true}, or {"error": reason} and another "attach" may follow); then per
command: "run" → {"digest": ...}, or
{"error": reason} (WEIGHTS_NOT_READY: they did not come back in time);
"report" → what it saw; "quit".
"""

from __future__ import annotations

import collections
import hashlib
import json
import sys

import torch
from torpor import Client
from torpor.agent import attach
from torpor.agent.modules import empty_parameters, load_module
from torpor.errors import TorporError
from torpor.examples.tinylm import TinyConfig, TinyLM

PROMPT = list(b"Torpor keeps weights where engines expect them")
WAIT = 10.0  # seconds a run waits for weights that went away to come back


def say(value: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(value) + "\n")
    sys.stdout.flush()


def main() -> None:
    socket, model_id = sys.argv[1:3]
    torch.set_num_threads(1)
    client = Client(socket=socket)
    say({"ready": True})  # (started: torch takes a while to import)
    for _ in sys.stdin:  # "attach": the caller has just made the model ready
        try:
            attached = attach(model_id, client=client, engine="trace")
            break
        except TorporError as err:
            say({"error": err.reason})
    else:
        return
    with empty_parameters():
        model = TinyLM(TinyConfig.from_state_dict(attached.state_dict()))
    load_module(model, attached)
    seen: collections.Counter[str] = collections.Counter()
    quiesced = resumed = 0

    def on_quiesce(layers: list[str]) -> None:
        nonlocal quiesced
        quiesced += 1

    def on_resume(layers: list[str]) -> None:
        nonlocal resumed
        resumed += 1

    attached.on_quiesce(on_quiesce)
    attached.on_resume(on_resume)
    say({"attached": True})
    for line in sys.stdin:
        command = line.strip()
        if command == "run":
            try:
                with attached.use(wait=True, timeout=WAIT), torch.inference_mode():
                    logits = model(torch.tensor([PROMPT]))
            except TorporError as err:  # (WEIGHTS_NOT_READY: they did not come back in time)
                say({"error": err.reason})
                continue
            digest = hashlib.sha256(logits.contiguous().numpy().tobytes()).hexdigest()[:16]
            seen[digest] += 1
            say({"digest": digest})
        elif command == "report":
            say(
                {
                    "digests": dict(seen),
                    "quiesced": quiesced,
                    "resumed": resumed,
                    "ended": attached.ended.reason if attached.ended else None,
                }
            )
        elif command == "quit":
            break
    attached.close()
    client.close()


if __name__ == "__main__":
    main()
