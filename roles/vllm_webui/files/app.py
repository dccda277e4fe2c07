"""A chat page for the fleet's OpenAI-compatible API (vLLM), served by Gradio.

Two layers. The chat logic (the messages sent each turn, the streamed reply, errors worded for the
person at the page) is plain functions on top of the `openai` client and imports no Gradio, so it is
tested against a real server without a browser. The page (`build_page`, `main`) wires it to Gradio's
chat components. Configuration comes from environment variables (see `Settings.from_env`); nothing
here reaches anything but the configured API: no share link, no analytics, no downloads.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import openai

if TYPE_CHECKING:
    import gradio as gr

# Gradio and Hugging Face Hub: no usage statistics, no version check, no hub look-ups. Set before
# Gradio is imported (it reads some of these at import time), whatever the environment says.
OFFLINE_ENVIRONMENT = {
    "GRADIO_ANALYTICS_ENABLED": "False",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
}

log = logging.getLogger("vllm_webui")

Message = dict[str, str]
# The gateway sends the requests that carry the same value of this header to the same server
# (vllm_gateway_session_header; vllm-router reads the same header). VLLM_WEBUI_SESSION_HEADER.
SESSION_HEADER = "X-Session-ID"
# Headers the API request needs for itself (the key, the body): never the session header. The role
# refuses the same names before it writes anything (tasks/validate.yml).
RESERVED_HEADERS = {
    "authorization",
    "host",
    "content-type",
    "content-length",
    "cookie",
    "connection",
}


class BackendError(Exception):
    """A failure of the model server, worded for the person using the page."""


@dataclass(frozen=True)
class Sampling:
    """Sampling settings of one request."""

    temperature: float = 0.7
    top_p: float = 0.8
    max_tokens: int = 512
    repetition_penalty: float = 1.05


@dataclass(frozen=True)
class Settings:
    """Everything the page needs, read from VLLM_WEBUI_* environment variables."""

    api_base: str = "http://127.0.0.1:8000/v1"
    api_key: str = ""
    model: str = ""
    host: str = "127.0.0.1"
    port: int = 7860
    root_path: str = ""
    auth_user: str = ""
    auth_password: str = ""
    title: str = "Chat"
    system_prompt: str = "You are a helpful assistant."
    sampling: Sampling = field(default_factory=Sampling)
    request_timeout: float = 300.0
    concurrency_limit: int = 16
    session_header: str = SESSION_HEADER  # empty: no session header

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Read and check the settings; raise ValueError naming the variable that is wrong."""
        d = cls()

        def text(name: str, default: str) -> str:
            return env.get(f"VLLM_WEBUI_{name}", default)

        def number(name: str, default: float, low: float, high: float) -> float:
            raw = text(name, str(default))
            try:
                value = float(raw)
            except ValueError:
                raise ValueError(f"VLLM_WEBUI_{name} must be a number, not {raw!r}") from None
            if not low <= value <= high:
                raise ValueError(f"VLLM_WEBUI_{name} must be between {low} and {high}, not {raw}")
            return value

        settings = cls(
            api_base=text("API_BASE", d.api_base).rstrip("/"),
            api_key=text("API_KEY", d.api_key),
            model=text("MODEL", d.model),
            host=text("HOST", d.host),
            port=int(number("PORT", d.port, 1, 65535)),
            root_path=text("ROOT_PATH", d.root_path).rstrip("/"),
            auth_user=text("AUTH_USER", d.auth_user),
            auth_password=text("AUTH_PASSWORD", d.auth_password),
            title=text("TITLE", d.title),
            system_prompt=text("SYSTEM_PROMPT", d.system_prompt),
            sampling=Sampling(
                temperature=number("TEMPERATURE", d.sampling.temperature, 0, 2),
                top_p=number("TOP_P", d.sampling.top_p, 0.01, 1),
                max_tokens=int(number("MAX_TOKENS", d.sampling.max_tokens, 1, 1_000_000)),
                repetition_penalty=number(
                    "REPETITION_PENALTY", d.sampling.repetition_penalty, 0.01, 10
                ),
            ),
            request_timeout=number("REQUEST_TIMEOUT", d.request_timeout, 1, 86400),
            concurrency_limit=int(number("CONCURRENCY_LIMIT", d.concurrency_limit, 1, 1024)),
            session_header=text("SESSION_HEADER", d.session_header),
        )
        header = settings.session_header
        if not re.fullmatch(r"[A-Za-z0-9-]*", header) or header.lower() in RESERVED_HEADERS:
            raise ValueError(
                "VLLM_WEBUI_SESSION_HEADER must be an HTTP header name (letters, digits, -) that"
                f" the request does not already use, not {header!r}"
            )
        if not settings.api_base.startswith(("http://", "https://")):
            raise ValueError(
                f"VLLM_WEBUI_API_BASE must be an http(s) URL, not {settings.api_base!r}"
            )
        if bool(settings.auth_user) != bool(settings.auth_password):
            raise ValueError("VLLM_WEBUI_AUTH_USER and VLLM_WEBUI_AUTH_PASSWORD go together")
        return settings


