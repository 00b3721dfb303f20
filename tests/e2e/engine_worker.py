"""An engine process for the tests: attaches to a TinyLM, runs forward passes
in a loop on a thread, and answers commands on stdin with JSON lines.

    python engine_worker.py SOCKET MODEL [--stall] [--events]

--stall   its on_quiesce callback never returns (a hung engine)
--events  print {"event": "quiesce"|"resume", ...} lines as they happen
--short   run a 4-token prompt (for a model with a big head)

Commands: "fresh" (wait for a forward pass that starts after the command, then
print {"forwards": n}), "report" (print what it saw), "touch" (read every
weight now, outside use(): a revoked engine dies of it), "quit".
"""

from __future__ import annotations

import collections
import hashlib
import json
import sys
import threading
import time

import torch
from torpor import Client
from torpor.agent import attach
from torpor.agent.modules import empty_parameters, load_module, wait_hooks
from torpor.errors import TorporError
from torpor.examples.tinylm import TinyConfig, TinyLM

PROMPT = list(b"Torpor keeps weights where engines expect them")


def digest(logits: torch.Tensor) -> str:
    return hashlib.sha256(logits.contiguous().numpy().tobytes()).hexdigest()[:16]


def say(value: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(value) + "\n")
    sys.stdout.flush()


def main() -> None:
    socket, model_id = sys.argv[1:3]
    stall = "--stall" in sys.argv
    events = "--events" in sys.argv
    # --short: a 4-token prompt, for models whose head is big
    prompt = torch.tensor([PROMPT[:4] if "--short" in sys.argv else PROMPT])
    torch.set_num_threads(1)
    client = Client(socket=socket)
    attached = attach(model_id, client=client, engine="worker")
    with empty_parameters():
        model = TinyLM(TinyConfig.from_state_dict(attached.state_dict()))
    load_module(model, attached)
    wait_hooks(model, attached)
    last = attached.layers[-1]
    seen: collections.Counter[str] = collections.Counter()
    progressive = 0  # forward passes whose first block ran before the last layer was back
    withdrawn = 0
    forwards = 0
    cond = threading.Condition()

    def first_block(_module: object, _args: object) -> None:
        nonlocal progressive
        if not attached.ready(last):
            progressive += 1

    # Registered after wait_hooks: it runs once block 0's own layer is back.
    model.model.layers[0].register_forward_pre_hook(first_block)

    if stall:
        attached.on_quiesce(lambda layers: time.sleep(3600))
    if events:
        attached.on_quiesce(lambda layers: say({"event": "quiesce", "layers": layers}))
        attached.on_resume(lambda layers: say({"event": "resume", "layers": layers}))

    def loop() -> None:
        nonlocal withdrawn, forwards
        while True:
            try:
                with attached.use(wait=False), torch.inference_mode():
                    logits = model(prompt)
                seen[digest(logits)] += 1
                with cond:
                    forwards += 1
                    cond.notify_all()
            except TorporError as err:
                if err.reason != "WEIGHTS_WITHDRAWN":
                    say({"event": "ended", "reason": err.reason})
                    return
                withdrawn += 1

    threading.Thread(target=loop, daemon=True).start()
    with cond:
        cond.wait_for(lambda: forwards > 0, timeout=60)
    say({"ready": True, "layers": attached.layers})
    for line in sys.stdin:
        command = line.strip()
        if command == "fresh":
            with cond:
                target = forwards + 2  # the one running now may have begun before
                ok = cond.wait_for(lambda t=target: forwards >= t, timeout=60)
            say({"forwards": forwards, "ok": ok})
        elif command == "report":
            say(
                {
                    "digests": dict(seen),
                    "forwards": forwards,
                    "withdrawn": withdrawn,
                    "progressive": progressive,
                    "ended": attached.ended.reason if attached.ended else None,
                }
            )
        elif command == "touch":
            total = sum(float(t.float().sum()) for t in attached.state_dict().values())
            say({"touched": total})
        elif command == "quit":
            break
    attached.close()
    client.close()


if __name__ == "__main__":
    main()
