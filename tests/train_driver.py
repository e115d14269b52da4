"""``crowd train`` with test-side hooks, for tests that need a slow or observable run.

    python tests/train_driver.py '{"step_delay": 0.25, "save_ranks": true}' ARGS...

``step_delay``: seconds of sleep after every optimiser step (time for a test to act mid-epoch).
``save_ranks``: every process writes its weights to ``OUT/rank<r>.pt`` after every step (the last
write holds its final weights), to check that distributed processes agree. The hooks go in
through the documented ``on_step`` argument of :func:`helpers.tools.trainer.train`; the run
itself goes through ``python -m helpers train`` (helpers/__main__.py), so
``torchrun tests/train_driver.py ...`` takes the same path as ``torchrun -m helpers train``.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import time
from pathlib import Path


def main() -> None:
    hooks = json.loads(sys.argv[1])
    from helpers.tools import trainer
    from helpers.tools.checkpoints import save_checkpoint

    real_train = trainer.train

    def train(config, callback=None, **kwargs):
        out, rank = Path(config.resolved().out), int(os.environ.get("RANK", "0"))

        def on_step(model, step):
            time.sleep(float(hooks.get("step_delay", 0.0)))
            if hooks.get("save_ranks"):
                save_checkpoint(out / f"rank{rank}.pt", {"model": model.state_dict(), "rank": rank})

        return real_train(config, callback, on_step=on_step, **kwargs)

    trainer.train = train
    sys.argv = ["helpers", "train", *sys.argv[2:]]
    runpy.run_module("helpers", run_name="__main__")


if __name__ == "__main__":
    main()
