"""The web UI in a real browser: Debian's Chromium (apt package `chromium`), headless, driven by
Playwright (pip `playwright`; Playwright's own browser download is never used).

The page calls the model server from its own server process, not from the browser, so Playwright
cannot see what the model server receives. To check that the second turn carries the first, the
test starts the role's app.py itself on loopback, in front of the real vLLM server with a
recording proxy in between (webui_recorder.Recorder), and reads the requests the proxy passed on.

Environment:
  VLLM_WEBUI_TEST_API_BASE / _API_KEY / _MODEL   the real vLLM server (see conftest.py)
  VLLM_WEBUI_TEST_PYTHON    a Python with the role's lock installed (tests/webui/make-venv.sh)
  VLLM_WEBUI_TEST_CHROMIUM  the browser (default /usr/bin/chromium)
  VLLM_WEBUI_TEST_URL       optional: a deployed page (e.g. behind the gateway) to run two turns
                            against as well; VLLM_WEBUI_TEST_USER and _PASSWORD for its login
"""

from __future__ import annotations

import inspect
import os
import re
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.error import URLError
from urllib.parse import urlsplit

import pytest
from webui_recorder import APP_DIR, Backend, Recorder

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="pip install -r tests/webui/requirements.txt"
)

CHROMIUM = os.environ.get("VLLM_WEBUI_TEST_CHROMIUM", "/usr/bin/chromium")
USER, PASSWORD = "ada", 'pa ss"word$1'  # characters a shell or an env file could mangle
# The first message's later lines are indented: Gradio's Chatbot would give it back dedented (see
# app.as_chatbot_keeps), and the page must still send it on as typed.
FIRST, SECOND = "My name is Ada.\n    I write code.", "What is my name?"
REPLY_TIMEOUT = 300.0
# Long enough (a few seconds on a busy 2-core test machine) to watch the answer grow.
MAX_TOKENS = 96


@dataclass
class WebUI:
    """A running web UI and where its log goes."""

    url: str
    log: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def webui_python() -> str:
    python = os.environ.get("VLLM_WEBUI_TEST_PYTHON", "")
    if not python:
        pytest.skip(
            "VLLM_WEBUI_TEST_PYTHON is not set: name a Python that has "
            "roles/vllm_webui/files/vllm-webui.txt installed (tests/webui/make-venv.sh makes one)"
        )
    return python


@pytest.fixture(scope="session")
def browser() -> Iterator[sync_api.Browser]:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} does not exist: apt-get install chromium")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: sync_api.Browser) -> Iterator[sync_api.Page]:
    context = browser.new_context(ignore_https_errors=True)  # a test gateway's own certificate
    page = context.new_page()
    page.set_default_timeout(60_000)
    yield page
    context.close()


@contextmanager
def _start(python: str, tmp: Path, **settings: str) -> Iterator[WebUI]:
    """Run app.py on a free loopback port with VLLM_WEBUI_* settings until the test ends."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_WEBUI_")}
    env |= {f"VLLM_WEBUI_{k.upper()}": v for k, v in settings.items()}
    env |= {"VLLM_WEBUI_HOST": "127.0.0.1", "VLLM_WEBUI_PORT": str(port), "HOME": str(tmp)}
    env |= {"TMPDIR": str(tmp), "GRADIO_TEMP_DIR": str(tmp / "gradio")}
    log = tmp / "webui.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [python, str(APP_DIR / "app.py")], env=env, cwd=tmp, stdout=out, stderr=out
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as answer:
                    if answer.status == 200:
                        break
            except (URLError, ConnectionError):
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the web UI did not start:\n{log.read_text()}")
            time.sleep(0.5)
        yield WebUI(url, log)
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def webui(
    webui_python: str, backend: Backend, recorder: Recorder, tmp_path: Path
) -> Iterator[WebUI]:
    """The role's app with a login, talking to the real server through the recorder."""
    with _start(
        webui_python,
        tmp_path,
        api_base=recorder.url_for(backend.api_base),
        api_key=backend.api_key,
        model="",  # the first model the server lists
        auth_user=USER,
        auth_password=PASSWORD,
        max_tokens=str(MAX_TOKENS),
        system_prompt="You are a helpful assistant.\nAnswer briefly.",
    ) as running:
        yield running


def _log_in(page: sync_api.Page, user: str, password: str) -> None:
    page.get_by_label("username").fill(user)
    page.get_by_label("password").fill(password)
    page.get_by_role("button", name="Login").click()


def _chat_box(page: sync_api.Page) -> sync_api.Locator:
    return page.locator("#message textarea")


