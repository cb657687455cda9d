"""rlhfkit: align language models with human preferences.

Data flow: data -> models -> rollout -> losses -> training loops -> eval -> CLI.
Nothing runs at import time; stages are plain functions (see rlhfkit.train).
"""

__version__ = "0.1.0"
