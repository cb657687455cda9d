"""`rlhfkit webchat`: a missing gradio is a clear error; the page in a real headless browser (Debian's
chromium + chromium-driver, driven by selenium): it loads, a message is sent, both panes of
--compare show replies that stream in (several growing prefixes seen) and end as the replies
`ChatSession` gives for the same settings. Skips only when chromium, chromedriver, gradio or
selenium is missing (`make browser` installs them; .ci/run runs it)."""

from __future__ import annotations

import builtins
import shutil
import time

import pytest
import torch
from helpers import free_port

from rlhfkit.cli import main
from rlhfkit.models.presets import build_preset_model
from rlhfkit.use.chat import ChatModel, ChatSession, Settings

MESSAGE = "Hello, how are you?"


def test_missing_gradio_names_the_install_command(monkeypatch, capsys, tmp_path):
    real_import = builtins.__import__

    def no_gradio(name, *args, **kwargs):
        if name == "gradio" or name.startswith("gradio."):
            raise ImportError("No module named 'gradio'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gradio)
    assert main(["webchat", str(tmp_path / "model")]) == 2  # before any model loads
    assert "rlhfkit webchat needs gradio: pip install 'rlhfkit[web]'" in capsys.readouterr().err


def test_webchat_binds_localhost_by_default():
    import argparse

    from rlhfkit.use import webchat

    seen = {}

    class Stop(Exception):
        pass

    def parse(self, argv):
        seen.update(vars(argparse.ArgumentParser.parse_known_args(self, argv)[0]))
        raise Stop

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(argparse.ArgumentParser, "parse_args", parse)
        with pytest.raises(Stop):
            webchat.run_webchat(["some/model"])
    assert seen["host"] == "127.0.0.1" and seen["compare"] is None


def _slow(model, seconds: float):
    """Each forward pass of `model` waits `seconds`, so that a browser polling the page sees a
    reply grow (the tiny model samples a whole reply in milliseconds)."""
    forward = model.forward

    def slow_forward(*args, **kwargs):
        time.sleep(seconds)
        return forward(*args, **kwargs)

    model.forward = slow_forward
    return model


def _browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("chromium / chromium-driver not installed (make browser)")
    pytest.importorskip("gradio")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.binary_location = chromium
    return webdriver.Chrome(service=Service(driver), options=options)


def _reply_in(pane_text: str) -> str | None:
    """The reply shown in a pane (its text: label, the user message, the reply)."""
    if MESSAGE not in pane_text:
        return None
    return pane_text.split(MESSAGE, 1)[1].strip()


def test_webchat_compare_in_a_headless_browser(tiny_tokenizer):
    driver = _browser()
    from selenium.webdriver.common.by import By

    from rlhfkit.use.webchat import build_app

    tok = tiny_tokenizer
    models = []
    for label, seed in (("rlhf", 4), ("sft", 5)):  # greedy replies of these are plain words, no early EOS
        torch.manual_seed(seed)
        models.append(ChatModel(label, build_preset_model("tiny", tok).eval(), tok))
    settings = Settings(max_new_tokens=12, temperature=0)
    expected = ChatSession(models, settings)
    list(expected.respond(MESSAGE))
    replies = [r.strip() for r in expected.turns[0][1]]
    assert all(len(r.split()) >= 6 for r in replies) and replies[0] != replies[1]
    for m in models:
        _slow(m.model, 0.1)

    port = free_port()
    app = build_app(models, settings)
    app.queue(default_concurrency_limit=1).launch(server_name="127.0.0.1", server_port=port,
                                                  prevent_thread_lock=True, quiet=True)
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        deadline = time.time() + 60
        while not driver.find_elements(By.CSS_SELECTOR, "#msg textarea"):
            assert time.time() < deadline, "the page did not load"
            time.sleep(0.2)
        labels = [driver.find_element(By.ID, f"pane-{i}").text.split("\n")[0] for i in range(2)]
        assert labels == ["rlhf", "sft"]
        driver.find_element(By.CSS_SELECTOR, "#msg textarea").send_keys(MESSAGE)
        driver.find_element(By.ID, "send").click()
        seen = [[], []]  # distinct texts of each pane's reply while it streams
        deadline = time.time() + 60
        while [s[-1] if s else None for s in seen] != replies:
            assert time.time() < deadline, f"replies did not complete: {seen}"
            for i in range(2):
                text = _reply_in(driver.find_element(By.ID, f"pane-{i}").text)
                if text and (not seen[i] or seen[i][-1] != text):
                    seen[i].append(text)
            time.sleep(0.03)
        for i in range(2):
            assert len(seen[i]) >= 3, f"pane {i} did not stream: {seen[i]}"
            assert all(replies[i].startswith(s) for s in seen[i])  # growing prefixes of the reply
    finally:
        driver.quit()
        app.close()
