"""Shared fixtures of the web UI tests: the real vLLM server to talk to and a recording proxy.

The server comes from the environment (the Molecule verify step sets it):
  VLLM_WEBUI_TEST_API_BASE  e.g. http://10.89.0.3:8000/v1 (a real vLLM server, OpenAI API)
  VLLM_WEBUI_TEST_API_KEY   its API key ("" when it has none)
  VLLM_WEBUI_TEST_MODEL     a served model name (default Qwen/Qwen2.5-1.5B-Instruct)
"""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
from collections.abc import Callable
from types import ModuleType

import pytest
from webui_recorder import APP_DIR, Backend, Recorder


@pytest.fixture(scope="session")
def app() -> ModuleType:
    """The web UI's module (roles/vllm_webui/files/app.py); it imports gradio only for the page."""
    spec = importlib.util.spec_from_file_location("vllm_webui_app", APP_DIR / "app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def backend() -> Backend:
    """The real server named by VLLM_WEBUI_TEST_API_BASE; skips the test when it is not set."""
    api_base = os.environ.get("VLLM_WEBUI_TEST_API_BASE", "").rstrip("/")
    if not api_base:
        pytest.skip(
            "VLLM_WEBUI_TEST_API_BASE is not set: this test needs a real vLLM server "
            "(the Molecule verify step provides one)"
        )
    return Backend(
        api_base=api_base,
        api_key=os.environ.get("VLLM_WEBUI_TEST_API_KEY", ""),
        model=os.environ.get("VLLM_WEBUI_TEST_MODEL", "Qwen/Qwen2.5-1.5B-Instruct"),
    )


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on (it was free a moment ago)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def recorder(backend: Backend, serve: Callable[[Recorder], Recorder]) -> Recorder:
    """A recording proxy in front of the real server, for one test."""
    return serve(Recorder(backend.api_base))
