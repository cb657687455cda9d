"""`rlhfkit chat MODEL [--compare MODEL2]`: a terminal chat whose replies stream token by token.

The function API is `ChatSession` (history, commands, sampling settings; `respond` yields the
reply pieces as they are sampled); the terminal loop and `rlhfkit webchat` only display what it
yields.

Sampling is rlhfkit's own (`stream_tokens`: one row through a KV cache with the sampler's
`token_chooser`), not `model.generate` in a thread with a TextIteratorStreamer: the tokens are
exactly those `HFGenerator` (what `rlhfkit generate` and the RL stages use) samples for the same
seed and settings (tested), a private seeded generator makes a turn reproducible and lets both
models of --compare draw from the same seed, nothing runs in a second thread, and a model's own
`generation_config` (e.g. a repetition penalty) does not apply unseen.

History: the conversation goes through each model's chat template. Each model continues its own
conversation: both get the same system prompt, the same user messages and the same seed per
turn, and each sees its own earlier replies (so a pane or label shows exactly what that model saw);
`shared_history=True` (--shared-history) gives both models MODEL's replies instead. Nothing is
dropped to fit the context: a message that would not leave room for one reply token is refused
with a message saying so (/reset starts over), and a reply that reaches the context's end stops
there, saying so.

Completion mode (`completion=True`, --completion) is for models trained on plain-text prompts (the
built-in tasks' runs, e.g. `runs/demo/ppo`): each message is a fresh text prompt that the model
continues, with no chat template and no history.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from rlhfkit.errors import RlhfkitError
from rlhfkit.rollout.generate import SamplingParams, check_sampling_params, token_chooser

HELP = """commands:
  /reset                 forget the conversation (the system prompt stays)
  /system TEXT           set the system prompt (and start over); `/system` alone removes it
  /set KEY=VALUE ...     sampling: temperature (0: greedy), top_p, top_k (0: off), max_new_tokens, seed
  /set                   show the settings
  /help                  this text
  /exit                  quit (also Ctrl-D)"""

SETTINGS = {"temperature": float, "top_p": float, "top_k": int, "max_new_tokens": int, "seed": int}


class ContextFull(RlhfkitError):
    """The conversation no longer fits a model's context; nothing was added to the history."""


@torch.no_grad()
def stream_tokens(model, tokenizer, prompt_ids: list[int], params: SamplingParams,
                  seed: int | None = None, stop_ids: set[int] | None = None) -> Iterator[int]:
    """Sample one response to `prompt_ids`, yielding each token id as it is chosen (the stop token
    included, then it ends). The same tokens as `HFGenerator.generate(model, [prompt_ids], params,
    generator_seed=seed)` (same processors, same draws from a private generator seeded with `seed`).
    `stop_ids`: tokens that end the reply (default: the tokenizer's EOS)."""
    from transformers import DynamicCache

    check_sampling_params(params, 1)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    choose = token_chooser(params, tokenizer.pad_token_id, device, generator)
    stop_ids = stop_ids or {tokenizer.eos_token_id}
    cache = DynamicCache(config=model.config)
    ids = torch.tensor([prompt_ids], device=device)
    logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    for step in range(params.max_new_tokens):
        token = choose(logits)  # (1,)
        yield int(token)
        if int(token) in stop_ids or step + 1 == params.max_new_tokens:
            return
        logits = model(input_ids=token[:, None], past_key_values=cache, use_cache=True).logits[:, -1]


def stop_token_ids(model, tokenizer) -> set[int]:
    """EOS plus any end-of-turn ids the model's generation_config lists."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        ids |= set(configured) if isinstance(configured, (list, tuple)) else {configured}
    return ids


class TextStream:
    """Token ids in, new text out: decodes the whole reply so far and returns what was added,
    holding back an incomplete UTF-8 character (a byte-level BPE token can be half of one)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        piece, self.text = text[len(self.text):] if text.startswith(self.text) else text, text
        return piece


@dataclass
class ChatModel:
    label: str
    model: object
    tokenizer: object
    reference: str = ""

    @property
    def context(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)


@dataclass
class Event:
    """What `ChatSession.respond` yields: `start` (model `index` begins its reply), `text` (a
    piece of it), `end` (`finish`: "stop" | "length" | "context"; `tokens`: reply length)."""

    kind: str
    index: int
    text: str = ""
    finish: str | None = None
    tokens: int = 0


@dataclass
class Settings:
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    seed: int = 0

    def params(self) -> SamplingParams:
        return SamplingParams.with_greedy_at_zero(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                                  top_p=self.top_p, top_k=self.top_k)