def make_client(settings: Settings) -> openai.OpenAI:
    """An OpenAI client for the configured server (vLLM accepts any key when it has none)."""
    return openai.OpenAI(
        base_url=settings.api_base,
        api_key=settings.api_key or "EMPTY",
        timeout=settings.request_timeout,
        max_retries=1,
    )


def _text_of(content: object) -> str:
    """The text of a chat message's content: a string, a text part or a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, Mapping):
        return str(content.get("text") or "") if content.get("type", "text") == "text" else ""
    if isinstance(content, Sequence):
        return "\n".join(t for t in (_text_of(part) for part in content) if t)
    return ""


def as_chatbot_keeps(text: str) -> str:
    """A message's text as Gradio's Chatbot keeps it in the history it passes back.

    Gradio 6 runs every text message through inspect.cleandoc (gradio/components/chatbot.py,
    _postprocess_content): lines after the first lose their common indentation, so an answer whose
    code lines are all indented comes back changed. `Originals` keeps the original of such texts.
    """
    return inspect.cleandoc(text).strip()


@dataclass
class Originals:
    """One browser session's texts that Gradio's Chatbot gives back changed, by the form it gives.

    `texts` maps a role and the Chatbot's form of a question or answer to the text as it was typed
    or streamed; texts the Chatbot keeps unchanged need no entry. The answer streamed last is
    `streamed` (its whole text so far) with `ends`, its length after each step the page may have
    shown: after Stop the page shows one of the last steps, not necessarily the last one this code
    reached, and `settle` finds which at the start of the next turn (for a finished answer, the
    last). Only the last LOOK_BACK steps are looked at, so that costs little however long the
    answer; past them, a text goes out in the Chatbot's form, as it would with no `Originals`.
    """

    LOOK_BACK = 64

    texts: dict[tuple[str, str], str] = field(default_factory=dict)
    streamed: str = ""
    ends: list[int] = field(default_factory=list)

    def note(self, role: str, text: str) -> None:
        """Keep `text` for the form the Chatbot will give back, if that form differs."""
        key = as_chatbot_keeps(text)
        if key != text.strip():
            self.texts[role, key] = text.strip()

    def stream(self, text: str) -> None:
        """The answer being streamed has grown to `text` (one step, about to be shown)."""
        self.streamed = text
        self.ends.append(len(text))
        del self.ends[: -self.LOOK_BACK]

    def original(self, role: str, text: str) -> str:
        """The text as it was typed or streamed, for the form the Chatbot gave back."""
        return self.texts.get((role, text.strip()), text)

    def begin(self, history: Sequence[Mapping[str, Any]], message: str) -> str:
        """Start a turn: settle the map on `history`; return the question to send.

        Retry passes the question back in the Chatbot's form; it goes as it was typed.
        """
        message = self.original("user", message)
        self.settle(history)
        self.note("user", message)
        return message

    def settle(self, history: Sequence[Mapping[str, Any]]) -> None:
        """Note which step of the last answer the page shows; forget texts not in `history`.

        The map then holds the current conversation's texts only, whatever Clear, Undo, Retry or
        Stop did to it since the last turn.
        """
        shown = {(str(m.get("role")), _text_of(m.get("content")).strip()) for m in history}
        for end in reversed(self.ends):
            if ("assistant", as_chatbot_keeps(self.streamed[:end])) in shown:
                self.note("assistant", self.streamed[:end])
                break
        self.streamed, self.ends = "", []
        self.texts = {key: text for key, text in self.texts.items() if key in shown}


def build_messages(
    system_prompt: str,
    history: Sequence[Mapping[str, Any]],
    message: str,
    originals: Originals | None = None,
) -> list[Message]:
    """The whole conversation for one turn: the system prompt, every earlier turn, the new message.

    `history` holds OpenAI-style messages as Gradio's chat components pass them (content a string or
    a list of text parts). Messages without text, other roles and Gradio's annotations (messages
    with a metadata title, such as tool or thinking notes) are not part of the conversation. A text
    found in `originals` is sent as it was typed or streamed, not as the Chatbot changed it: the
    model sees the conversation it had, and its prefix cache still matches.
    """
    messages: list[Message] = []
    if system_prompt.strip():
        messages.append({"role": "system", "content": system_prompt.strip()})
    for item in history:
        role, text = item.get("role"), _text_of(item.get("content")).strip()
        if role in ("user", "assistant") and text and not (item.get("metadata") or {}).get("title"):
            content = originals.original(str(role), text) if originals else text
            messages.append({"role": str(role), "content": content})
    messages.append({"role": "user", "content": message})
    return messages


def session_id(messages: Sequence[Message]) -> str:
    """The conversation's name for the gateway: a hash of its system prompt and first question.

    Every turn of a conversation starts with them, so every turn gets the same name and reaches the
    server whose prefix cache holds the earlier turns; conversations that start alike share a
    server, and their common start, too.
    """
    head: list[Message] = []
    for message in messages:
        head.append({**message, "content": message["content"].strip()})
        if message["role"] == "user":
            break
    return hashlib.sha256(json.dumps(head, sort_keys=True).encode()).hexdigest()[:32]


def _detail(error: openai.APIStatusError) -> str:
    """The server's own words from an error response, shortened."""
    body = error.body
    if isinstance(body, Mapping):
        body = body.get("message") or body.get("detail") or body
    text = str(body if body is not None else error.message)
    return text if len(text) <= 300 else text[:297] + "..."


