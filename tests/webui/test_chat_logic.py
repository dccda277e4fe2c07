"""The web UI's chat logic (roles/vllm_webui/files/app.py) against a real vLLM server.

What goes over the wire is read from a recording proxy between the client and the server
(webui_recorder.Recorder). The model has random weights: the tests check what is sent and that text
streams back, not what it says. Settings and message building need no server.
"""

from __future__ import annotations

import inspect
from types import ModuleType

import pytest
from webui_recorder import Backend, Recorder

GRADIO_HISTORY = [
    # as Gradio 6's chat components pass it: content as a list of text parts
    {"role": "user", "content": [{"type": "text", "text": "My name is Ada."}], "metadata": None},
    {"role": "assistant", "content": [{"type": "text", "text": "Hello Ada."}], "metadata": None},
]
SHORT = {"max_tokens": 16, "temperature": 0.7, "top_p": 0.8, "repetition_penalty": 1.05}


def _client(app: ModuleType, api_base: str, api_key: str) -> object:
    return app.make_client(app.Settings(api_base=api_base, api_key=api_key))


def test_messages_hold_the_system_prompt_and_every_earlier_turn(app: ModuleType) -> None:
    messages = app.build_messages("Be brief.", GRADIO_HISTORY, "What is my name?")
    assert messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Hello Ada."},
        {"role": "user", "content": "What is my name?"},
    ]


def _as_chatbot_gives_back(*texts: str) -> list[dict[str, object]]:
    """A history of alternating questions and answers as the Chatbot gives it back (cleandoc)."""
    return [
        {"role": ("user", "assistant")[i % 2], "content": [{"type": "text", "text": t}]}
        for i, t in enumerate(inspect.cleandoc(text) for text in texts)
    ]


QUESTION, ANSWER = "Fix this:\n    x = 1\n    y = 2", "Here:\n\n    x = 1\n      y = 2\n"


def _streamed(originals: object, answer: str, step: int = 3) -> None:
    """Stream `answer` into `originals` as the page does, `step` characters at a time."""
    for end in range(step, len(answer) + step, step):
        originals.stream(answer[:end])  # type: ignore[attr-defined]


def test_messages_carry_texts_as_they_were_not_as_the_chatbot_changed_them(
    app: ModuleType,
) -> None:
    originals = app.Originals()
    assert originals.begin([], QUESTION) == QUESTION
    _streamed(originals, ANSWER)
    history = _as_chatbot_gives_back(QUESTION, ANSWER)
    assert inspect.cleandoc(ANSWER) != ANSWER.strip()
    assert originals.begin(history, "Thanks.") == "Thanks."  # as the page starts each turn
    assert app.build_messages("", history, "Thanks.", originals) == [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": ANSWER.strip()},
        {"role": "user", "content": "Thanks."},
    ]
    assert sorted(originals.texts.values()) == sorted([QUESTION, ANSWER.strip()])
    originals.note("user", "Plain\ntext")  # texts the Chatbot keeps unchanged need no entry
    assert len(originals.texts) == 2
    # a question equal to the Chatbot's form of the earlier answer is the question as typed
    assert originals.begin(history, inspect.cleandoc(ANSWER)) == inspect.cleandoc(ANSWER)


def test_an_answer_cut_short_by_stop_goes_as_streamed_whichever_step_the_page_shows(
    app: ModuleType,
) -> None:
    answer = "Here:\n" + "".join(f"    line {n}\n" for n in range(40))
    for shown_steps_back in (0, 1, 5):  # the page may show a step before the last one streamed
        originals = app.Originals()
        originals.begin([], QUESTION)
        _streamed(originals, answer[:-20])  # then Stop
        shown = answer[:-20][: originals.ends[-1 - shown_steps_back]]
        assert inspect.cleandoc(shown) != shown.strip()
        history = _as_chatbot_gives_back(QUESTION, shown)
        originals.begin(history, "Go on.")
        assert app.build_messages("", history, "Go on.", originals)[:2] == [
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": shown.strip()},
        ], shown_steps_back


def test_retry_sends_the_question_as_typed_and_cleared_texts_are_forgotten(
    app: ModuleType,
) -> None:
    originals = app.Originals()
    originals.begin([], QUESTION)
    _streamed(originals, ANSWER)
    # Retry: the Chatbot drops the last turn and passes its question back in its own form
    assert originals.begin([], inspect.cleandoc(QUESTION)) == QUESTION
    assert list(originals.texts.values()) == [QUESTION]  # kept for the answer to come
    originals.begin([], "Something else")  # Clear, then a new question
    assert originals.texts == {} and originals.ends == []