@dataclass
class ChatSession:
    """A conversation with one model, or with several answering each turn (--compare).

    `respond(text)` yields Events while the replies stream and then records the turn;
    `command(line)` runs a /command and returns its output (`exit` becomes True on /exit)."""

    models: list[ChatModel]
    settings: Settings = field(default_factory=Settings)
    system: str | None = None
    shared_history: bool = False
    completion: bool = False
    turns: list[tuple[str, list[str]]] = field(default_factory=list)  # (user text, reply per model)
    exit: bool = False

    def __post_init__(self):
        from rlhfkit.models.load import require_chat_template

        for m in self.models:
            if not self.completion:
                require_chat_template(m.tokenizer, m.reference or m.label,
                                      "chat (or --completion for a text model)")

    def messages(self, index: int, user: str | None = None) -> list[dict]:
        """Model `index`'s conversation (plus a new user message)."""
        out = [{"role": "system", "content": self.system}] if self.system else []
        for text, replies in self.turns:
            out += [{"role": "user", "content": text},
                    {"role": "assistant", "content": replies[0 if self.shared_history else index]}]
        if user is not None:
            out.append({"role": "user", "content": user})
        return out

    def prompt_ids(self, index: int, user: str) -> list[int]:
        from rlhfkit.data.encode import encode_prompt

        if self.completion:  # the message alone, as text
            return encode_prompt(self.models[index].tokenizer, user)
        return encode_prompt(self.models[index].tokenizer, self.messages(index, user))

    def respond(self, user: str) -> Iterator[Event]:
        """Stream every model's reply to `user`, one model after the other, then record the turn.
        ContextFull (before anything is sampled) when the conversation leaves no room to reply."""
        prompts = [self.prompt_ids(i, user) for i in range(len(self.models))]
        for m, ids in zip(self.models, prompts):
            if m.context is not None and len(ids) >= m.context:
                raise ContextFull(
                    f"the conversation is {len(ids)} tokens with this message, and {m.label}'s context is "
                    f"{m.context} tokens: no room for a reply. Nothing was dropped or sent; /reset to start "
                    "over (or send a shorter message)")
        seed = self.settings.seed + len(self.turns)  # the same seed for every model, a new one each turn
        replies = []
        for i, (m, ids) in enumerate(zip(self.models, prompts)):
            yield Event("start", i)
            params = self.settings.params()
            room = m.context - len(ids) if m.context is not None else params.max_new_tokens
            params = replace(params, max_new_tokens=min(params.max_new_tokens, room))
            stops = stop_token_ids(m.model, m.tokenizer)
            stream, n, last = TextStream(m.tokenizer), 0, None
            for token in stream_tokens(m.model, m.tokenizer, ids, params, seed=seed, stop_ids=stops):
                n, last = n + 1, token
                piece = stream.push(token)
                if piece:
                    yield Event("text", i, piece)
            by_context = room < self.settings.max_new_tokens
            finish = "stop" if last in stops else ("context" if by_context else "length")
            replies.append(stream.text)
            yield Event("end", i, finish=finish, tokens=n)
        self.turns.append((user, replies))

    def command(self, line: str) -> str:
        name, _, rest = line.strip().partition(" ")
        rest = rest.strip()
        if name in ("/exit", "/quit"):
            self.exit = True
            return ""
        if name == "/help":
            return HELP
        if name == "/reset":
            self.turns.clear()
            return "conversation cleared"
        if name == "/system":
            self.system = rest or None
            self.turns.clear()
            return f"system prompt set: {rest}; conversation cleared" if rest else "system prompt removed"
        if name == "/set":
            return self.set(rest)
        return f"unknown command {name}; /help lists them"

    def set(self, assignments: str) -> str:
        """`key=value ...` -> new settings (all or nothing); returns the settings."""
        values = {}
        for item in assignments.split():
            key, eq, value = item.partition("=")
            if not eq or key not in SETTINGS:
                return f"cannot set {item!r}: use KEY=VALUE with KEY one of {', '.join(SETTINGS)}"
            try:
                values[key] = SETTINGS[key](value)
            except ValueError:
                kind = "an integer" if SETTINGS[key] is int else "a number"
                return f"cannot set {key}: {value!r} is not {kind}"
        candidate = replace(self.settings, **values)
        try:
            check_sampling_params(candidate.params(), 1)
        except ValueError as e:
            return f"not changed: {e}"
        self.settings = candidate
        return "settings: " + " ".join(f"{k}={v}" for k, v in vars(self.settings).items())


def model_label(reference: str) -> str:
    """A short name for a model reference: the run directory's name, the file's or the hub id."""
    path = Path(reference.removeprefix("pkg:"))
    return path.name or reference


