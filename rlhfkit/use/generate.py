"""`rlhfkit generate MODEL PROMPTS OUT.jsonl`: sample responses to every prompt of a prompt file.

PROMPTS is any data file or dataset `load_rows` reads, in any format with a prompt (prompt,
prompt_completion, preference, ranking, unpaired; a `messages`/alpaca conversation's prompt is
everything before its last assistant turn). String prompts are used as they are (BOS added when
the tokenizer adds one), message lists through the model's chat template.

OUT.jsonl gets one line per prompt row, in row order:

    {...the row's extra columns, "row": i, "source": "prompts.jsonl:line 3", "prompt": P,
     "responses": [str, ...], "finish_reasons": ["stop" | "length", ...],
     "prompt_tokens": int, "response_tokens": [int, ...]}

"stop": the response ended with EOS (or a --stop string); "length": it ran out of max_new_tokens.

Resuming: rows already in OUT.jsonl are not generated again, and the rest come out as they would
have in an uninterrupted run: every sample draws from its own generator seeded by (seed, row,
sample) (`sample_seed`), never from a stream shared by a batch; batches are fixed slices of the
row indices and are written whole, so a resumed batch holds the rows it held before. The settings
are kept next to OUT (OUT.settings.json); resuming with other settings is an error.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from rlhfkit.data.sources import jsonl_lines
from rlhfkit.errors import ConfigError, DataError

_CANONICAL_KEYS = {"_source", "prompt", "completion", "chosen", "rejected", "margin", "responses", "label",
                   "messages"}


@dataclass
class GenerateOptions:
    """Sampling and batching of `generate_file`. temperature 0 is greedy decoding."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    num_return_sequences: int = 1
    seed: int = 0
    batch_size: int = 16
    stop: tuple[str, ...] = ()
    max_prompt_length: int | None = None
    vllm_python: str | None = None
    """Sample with vLLM, run by this interpreter (`rollout.vllm_engine.VLLMGenerator`); None: rlhfkit's sampler."""

    def sampling_params(self):
        from rlhfkit.rollout.generate import SamplingParams

        return SamplingParams.with_greedy_at_zero(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                                  top_k=self.top_k, top_p=self.top_p, stop=tuple(self.stop))


