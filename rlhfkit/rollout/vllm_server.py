"""The vLLM side of `rollout.vllm_engine.VLLMGenerator`: one vLLM engine, driven over a local socket.

This file runs under the Python interpreter that has vLLM (`vllm_python`; often its own virtual
environment, since vLLM pins a transformers version of its own). It imports nothing from rlhfkit
(the trainer copies it next to nothing else and runs it by path), only the standard library,
torch, safetensors and vLLM.

    python -m rlhfkit_vllm_server SOCKET_PATH ENGINE_JSON     (authkey in $RLHFKIT_VLLM_AUTHKEY, hex)

It listens on the Unix socket SOCKET_PATH (only the trainer, which knows the authkey, can connect),
builds `vllm.LLM(**ENGINE_JSON)` with random ("dummy") weights, says ("ready", vllm version), then
answers requests one at a time:

    ("load", path)            load the safetensors file `path` into the model (HF parameter names),
                              reset the prefix cache (its KV entries came from the old weights)
                              -> ("ok", tensors loaded)
    ("generate", prompts, params)   prompts: token-id lists; params: one `vllm.SamplingParams`
                              keyword dict per prompt -> ("ok", [(token_ids, logprobs or None,
                              finish_reason), ...]) one per prompt, in order
    ("close",)                exit

An exception while answering is sent back as ("error", traceback text).
"""

from __future__ import annotations

import json
import os
import sys
import traceback


MODULE = "rlhfkit_vllm_server"
"""The name this file is copied to and run as (`python -m`), so vLLM's worker can import `WeightSync`."""


class WeightSync:
    """vLLM `worker_extension_cls`: its methods become the worker's, called by `LLM.collective_rpc`."""

    def rlhfkit_load_weights(self, path: str) -> int:
        from safetensors.torch import load_file

        weights = load_file(path)
        # in place, through vLLM's reload path: it restores the layouts its kernels repacked at start
        # (the CPU build packs linear weights and drops the originals) and re-processes them
        self.reload_weights(weights_iterator=iter(weights.items()), is_checkpoint_format=True)
        refresh_cpu_kernels(self.model_runner.model)
        return len(weights)


def refresh_cpu_kernels(model) -> int:
    """Re-pack the CPU GEMM kernel of every layer that keeps its weight next to a packed copy (the
    embedding and the LM head; vLLM's CPU linear layers drop theirs). The reload re-packs only the
    layers whose weights it loaded, and an LM head tied to the embedding loads none (its weight is
    the embedding's), so without this it would keep computing with the start-up weights."""
    import torch

    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return 0
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    n = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if hasattr(module, "cpu_linear") and isinstance(weight, torch.Tensor) and weight.ndim == 2 and weight.numel():
            dispatch_cpu_unquantized_gemm(module, remove_weight=False)
            n += 1
    return n


def answer(llm, msg):
    kind = msg[0]
    if kind == "load":
        n = llm.collective_rpc("rlhfkit_load_weights", args=(msg[1],))[0]
        llm.reset_prefix_cache()
        return n
    if kind == "generate":
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts, params = msg[1], msg[2]
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                            [SamplingParams(**kw) for kw in params], use_tqdm=False)
        result = []
        for out in outs:
            c = out.outputs[0]
            logps = None
            if c.logprobs is not None:
                logps = [step[t].logprob for step, t in zip(c.logprobs, c.token_ids)]
            result.append((list(c.token_ids), logps, c.finish_reason))
        return result
    raise ValueError(f"unknown request {kind!r}")


def main() -> None:
    from multiprocessing.connection import Listener

    address, engine = sys.argv[1], json.loads(sys.argv[2])
    authkey = bytes.fromhex(os.environ.pop("RLHFKIT_VLLM_AUTHKEY"))
    with Listener(address, family="AF_UNIX", authkey=authkey) as listener, listener.accept() as conn:
        try:
            import vllm

            llm = vllm.LLM(**engine, worker_extension_cls=f"{MODULE}.WeightSync")
        except BaseException:
            conn.send(("error", traceback.format_exc()))
            raise
        conn.send(("ready", vllm.__version__))
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):  # the trainer is gone
                break
            if msg[0] == "close":
                break
            try:
                conn.send(("ok", answer(llm, msg)))
            except Exception:
                conn.send(("error", traceback.format_exc()))


if __name__ == "__main__":
    main()