def add_chat_args(parser: argparse.ArgumentParser) -> None:
    from rlhfkit.use.generate import add_model_args

    parser.add_argument("model", help="run output directory (full model or LoRA adapter), hub id, .gguf "
                        "or pkg:")
    parser.add_argument("--compare", default=None, metavar="MODEL2",
                        help="a second model that answers every message too (e.g. the SFT model)")
    parser.add_argument("--system", default=None, help="system prompt")
    d = Settings()
    parser.add_argument("--temperature", type=float, default=d.temperature, help="0: greedy decoding")
    parser.add_argument("--top-p", type=float, default=d.top_p)
    parser.add_argument("--top-k", type=int, default=d.top_k, help="0: off")
    parser.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    parser.add_argument("--seed", type=int, default=d.seed, help="turn t samples with seed + t (both models)")
    parser.add_argument("--completion", action="store_true",
                        help="for models trained on text prompts (e.g. the built-in tasks' runs): each "
                        "message is a fresh prompt to continue, no chat template, no history")
    parser.add_argument("--shared-history", action="store_true",
                        help="with --compare: both models see MODEL's earlier replies (default: each "
                        "its own)")
    add_model_args(parser)


def text_task_of(reference: str) -> str | None:
    """The built-in task a run directory was trained on, when it is one with plain-text prompts
    (every built-in task's: the demo's runs): its `config.yaml` (or, for `merged/`, its parent's)
    names `task`. Such a model never saw a chat template, so chat talks to it in completion mode."""
    import yaml

    from rlhfkit.tasks import TASKS

    path = Path(reference).expanduser()
    for cfg in (path / "config.yaml", path.parent / "config.yaml"):
        if cfg.is_file():
            try:
                task = (yaml.safe_load(cfg.read_text()) or {}).get("task")
            except yaml.YAMLError:
                return None
            if task in TASKS:
                sample = TASKS[task]().make("prompt", 1, seed=0)[0]["prompt"]
                return task if isinstance(sample, str) else None
            return None
    return None


def completion_mode(args, printer=print) -> bool:
    """--completion, or on by itself when every model is a run of a built-in text task (said so)."""
    if args.completion:
        return True
    references = [args.model] + ([args.compare] if args.compare else [])
    tasks = [text_task_of(r) for r in references]
    if all(tasks):
        printer(f"[chat] {' and '.join(references)}: trained on the built-in {', '.join(sorted(set(tasks)))} "
                "task's plain-text prompts (config.yaml), so completion mode is on: each message is a fresh "
                "text prompt to continue, no chat template, no history")
        return True
    return False


def session_from_args(args) -> ChatSession:
    from rlhfkit.errors import ConfigError
    from rlhfkit.use.generate import load_model_from_args

    references = [args.model] + ([args.compare] if args.compare else [])
    labels = [model_label(r) for r in references]
    if len(labels) == 2 and labels[0] == labels[1]:
        labels = [f"{labels[0]} (1)", f"{labels[1]} (2)"]
    models = []
    for ref, label in zip(references, labels):
        model, tokenizer = load_model_from_args(ref, args)
        models.append(ChatModel(label, model, tokenizer, ref))
    settings = Settings(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                        max_new_tokens=args.max_new_tokens, seed=args.seed)
    try:
        check_sampling_params(settings.params(), 1)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    args.completion = completion_mode(args)
    return ChatSession(models, settings, system=args.system, shared_history=args.shared_history,
                       completion=args.completion)


def chat_loop(session: ChatSession, read=input, write=sys.stdout.write) -> None:
    """The terminal: read a line, run a command or stream the replies, until /exit or EOF."""
    compare = len(session.models) > 1
    names = " and ".join(m.label for m in session.models)
    mode = (" (completion mode: every message is a fresh text prompt, no history)" if session.completion
            else "")
    write(f"chatting with {names}{mode}; /help for commands, /exit to quit\n")
    while not session.exit:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt):
            write("\n")
            break
        if not line.strip():
            continue
        if line.startswith("/"):
            out = session.command(line)
            if out:
                write(out + "\n")
            continue
        try:
            for event in session.respond(line):
                if event.kind == "start":
                    write(f"[{session.models[event.index].label}] " if compare else "bot> ")
                elif event.kind == "text":
                    write(event.text)
                    sys.stdout.flush()
                elif event.finish == "stop":
                    write("\n")
                else:
                    why = ("reached the model's context; /reset to continue" if event.finish == "context"
                           else f"max_new_tokens={session.settings.max_new_tokens} reached")
                    write(f" [... {why}]\n")
        except ContextFull as e:
            write(f"! {e}\n")
        except KeyboardInterrupt:  # stop this reply; the turn is not recorded
            write("\n[interrupted; the turn was not recorded]\n")


def run_chat(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rlhfkit chat", description=(
        "chat with a model in the terminal, replies streaming; with --compare a second model answers "
        "every message too"), epilog=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_chat_args(parser)
    args = parser.parse_args(argv)
    session = session_from_args(args)
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    chat_loop(session)
    return 0