def sample_seed(seed: int, row: int, sample: int) -> int:
    """The generator seed of sample `sample` of prompt row `row`: a function of these three alone
    (a hash, so nearby rows get unrelated streams)."""
    digest = hashlib.blake2b(f"{seed}:{row}:{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # torch seeds are < 2**64; keep it positive in int64


def read_prompts(spec: str) -> list[tuple[str | list[dict], dict, str]]:
    """(prompt, extra columns, source) per row of a prompt file. Bad rows -> DataError naming
    file and line (from `load_rows` / `to_canonical`)."""
    from rlhfkit.data.formats import conversation_prompt, to_canonical
    from rlhfkit.data.sources import load_rows

    rows = to_canonical(load_rows(spec))
    if not rows:
        raise DataError("no rows", source=spec)
    out = []
    for row in rows:
        source = row.get("_source") or spec
        if "prompt" in row:
            prompt = row["prompt"]
        elif "messages" in row:  # a whole conversation: its prompt is everything before the last reply
            prompt, _ = conversation_prompt(row["messages"], source)
        else:
            raise DataError("rows in 'text' format have no prompt; give prompt rows (a `prompt` column) "
                            "or conversations", source=source)
        out.append((prompt, {k: v for k, v in row.items() if k not in _CANONICAL_KEYS}, source))
    return out


def _existing_rows(out_path: Path, prompts: list) -> dict[int, dict]:
    """Rows already in OUT (a run that stopped): index -> row. A half-written last line (the run
    was killed while writing) is cut off; any other bad line, or a row whose prompt differs from
    PROMPTS, is an error."""
    if not out_path.is_file():
        return {}
    lines = jsonl_lines(out_path.read_text(encoding="utf-8"), keepends=True)
    done: dict[int, dict] = {}
    keep = 0
    for lineno, line in enumerate(lines, start=1):
        source = f"{out_path}:line {lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if lineno == len(lines) and not line.endswith("\n"):
                print(f"[generate] {source}: half-written line from an interrupted run, generating it again")
                break
            raise DataError(f"invalid JSON ({e.msg}); not an output of `rlhfkit generate`?",
                            source=source) from None
        i = row.get("row") if isinstance(row, dict) else None
        if not isinstance(i, int) or not 0 <= i < len(prompts) or "responses" not in row:
            raise DataError("not a row of `rlhfkit generate` for this prompt file (bad or missing `row`)",
                            source=source)
        if row.get("prompt") != prompts[i][0]:
            raise DataError(f"its prompt differs from row {i} of the prompt file ({prompts[i][2]}); "
                            "OUT belongs to another prompt file: pass --overwrite or another OUT",
                            source=source)
        done[i] = row
        keep += len(line.encode("utf-8"))
    if keep != out_path.stat().st_size:
        with out_path.open("r+b") as f:
            f.truncate(keep)
    return done


def _check_settings(out_path: Path, settings: dict, overwrite: bool) -> None:
    path = out_path.with_name(out_path.name + ".settings.json")
    if out_path.is_file() and path.is_file() and not overwrite:
        before = json.loads(path.read_text())
        changed = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
        if changed:
            what = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise ConfigError(f"{out_path} was generated with other settings ({what}); resume with the same "
                              "settings, or pass --overwrite to start over")
    path.write_text(json.dumps(settings, indent=2) + "\n")


def generate_file(model, tokenizer, prompts_spec: str, out_path, options: GenerateOptions, *,
                  reference: str = "", overwrite: bool = False, quiet: bool | None = None, sampler=None) -> dict:
    """Write OUT (see the module docstring); returns {"rows", "generated", "resumed", "stop", "length"}.
    `sampler`: a running sampler to use and leave open (an `HFGenerator`, or a `VLLMGenerator` when
    `options.vllm_python` is set); default: one built from `options`, closed at the end."""
    from contextlib import closing, nullcontext

    from rlhfkit.models.load import require_chat_template
    from rlhfkit.rollout.generate import HFGenerator, check_sampling_params
    from rlhfkit.rollout.rollout import encode_prompts
    from rlhfkit.train.tracking import progress

    params = options.sampling_params()
    try:
        check_sampling_params(params, options.num_return_sequences)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if options.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {options.batch_size}")
    prompts = read_prompts(prompts_spec)
    chat = next((source for prompt, _, source in prompts if not isinstance(prompt, str)), None)
    if chat is not None:
        require_chat_template(tokenizer, reference, chat)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if overwrite and out_path.exists():
        out_path.unlink()
    _check_settings(out_path, {"model": reference, "prompts": str(prompts_spec), **asdict(options),
                               "stop": list(options.stop)}, overwrite)
    done = _existing_rows(out_path, prompts)

    # encode every prompt (all of them: a bad one fails before any sampling)
    rows = [{"prompt": p, "_i": i} for i, (p, _, _) in enumerate(prompts)]
    ids, kept, _ = encode_prompts(tokenizer, rows, 10**9)  # kept: the rows with a non-empty prompt
    encoded: list[list[int] | None] = [None] * len(prompts)
    for row_ids, row in zip(ids, kept):
        encoded[row["_i"]] = row_ids
    context = getattr(model.config, "max_position_embeddings", None)
    truncated = set()
    for i, row_ids in enumerate(encoded):
        source = prompts[i][2]
        if not row_ids:
            raise DataError("the prompt is empty (no tokens)", source=source, field="prompt")
        if options.max_prompt_length and len(row_ids) > options.max_prompt_length:
            encoded[i] = row_ids[-options.max_prompt_length:]  # keep the end, as the online stages do
            truncated.add(i)
        if context and len(encoded[i]) + options.max_new_tokens > context:
            raise DataError(f"the prompt is {len(encoded[i])} tokens; with max_new_tokens="
                            f"{options.max_new_tokens} that exceeds the model's context of {context} tokens "
                            "(pass --max-prompt-length to keep the prompt's end, or fewer --max-new-tokens)",
                            source=source)

    own = sampler is None
    if own and options.vllm_python:
        from rlhfkit.rollout.vllm_engine import VLLMGenerator

        sampler = VLLMGenerator.for_model(model, tokenizer, options.vllm_python, encoded, options.max_new_tokens,
                                          log_path=str(out_path) + ".vllm.log")
    elif own:
        sampler = HFGenerator(tokenizer, batch_size=options.batch_size)
    elif isinstance(sampler, HFGenerator) == bool(options.vllm_python):
        raise ConfigError(f"generate_file: the sampler given is a {type(sampler).__name__}, but options.vllm_python "
                          f"is {options.vllm_python!r}: they name different engines")
    G = options.num_return_sequences
    counts = {"stop": 0, "length": 0}
    bar = progress(total=len(prompts), initial=len(done), disable=quiet, desc="generate", unit="prompt")
    with out_path.open("a", encoding="utf-8") as f, closing(sampler) if own else nullcontext():
        for start in range(0, len(prompts), options.batch_size):
            todo = [i for i in range(start, min(start + options.batch_size, len(prompts))) if i not in done]
            if not todo:
                continue
            gen = sampler.generate(model, [encoded[i] for i in todo], params, num_generations=G,
                                   sample_seeds=[sample_seed(options.seed, i, g)
                                                 for i in todo for g in range(G)])
            lengths = gen.response_mask.sum(-1).tolist()
            for k, i in enumerate(todo):
                prompt, extras, source = prompts[i]
                rows = range(k * G, (k + 1) * G)
                reasons = ["stop" if gen.ended[r] else "length" for r in rows]
                for reason in reasons:
                    counts[reason] += 1
                line = {**extras, "row": i, "source": source, "prompt": prompt,
                        "responses": [gen.texts[r] for r in rows], "finish_reasons": reasons,
                        "prompt_tokens": len(encoded[i]), "response_tokens": [int(lengths[r]) for r in rows]}
                if i in truncated:
                    line["prompt_truncated"] = True
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
            f.flush()
            bar.update(len(todo))
    bar.close()
    generated = len(prompts) - len(done)
    return {"rows": len(prompts), "generated": generated, "resumed": len(done), **counts,
            "truncated_prompts": len(truncated)}


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Options every use command shares: how to load MODEL."""
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--chat-template", default=None, metavar="TEMPLATE",
                        help="for a model without one: `chatml` (rlhfkit's default), a Jinja file or text")
    parser.add_argument("--trust-remote-code", action="store_true")


def load_model_from_args(reference: str, args):
    import torch

    from rlhfkit.models.load import load_for_use

    return load_for_use(reference, device=args.device, trust_remote_code=args.trust_remote_code,
                        dtype=getattr(torch, args.dtype), chat_template=args.chat_template)


def run_generate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rlhfkit generate", description=(
        "sample responses to every prompt of PROMPTS with MODEL; one JSON line per prompt in OUT "
        "(an interrupted run continues where it stopped)"))
    parser.add_argument("model", help="run output directory (full model or LoRA adapter), hub id, .gguf "
                        "or pkg:")
    parser.add_argument("prompts", help="prompt file (.jsonl/.json/.csv/.parquet), saved dataset or hub id")
    parser.add_argument("out", help="output JSONL")
    d = GenerateOptions()
    parser.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=d.temperature, help="0: greedy decoding")
    parser.add_argument("--top-p", type=float, default=d.top_p, help="nucleus sampling (1: off)")
    parser.add_argument("--top-k", type=int, default=d.top_k, help="0: off")
    parser.add_argument("--num-return-sequences", "-n", type=int, default=d.num_return_sequences,
                        help="responses per prompt")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="prompts sampled together")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="also end a response at TEXT (kept; repeatable)")
    parser.add_argument("--max-prompt-length", type=int, default=None,
                        help="keep only the last N prompt tokens (default: a prompt that does not fit is "
                        "an error)")
    parser.add_argument("--overwrite", action="store_true", help="start over instead of resuming OUT")
    parser.add_argument("--vllm-python", default=None, metavar="PYTHON",
                        help="sample with vLLM, run by this interpreter (`make vllm`: .venv-vllm/bin/python); "
                        "default: rlhfkit's own sampler")
    add_model_args(parser)
    args = parser.parse_args(argv)
    if args.vllm_python:  # before the model loads
        from rlhfkit.rollout.vllm_engine import check_vllm_python

        check_vllm_python(args.vllm_python)
    options = GenerateOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_p=args.top_p, top_k=args.top_k,
                              num_return_sequences=args.num_return_sequences,
                              seed=args.seed, batch_size=args.batch_size, stop=tuple(args.stop),
                              max_prompt_length=args.max_prompt_length, vllm_python=args.vllm_python)
    read_prompts(args.prompts)  # a bad prompt file fails before the model loads
    model, tokenizer = load_model_from_args(args.model, args)
    result = generate_file(model, tokenizer, args.prompts, args.out, options, reference=args.model,
                           overwrite=args.overwrite)
    resumed = f" ({result['resumed']} were already there)" if result["resumed"] else ""
    cut = result["truncated_prompts"]
    print(f"[generate] {result['rows']} prompts{resumed}; generated {result['generated']}: "
          f"{result['stop']} responses ended (stop), {result['length']} hit max_new_tokens (length)"
          + (f"; {cut} prompts cut to --max-prompt-length" if cut else "") + f" -> {args.out}")
    return 0