def test_messages_leave_out_empty_turns_annotations_and_an_empty_system_prompt(
    app: ModuleType,
) -> None:
    history = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": []},  # an answer that failed
        {"role": "assistant", "content": "thinking", "metadata": {"title": "Thought"}},
        {"role": "assistant", "content": [{"type": "file", "file": {"path": "/x.png"}}]},
    ]
    assert app.build_messages("  ", history, "second") == [
        {"role": "user", "content": "first"},
        {"role": "user", "content": "second"},
    ]


def test_settings_come_from_the_environment(app: ModuleType) -> None:
    settings = app.Settings.from_env(
        {"VLLM_WEBUI_API_BASE": "http://gw/v1/", "VLLM_WEBUI_PORT": "8080"}
        | {"VLLM_WEBUI_AUTH_USER": "ada", "VLLM_WEBUI_AUTH_PASSWORD": "s3cret"}
    )
    assert (settings.api_base, settings.port, settings.host) == ("http://gw/v1", 8080, "127.0.0.1")
    assert (settings.auth_user, settings.auth_password) == ("ada", "s3cret")
    assert app.Settings.from_env({}) == app.Settings()
    assert app.Settings.from_env({"VLLM_WEBUI_SESSION_HEADER": ""}).session_header == ""


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"VLLM_WEBUI_PORT": "70000"}, "VLLM_WEBUI_PORT must be between"),
        ({"VLLM_WEBUI_PORT": "http"}, "VLLM_WEBUI_PORT must be a number"),
        ({"VLLM_WEBUI_API_BASE": "gw:8000/v1"}, "must be an http(s) URL"),
        ({"VLLM_WEBUI_AUTH_USER": "ada"}, "go together"),
        ({"VLLM_WEBUI_TEMPERATURE": "9"}, "VLLM_WEBUI_TEMPERATURE must be between"),
        ({"VLLM_WEBUI_SESSION_HEADER": "X Session"}, "VLLM_WEBUI_SESSION_HEADER must be"),
        ({"VLLM_WEBUI_SESSION_HEADER": "Authorization"}, "VLLM_WEBUI_SESSION_HEADER must be"),
    ],
)
def test_bad_settings_are_refused_by_name(app: ModuleType, env: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        app.Settings.from_env(env)


def test_the_whole_conversation_reaches_the_server(
    app: ModuleType, backend: Backend, recorder: Recorder
) -> None:
    client = _client(app, recorder.url_for(backend.api_base), backend.api_key)
    messages = app.build_messages("Be brief.", GRADIO_HISTORY, "What is my name?")
    reply = "".join(app.stream_reply(client, backend.model, messages, app.Sampling(**SHORT)))

    (chat,) = recorder.chats()
    assert chat.status == 200
    assert chat.request["messages"] == messages
    assert chat.request["stream"] is True
    assert chat.request["model"] == backend.model
    assert chat.request["max_tokens"] == SHORT["max_tokens"]
    assert chat.request["repetition_penalty"] == SHORT["repetition_penalty"]
    assert reply == chat.streamed_text() != ""


def test_each_turn_names_its_conversation_for_the_gateway(
    app: ModuleType, backend: Backend, recorder: Recorder
) -> None:
    client = _client(app, recorder.url_for(backend.api_base), backend.api_key)
    first_turn = app.build_messages("Be brief.", [], "My name is Ada.")
    second_turn = app.build_messages("Be brief.", GRADIO_HISTORY, "What is my name?")
    another = app.build_messages("Be brief.", [], "Something else.")
    for messages in (first_turn, second_turn, another):
        list(app.stream_reply(client, backend.model, messages, app.Sampling(**SHORT)))
    names = [chat.headers.get("x-session-id") for chat in recorder.chats()]
    # the turns of one conversation share its name (the gateway sends them to one server, whose
    # prefix cache holds the earlier turns); another conversation gets another name
    assert names[0] and names[0] == names[1] != names[2]


def test_the_session_header_is_the_one_configured(
    app: ModuleType, backend: Backend, recorder: Recorder
) -> None:
    settings = app.Settings.from_env({"VLLM_WEBUI_SESSION_HEADER": "X-Conversation"})
    client = _client(app, recorder.url_for(backend.api_base), backend.api_key)
    messages = app.build_messages("Be brief.", [], "Hello.")
    sampling = app.Sampling(**SHORT)
    list(app.stream_reply(client, backend.model, messages, sampling, settings.session_header))
    list(app.stream_reply(client, backend.model, messages, sampling, ""))
    named, unnamed = recorder.chats()[-2:]
    assert named.headers.get("x-conversation") == app.session_id(messages)
    assert "x-session-id" not in named.headers
    assert "x-session-id" not in unnamed.headers and "x-conversation" not in unnamed.headers


def test_the_reply_streams_in_several_pieces(app: ModuleType, backend: Backend) -> None:
    client = _client(app, backend.api_base, backend.api_key)
    messages = app.build_messages("", [], "Count to ten.")
    pieces = list(app.stream_reply(client, backend.model, messages, app.Sampling(**SHORT)))
    assert len(pieces) >= 3, pieces
    assert all(isinstance(p, str) and p for p in pieces)


def test_models_are_listed_and_the_first_is_the_default(app: ModuleType, backend: Backend) -> None:
    client = _client(app, backend.api_base, backend.api_key)
    models = app.list_models(client)
    assert backend.model in models
    assert app.resolve_model(client, "") == models[0]
    assert app.resolve_model(client, "chosen") == "chosen"


def test_a_wrong_key_becomes_a_clear_message(app: ModuleType, backend: Backend) -> None:
    if not backend.api_key:
        pytest.skip("the test server has no API key (VLLM_WEBUI_TEST_API_KEY is empty)")
    client = _client(app, backend.api_base, backend.api_key + "-wrong")
    messages = app.build_messages("", [], "Hello")
    with pytest.raises(app.BackendError) as failure:
        list(app.stream_reply(client, backend.model, messages, app.Sampling(**SHORT)))
    assert "refused the web UI's API key (HTTP 401)" in str(failure.value)
    with pytest.raises(app.BackendError, match="HTTP 401"):
        app.list_models(client)


def test_a_server_that_is_down_becomes_a_clear_message(app: ModuleType, closed_port: int) -> None:
    api_base = f"http://127.0.0.1:{closed_port}/v1"
    client = _client(app, api_base, "any")
    with pytest.raises(app.BackendError) as failure:
        list(app.stream_reply(client, "m", app.build_messages("", [], "Hello"), app.Sampling()))
    assert str(failure.value).startswith(f"Cannot reach the model server at {api_base}: it is down")
    with pytest.raises(app.BackendError, match="Cannot reach the model server"):
        app.resolve_model(client, "")


def test_an_unknown_model_becomes_a_clear_message(app: ModuleType, backend: Backend) -> None:
    client = _client(app, backend.api_base, backend.api_key)
    with pytest.raises(app.BackendError) as failure:
        list(
            app.stream_reply(
                client, "no-such-model", app.build_messages("", [], "Hi"), app.Sampling()
            )
        )
    assert "The model 'no-such-model' is not served" in str(failure.value)


def test_a_wrong_api_path_becomes_a_clear_message(app: ModuleType, backend: Backend) -> None:
    api_base = backend.api_base.removesuffix("/v1")
    client = _client(app, api_base, backend.api_key)
    with pytest.raises(app.BackendError, match="it usually ends in /v1"):
        list(
            app.stream_reply(
                client, backend.model, app.build_messages("", [], "Hi"), app.Sampling()
            )
        )


def test_a_conversation_too_long_for_the_model_becomes_a_clear_message(
    app: ModuleType, backend: Backend
) -> None:
    client = _client(app, backend.api_base, backend.api_key)
    sampling = app.Sampling(max_tokens=10_000_000)
    with pytest.raises(app.BackendError, match=r"HTTP 400: .*clear it or lower Max new tokens"):
        list(app.stream_reply(client, backend.model, app.build_messages("", [], "Hi"), sampling))


def test_stopping_early_closes_the_stream(
    app: ModuleType, backend: Backend, recorder: Recorder
) -> None:
    client = _client(app, recorder.url_for(backend.api_base), backend.api_key)
    # A long answer, paced as a CPU serving a real model streams: 200 tokens of the tiny test model
    # had all arrived (with [DONE]) before the client's Stop in one CI run.
    recorder.steer_next_answer()
    sampling = app.Sampling(max_tokens=200)
    reply = app.stream_reply(client, backend.model, app.build_messages("", [], "Hi"), sampling)
    assert next(reply)
    reply.close()  # what Gradio does when the person presses Stop
    (chat,) = recorder.chats()
    # A client that kept the connection open would have received the whole answer by now.
    assert chat.finished.wait(60), "the connection stayed open after the reply was closed"
    assert "data: [DONE]" not in chat.response.decode()