# Records, inside the page, the length of answer number `turn` at every change of the chat: each
# update the page renders is seen, however slowly the test process itself gets to look.
WATCH_ANSWER = """turn => {
  window.answerWatcher?.disconnect();
  window.answerLengths = [];
  window.answerWatcher = new MutationObserver(() => {
    const answer = document.querySelectorAll('[data-testid="bot"]')[turn - 1];
    if (answer) window.answerLengths.push(answer.innerText.length);
  });
  const all = {childList: true, subtree: true, characterData: true};
  window.answerWatcher.observe(document.body, all);
}"""


# Presses the stop button if it is there (it is while an answer streams); says whether it was.
PRESS_STOP = """() => {
  const stop = document.querySelector('[data-testid="stop-button"]');
  stop?.click();
  return Boolean(stop);
}"""


def _send(page: sync_api.Page, text: str, turn: int) -> tuple[str, list[int]]:
    """Send a message as turn `turn` and wait for the complete answer.

    Returns the answer as the page shows it and the lengths its text had at each change of the
    page while it arrived: growing lengths mean that it streamed in.
    """
    page.evaluate(WATCH_ANSWER, turn)
    box = _chat_box(page)
    box.fill(text)
    box.press("Enter")
    answers = page.locator('[data-testid="bot"]')
    deadline = time.monotonic() + REPLY_TIMEOUT
    # The box is read-only while the answer is generated and editable again once it is complete.
    while answers.count() < turn or not box.is_editable():
        assert time.monotonic() < deadline, f"no complete answer to turn {turn} in time"
        page.wait_for_timeout(100)
    answer = answers.nth(turn - 1).inner_text()
    return answer, [*page.evaluate("window.answerLengths"), len(answer)]


def _streamed(lengths: list[int]) -> bool:
    """The answer was seen at three or more sizes, growing, before it was complete."""
    seen = [n for i, n in enumerate(lengths) if n and (i == 0 or n != lengths[i - 1])]
    return len(seen) >= 3 and seen == sorted(seen)


def _letters(text: str) -> str:
    return re.sub(r"[^0-9a-z]", "", text.lower())


def _is_subsequence(short: str, long: str) -> bool:
    rest = iter(long)
    return all(c in rest for c in short)


def _hosts(requests: list[str]) -> set[str]:
    return {urlsplit(url).netloc for url in requests if urlsplit(url).scheme in ("http", "https")}


def test_a_login_is_required(page: sync_api.Page, webui: WebUI) -> None:
    page.goto(webui.url)
    _log_in(page, USER, "wrong")
    sync_api.expect(page.get_by_text("Incorrect Credentials")).to_be_visible()
    assert _chat_box(page).count() == 0
    _log_in(page, USER, PASSWORD)
    sync_api.expect(_chat_box(page)).to_be_visible()


def test_two_turns_stream_in_and_the_second_request_carries_the_first(
    page: sync_api.Page, webui: WebUI, recorder: Recorder
) -> None:
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto(webui.url)
    _log_in(page, USER, PASSWORD)
    sync_api.expect(_chat_box(page)).to_be_visible()  # the page reloads after the login

    first_answer, first_lengths = _send(page, FIRST, turn=1)
    assert _streamed(first_lengths), f"the first answer did not stream in: {first_lengths}"
    second_answer, second_lengths = _send(page, SECOND, turn=2)
    assert _streamed(second_lengths), f"the second answer did not stream in: {second_lengths}"

    first, second = recorder.chats()
    assert first.request["messages"] == [
        {"role": "system", "content": "You are a helpful assistant.\nAnswer briefly."},
        {"role": "user", "content": FIRST},
    ]
    # The second request carries the whole first turn, the question as typed and the answer as the
    # server streamed it, then the new question: not the dedented form Gradio's Chatbot keeps.
    assert second.request["messages"] == [
        *first.request["messages"],
        {"role": "assistant", "content": first.streamed_text().strip()},
        {"role": "user", "content": SECOND},
    ]
    assert first.request["stream"] is second.request["stream"] is True
    # Both turns name the same session, so the gateway sends them to the same server (its cache
    # holds the first turn); a conversation that starts differently gets another name.
    assert first.headers["x-session-id"] == second.headers["x-session-id"] != ""
    assert first.request["max_tokens"] == MAX_TOKENS
    # What the page shows is that answer, rendered as Markdown (which may drop markup).
    assert _letters(first_answer)
    assert _is_subsequence(_letters(first_answer), _letters(first.streamed_text()))
    assert _is_subsequence(_letters(second_answer), _letters(second.streamed_text()))
    # Nothing on the page comes from anywhere but the web UI itself (no CDN, fonts, analytics).
    assert _hosts(requests) == {urlsplit(webui.url).netloc}
    assert "Traceback" not in webui.log.read_text()


