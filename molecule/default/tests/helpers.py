"""Helpers shared by the default scenario's tests: where a server listens, and its API key."""

from __future__ import annotations

import re


def api(host) -> str:
    """Base URL of the server: the address its unit listens on (see vllm_service_host)."""
    unit = host.file("/etc/systemd/system/vllm.service").content_string
    address = re.search(r'--host "([^"]+)"', unit).group(1)
    return f"http://{'127.0.0.1' if address == '0.0.0.0' else address}:8000"


def api_key(host) -> str:
    """The API key, as the service reads it from its environment file."""
    env = host.check_output("grep ^VLLM_API_KEY= /etc/vllm/vllm.env")
    return env.split("=", 1)[1]