def explain(error: Exception, api_base: str, model: str) -> str:
    """A message for the person at the page: what went wrong and what to do, no stack trace."""
    if isinstance(error, openai.APITimeoutError):
        return (
            f"The model server at {api_base} did not answer in time. It may be busy or still "
            "starting: try again in a moment."
        )
    if isinstance(error, openai.APIConnectionError):
        return (
            f"Cannot reach the model server at {api_base}: it is down, still starting, or the "
            "address is wrong. Try again in a moment; if this persists, ask the administrator to "
            "check the vLLM service."
        )
    if isinstance(error, openai.AuthenticationError | openai.PermissionDeniedError):
        return (
            f"The model server at {api_base} refused the web UI's API key "
            f"(HTTP {error.status_code}). The administrator must give the web UI the server's key "
            "(vllm_webui_api_key)."
        )
    if isinstance(error, openai.NotFoundError):
        detail = _detail(error)
        if "model" in detail.lower():
            return (
                f"The model '{model}' is not served at {api_base} (HTTP 404: {detail}). "
                "Pick another one from the Model list."
            )
        return (
            f"The model server answers 404 at {api_base} ({detail}): the API base URL is "
            "probably wrong, it usually ends in /v1."
        )
    if isinstance(error, openai.BadRequestError):
        return (
            f"The model server rejected the request (HTTP 400: {_detail(error)}). If the "
            "conversation has grown too long, clear it or lower Max new tokens."
        )
    if isinstance(error, openai.RateLimitError):
        return "The model server is busy (HTTP 429). Try again in a moment."
    if isinstance(error, openai.APIStatusError):
        return (
            f"The model server at {api_base} failed (HTTP {error.status_code}: "
            f"{_detail(error)}). Try again; if this persists, tell the administrator."
        )
    return f"The model server's answer could not be read ({type(error).__name__}: {error})."


def list_models(client: openai.OpenAI) -> list[str]:
    """The model names the server lists at /v1/models; BackendError when it cannot be asked."""
    try:
        return [model.id for model in client.models.list()]
    except openai.OpenAIError as err:
        log.warning("listing models failed: %s", type(err).__name__)
        raise BackendError(explain(err, str(client.base_url).rstrip("/"), "")) from err


def resolve_model(client: openai.OpenAI, model: str | None) -> str:
    """The model to ask: the one chosen, else the first the server lists."""
    if model:
        return model
    models = list_models(client)
    if not models:
        raise BackendError(f"The model server at {client.base_url} lists no models.")
    return models[0]


def stream_reply(
    client: openai.OpenAI,
    model: str,
    messages: list[Message],
    sampling: Sampling,
    session_header: str = SESSION_HEADER,
) -> Iterator[str]:
    """Ask for a chat completion with stream=True and yield the text deltas as they arrive.

    Raises BackendError with a message from `explain` on any API failure, also mid-answer. Closing
    the generator early (Stop) closes the HTTP response, which makes vLLM abort the request.
    """
    api_base = str(client.base_url).rstrip("/")
    log.info(
        "chat request: model=%s, %d messages (%s)",
        model,
        len(messages),
        ", ".join(m["role"] for m in messages),
    )
    try:
        stream = client.chat.completions.create(
            model=model,
            messages=messages,  # type: ignore[arg-type]
            stream=True,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
            extra_body={"repetition_penalty": sampling.repetition_penalty},
            extra_headers={session_header: session_id(messages)} if session_header else None,
        )
        with stream:
            for chunk in stream:
                for choice in chunk.choices:
                    if choice.delta.content:
                        yield choice.delta.content
    except openai.OpenAIError as err:
        log.warning("chat request failed: %s", type(err).__name__)
        raise BackendError(explain(err, api_base, model)) from err


