"""Runs the stages a JSON file lists (tests/helpers.launched_run) one after another in this process,
under the engine of the launch that started it: each as `rlhfkit STAGE CONFIG` would run it, with a
fresh accelerate state built from the launch's environment (the process group stays up), and with its
own environment variables set only while it runs. Then tears the process group down, as the CLI does.

    accelerate launch --config_file configs/accelerate/zero3.yaml tests/launch_batch.py jobs.json
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path


def main(path: str) -> int:
    from accelerate.state import AcceleratorState

    from rlhfkit.cli import stage_function
    from rlhfkit.config import load_config
    from rlhfkit.train.engine import end_distributed

    for i, job in enumerate(json.loads(Path(path).read_text())):
        if i:
            AcceleratorState._reset_state(reset_partial_state=False)
        saved = {k: os.environ.get(k) for k in job["env"]}
        os.environ.update(job["env"])
        try:
            stage_function(job["stage"])(load_config(job["stage"], job["config"], []))
        except BaseException:
            print(f"launch_batch: job {job['name']} ({job['stage']}, {job['config']}) failed", file=sys.stderr)
            raise
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        gc.collect()
    end_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
