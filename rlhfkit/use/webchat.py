"""`rlhfkit webchat MODEL [--compare MODEL2]`: the chat of `rlhfkit chat` in a local web page (gradio).

One pane per model, side by side with --compare (both answer the same message, as in the
alpaca-rlhf SFT-vs-RLHF demo), replies streaming token by token, the sampling controls and a
system prompt under "Settings". Each browser tab has its own conversation (the models are shared;
one reply is sampled at a time). The conversation logic is `ChatSession`'s: same seed per turn
for both models, each model continues its own conversation (--shared-history: MODEL's), a message
that does not fit a model's context is refused with a warning and nothing is dropped.

Binds 127.0.0.1 unless --host says otherwise; gradio is an optional dependency (`rlhfkit[web]`),
imported only here.
"""

from __future__ import annotations

import argparse
import os

from rlhfkit.errors import RlhfkitError
from rlhfkit.use.chat import ChatModel, ChatSession, ContextFull, Settings

INSTALL = "pip install 'rlhfkit[web]'  (in a checkout: pip install -c constraints.txt -e '.[web]')"


def import_gradio():
    """gradio, or an error saying how to install it."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local tool
    try:
        import gradio
    except ImportError:
        raise RlhfkitError(f"rlhfkit webchat needs gradio: {INSTALL}") from None
    return gradio


def _pane(turns: list, index: int, user: str | None = None, partial: str | None = None) -> list[dict]:
    """Model `index`'s conversation as gradio chat messages."""
    messages = []
    for text, replies in turns:
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": replies[index]}]
    if user is not None:
        messages.append({"role": "user", "content": user})
        if partial is not None:
            messages.append({"role": "assistant", "content": partial})
    return messages


def build_app(models: list[ChatModel], settings: Settings | None = None, system: str | None = None,
              shared_history: bool = False, completion: bool = False, title: str | None = None):
    """The gradio Blocks app (not launched). Element ids for scripts and tests: `msg` (textbox),
    `send`, `clear`, `pane-0`, `pane-1` (chatbots), `status`."""
    gr = import_gradio()
    settings = settings or Settings()
    ChatSession(models, completion=completion)  # chat templates there: fail before the page is served
    names = " vs ".join(m.label for m in models)

    with gr.Blocks(title=title or f"rlhfkit webchat: {names}") as app:
        gr.Markdown(f"### rlhfkit webchat: {names}"
                    + (" (completion mode: every message is a fresh text prompt)" if completion else ""))
        turns = gr.State([])  # [(user text, [reply per model])], per browser tab
        with gr.Row():
            panes = [gr.Chatbot(label=m.label, elem_id=f"pane-{i}", height=460) for i, m in enumerate(models)]
        with gr.Row():
            msg = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, elem_id="msg",
                             scale=8, autofocus=True)
            send = gr.Button("Send", variant="primary", elem_id="send", scale=1)
            clear = gr.Button("Clear", elem_id="clear", scale=1)
        status = gr.Markdown("", elem_id="status")
        with gr.Accordion("Settings", open=False):
            system_box = gr.Textbox(value=system or "", label="System prompt (changing it starts over)")
            with gr.Row():
                temperature = gr.Slider(0.0, 2.0, value=settings.temperature, step=0.05,
                                        label="temperature (0: greedy)")
                top_p = gr.Slider(0.05, 1.0, value=settings.top_p, step=0.05, label="top_p")
                top_k = gr.Number(value=settings.top_k, precision=0, minimum=0, label="top_k (0: off)")
                max_new = gr.Number(value=settings.max_new_tokens, precision=0, minimum=1,
                                    label="max_new_tokens")
                seed = gr.Number(value=settings.seed, precision=0, label="seed (turn t uses seed + t)")

        def respond(message, history, system_text, temp, p, k, n, s):
            message = (message or "").strip()
            if not message:
                yield (*[_pane(history, i) for i in range(len(models))], history, "", "")
                return
            session = ChatSession(models, Settings(), system=system_text.strip() or None,
                                  shared_history=shared_history, completion=completion, turns=list(history))
            out = session.set(f"temperature={float(temp)} top_p={float(p)} top_k={int(k or 0)} "
                              f"max_new_tokens={int(n or 1)} seed={int(s or 0)}")
            if not out.startswith("settings:"):
                gr.Warning(out)
                yield (*[_pane(history, i) for i in range(len(models))], history, message, out)
                return
            partial = [None] * len(models)
            notes = []
            try:
                for event in session.respond(message):
                    if event.kind == "start":
                        partial[event.index] = ""
                    elif event.kind == "text":
                        partial[event.index] += event.text
                    elif event.finish in ("length", "context"):
                        why = "reached the context" if event.finish == "context" else "hit max_new_tokens"
                        notes.append(f"{models[event.index].label} {why} ({event.tokens} tokens)")
                    panes_now = [_pane(history, i, message, partial[i]) for i in range(len(models))]
                    yield (*panes_now, history, "", "; ".join(notes))
            except ContextFull as e:
                gr.Warning(str(e))
                yield (*[_pane(history, i) for i in range(len(models))], history, message, str(e))
                return
            final = [_pane(session.turns, i) for i in range(len(models))]
            yield (*final, session.turns, "", "; ".join(notes))

        inputs = [msg, turns, system_box, temperature, top_p, top_k, max_new, seed]
        outputs = [*panes, turns, msg, status]
        msg.submit(respond, inputs, outputs)
        send.click(respond, inputs, outputs)
        reset = (lambda: (*[[] for _ in models], [], ""))
        clear.click(reset, None, [*panes, turns, status])
        system_box.change(reset, None, [*panes, turns, status])
    return app


def run_webchat(argv: list[str]) -> int:
    from rlhfkit.use.chat import add_chat_args, session_from_args

    parser = argparse.ArgumentParser(prog="rlhfkit webchat", description=(
        "chat with a model in a local web page (gradio), replies streaming; with --compare two panes "
        f"answer the same message side by side. Needs gradio: {INSTALL}"))
    add_chat_args(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)
    gr = import_gradio()  # before loading models: a missing gradio fails fast
    session = session_from_args(args)
    app = build_app(session.models, session.settings, system=args.system, shared_history=args.shared_history,
                    completion=args.completion)
    names = " vs ".join(m.label for m in session.models)
    print(f"[webchat] serving {names} on http://{args.host}:{args.port} (Ctrl-C to stop)")
    app.queue(default_concurrency_limit=1).launch(server_name=args.host, server_port=args.port, share=False,
                                                  inbrowser=False, theme=gr.themes.Default())
    return 0