def build_page(settings: Settings, client: openai.OpenAI) -> gr.Blocks:
    """The Gradio page: a chat with the system prompt, the model and the sampling settings."""
    import gradio as gr

    def respond(
        message: str,
        history: list[dict[str, Any]],
        originals: Originals,
        model: str | None,
        system_prompt: str,
        temperature: float,
        top_p: float,
        max_tokens: float,
        repetition_penalty: float,
    ) -> Iterator[tuple[str, Originals]]:
        sampling = Sampling(temperature, top_p, int(max_tokens), repetition_penalty)
        message = originals.begin(history, message)
        text = ""
        try:
            messages = build_messages(system_prompt, history, message, originals)
            chosen = resolve_model(client, model)
            for delta in stream_reply(client, chosen, messages, sampling, settings.session_header):
                text += delta
                originals.stream(text)  # before the yield: Stop ends it there
                yield text, originals
        except BackendError as err:
            raise gr.Error(
                str(err), duration=None, title="Model server", print_exception=False
            ) from err
        if not text:
            yield "(the model returned no text)", originals

    def refresh_models(current: str | None) -> Any:
        try:
            models = list_models(client)
        except BackendError as err:
            gr.Warning(str(err), title="Model list")
            return gr.skip()
        keep = current if current in models else settings.model
        return gr.Dropdown(choices=models, value=keep if keep in models else models[0])

    initial = [settings.model] if settings.model else []
    with gr.Blocks(title=settings.title, fill_height=True, analytics_enabled=False) as page:
        # this browser session's texts the Chatbot changes, by the form it gives back
        originals = gr.State(Originals())
        with gr.Sidebar(label="Settings", open=False):
            model = gr.Dropdown(
                choices=initial,
                value=settings.model or None,
                label="Model",
                allow_custom_value=True,
            )
            refresh = gr.Button("Refresh model list", size="sm")
            system_prompt = gr.Textbox(settings.system_prompt, label="System prompt", lines=4)
            s = settings.sampling
            temperature = gr.Slider(0, 2, s.temperature, step=0.05, label="Temperature")
            top_p = gr.Slider(0.01, 1, s.top_p, step=0.01, label="Top p")
            max_tokens = gr.Slider(
                1, max(4096, s.max_tokens), s.max_tokens, step=1, label="Max new tokens"
            )
            repetition_penalty = gr.Slider(
                min(0.5, s.repetition_penalty),
                max(2.0, s.repetition_penalty),
                s.repetition_penalty,
                step=0.01,
                label="Repetition penalty",
            )
        gr.ChatInterface(
            respond,
            textbox=gr.Textbox(
                placeholder="Type a message, Enter sends it",
                show_label=False,
                scale=7,
                autofocus=True,
                submit_btn=True,
                stop_btn=True,
                elem_id="message",
            ),
            additional_inputs=[
                originals,
                model,
                system_prompt,
                temperature,
                top_p,
                max_tokens,
                repetition_penalty,
            ],
            additional_outputs=[originals],
            title=settings.title,
            flagging_mode="never",
            save_history=False,
            concurrency_limit=settings.concurrency_limit,
            fill_height=True,
        )
        page.load(refresh_models, inputs=model, outputs=model)
        refresh.click(refresh_models, inputs=model, outputs=model)
    return page


def main() -> int:
    """Read the settings, build the page and serve it until stopped."""
    os.environ.update(OFFLINE_ENVIRONMENT)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # One line per chat request is ours (model and roles, never content); not one per HTTP call.
    for noisy in ("httpx", "httpx2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        settings = Settings.from_env(os.environ)
    except ValueError as err:
        print(f"vllm-webui: {err}", file=sys.stderr)
        return 2
    page = build_page(settings, make_client(settings))
    log.info("serving on %s:%d for %s", settings.host, settings.port, settings.api_base)
    page.queue(default_concurrency_limit=settings.concurrency_limit).launch(
        server_name=settings.host,
        server_port=settings.port,
        root_path=settings.root_path,
        auth=(settings.auth_user, settings.auth_password) if settings.auth_user else None,
        share=False,
        inbrowser=False,
        show_error=False,
        ssr_mode=False,
        pwa=False,
        mcp_server=False,
        enable_monitoring=False,
        run_history=False,
        footer_links=[],
        quiet=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
