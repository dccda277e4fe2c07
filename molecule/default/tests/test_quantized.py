"""A quantized checkpoint deployed as a user would: the model role pointed at a W8A8 repository.

The Hugging Face stand-in serves RedHatAI/Qwen2.5-1.5B-Instruct-quantized.w8a8: a tiny random-weight
Qwen2 whose linear layers are int8 in compressed-tensors' W8A8 format, the format of
llm-compressor's real checkpoints (tests/fixtures/make_tiny_qwen2.py --quant w8a8). The model and
service stages run on one server with that repository, the server must answer chat from the int8
weights, and the fleet's model is served again afterwards, whatever happened.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Iterator

import pytest
import testinfra.utils.ansible_runner
from helpers import api, api_key, run_playbook

INVENTORY = os.environ["MOLECULE_INVENTORY_FILE"]
HOST = testinfra.utils.ansible_runner.AnsibleRunner(INVENTORY).get_hosts("vllm_servers")[-1]
testinfra_hosts = [HOST]
REPO = "http://hf-standin:8080/RedHatAI/Qwen2.5-1.5B-Instruct-quantized.w8a8"
NAME = "Qwen2.5-1.5B-Instruct-quantized.w8a8"
SERVED = "RedHatAI/Qwen2.5-1.5B-Instruct-quantized.w8a8"
FLEET_MODEL = "/opt/vllm/models/Qwen2.5-1.5B-Instruct/current"


def _stage(playbook: str, **extra_vars: object) -> tuple[int, str]:
    return run_playbook(f"playbooks/{playbook}", "--limit", HOST, extra_vars=extra_vars)


def _get(host, path: str, body: dict | None = None) -> dict:
    """GET (or POST `body` to) the server with its key; the parsed JSON answer."""
    auth = shlex.quote(f"Authorization: Bearer {api_key(host)}")
    data = f"-H 'Content-Type: application/json' -d {shlex.quote(json.dumps(body))}" if body else ""
    out = host.check_output(
        f"curl --silent --show-error --fail-with-body --max-time 300 -H {auth} {data}"
        f" {shlex.quote(api(host) + path)}"
    )
    return json.loads(out)


@pytest.fixture
def w8a8_served(host) -> Iterator[str]:
    """Serve the W8A8 repository on HOST; then the fleet's model again, and its folder goes."""
    since = host.check_output("date '+%Y-%m-%d %H:%M:%S'")
    try:
        rc, out = _stage("model.yml", vllm_model_repo_url=REPO, vllm_model_name=NAME)
        assert rc == 0, out[-3000:]
        rc, out = _stage("serve.yml", vllm_model_name=NAME, vllm_service_served_model_name=SERVED)
        assert rc == 0, out[-3000:]
        # the tuning read the checkpoint's quantization_config (int8 weights and activations)
        assert "quantization compressed-tensors w8a8," in out, out[-3000:]
        yield since
    finally:
        rc, out = _stage("serve.yml")
        host.run("rm -rf %s", f"/opt/vllm/models/{NAME}")
        assert rc == 0, out[-3000:]
        assert _get(host, "/v1/models")["data"][0]["id"] == "Qwen/Qwen2.5-1.5B-Instruct"


def test_a_w8a8_int8_checkpoint_is_served_and_answers_chat(host, w8a8_served: str) -> None:
    # vLLM loaded it as a compressed-tensors checkpoint (its engine config, in the unit's journal)
    journal = host.check_output(
        "journalctl --unit vllm --since %s --no-pager --output cat", w8a8_served
    )
    assert "quantization=compressed-tensors" in journal, journal[-3000:]
    model = _get(host, "/v1/models")["data"][0]
    assert model["id"] == SERVED
    assert host.file(model["root"]).linked_to.startswith(f"/opt/vllm/models/{NAME}/")
    assert host.file(model["root"]).linked_to != host.file(FLEET_MODEL).linked_to
    config = json.loads(host.file(f"{model['root']}/config.json").content_string)
    assert config["quantization_config"]["format"] == "int-quantized"
    answer = _get(
        host,
        "/v1/chat/completions",
        {"model": SERVED, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8},
    )
    assert answer["usage"]["completion_tokens"] > 0
    assert answer["choices"][0]["message"]["content"]