def test_stop_and_retry_send_the_conversation_as_it_was(
    page: sync_api.Page, webui_python: str, backend: Backend, recorder: Recorder, tmp_path: Path
) -> None:
    """Stop mid-answer, ask again with an indented question, then Retry. Gradio hands the page the
    stopped answer and the retried question dedented; the page sends both as they were.

    The recorder steers the first answer (`Recorder.steer_next_answer`): it begins "Sure:" and every
    later line is indented, the form Gradio's Chatbot gives back changed, and the server ignores
    end-of-sequence, so the answer is still streaming when Stop is pressed."""
    again = "What is my name?\n    One word, please."
    with _start(
        webui_python,
        tmp_path,
        api_base=recorder.url_for(backend.api_base),
        api_key=backend.api_key,
        model="",
        max_tokens="200",  # the later answers; the recorder makes the first one long
    ) as webui:
        page.goto(webui.url)
        box = _chat_box(page)
        recorder.steer_next_answer()
        page.evaluate(WATCH_ANSWER, 1)
        box.fill(FIRST)
        box.press("Enter")
        deadline = time.monotonic() + REPLY_TIMEOUT
        while len(set(page.evaluate("window.answerLengths")) - {0}) < 3:
            assert time.monotonic() < deadline, "the first answer did not start streaming in time"
            page.wait_for_timeout(50)
        # Clicked in the page: the button is drawn anew with every streamed step, too often for
        # Playwright's wait for a stable element.
        assert page.evaluate(PRESS_STOP), "the first answer ended before Stop was pressed"
        deadline = time.monotonic() + REPLY_TIMEOUT
        while not box.is_editable():
            assert time.monotonic() < deadline, "the page did not stop"
            page.wait_for_timeout(100)
        shown = page.locator('[data-testid="bot"]').nth(0).inner_text()

        _send(page, again, turn=2)
        page.get_by_role("button", name="Retry").last.click()
        deadline = time.monotonic() + REPLY_TIMEOUT
        while len(recorder.chats()) < 3 or not box.is_editable():
            assert time.monotonic() < deadline, "no complete answer to the retried question"
            page.wait_for_timeout(100)

        first, second, retried = recorder.chats()
        stopped = second.request["messages"][-2]["content"]
        assert second.request["messages"] == [
            *first.request["messages"],
            {"role": "assistant", "content": stopped},
            {"role": "user", "content": again},
        ]
        # The stopped answer as the page received it, indented, not as Gradio gives it back
        # (cleandoc, as gradio/components/chatbot.py does); a beginning of the stream, cut short,
        # holding what the page showed (rendered as Markdown, which may drop markup).
        assert stopped.startswith("Sure:\n    ") and inspect.cleandoc(stopped) != stopped
        streamed = first.streamed_text().strip()
        assert streamed.startswith(stopped)
        assert len(stopped) < len(streamed), "Stop came after the whole answer"
        assert _is_subsequence(_letters(shown), _letters(stopped))
        # Retry sends the same conversation again, the question as typed.
        assert retried.request["messages"] == second.request["messages"]
        assert "Traceback" not in webui.log.read_text()


def test_a_server_that_is_down_shows_a_clear_message(
    page: sync_api.Page, webui_python: str, closed_port: int, tmp_path: Path
) -> None:
    api_base = f"http://127.0.0.1:{closed_port}/v1"
    with _start(webui_python, tmp_path, api_base=api_base, model="") as webui:
        page.goto(webui.url)
        box = _chat_box(page)
        sync_api.expect(box).to_be_visible()
        box.fill("Hello?")
        box.press("Enter")
        message = page.get_by_text(f"Cannot reach the model server at {api_base}").last
        sync_api.expect(message).to_be_visible()
        assert "Traceback" not in page.locator("body").inner_text()


def test_a_deployed_page_streams_two_turns(page: sync_api.Page) -> None:
    url = os.environ.get("VLLM_WEBUI_TEST_URL", "")
    if not url:
        pytest.skip("VLLM_WEBUI_TEST_URL is not set (a deployed web UI page)")
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto(url)
    if os.environ.get("VLLM_WEBUI_TEST_USER"):
        _log_in(page, os.environ["VLLM_WEBUI_TEST_USER"], os.environ["VLLM_WEBUI_TEST_PASSWORD"])
    sync_api.expect(_chat_box(page)).to_be_visible()
    for turn, text in enumerate((FIRST, SECOND), start=1):
        answer, lengths = _send(page, text, turn)
        assert answer.strip(), f"no answer to turn {turn}"
        assert _streamed(lengths), f"turn {turn} did not stream in: {lengths}"
    assert _hosts(requests) == {urlsplit(page.url).netloc}
