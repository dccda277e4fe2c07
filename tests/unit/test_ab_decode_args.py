"""benchmarks/ab_decode.py refuses a pairing that measures nothing before it touches the host.

Every refusal is argparse's (exit code 2, the reason on stderr) and comes before the first step that
looks at the host or builds anything: `configs.host_facts` and the cache builders (the vLLM venv,
the models, llama.cpp and its GGUF) are replaced by a function that stops the script, so a refusal
that came too late, or one that went missing, fails here, and nothing is built.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import ab_decode
from servebench import artifacts, configs


class _Reached(Exception):
    """The arguments were accepted: the script went on to read the host."""


@pytest.fixture(autouse=True)
def _no_host(monkeypatch: pytest.MonkeyPatch) -> None:
    def reached(*_args: object) -> dict[str, object]:
        raise _Reached

    monkeypatch.setattr(configs, "host_facts", reached)
    for builder in ("ensure_vllm_venv", "ensure_model", "ensure_llama_server", "matched_gguf"):
        monkeypatch.setattr(artifacts, builder, reached)


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (["--a", "int8", "--b", "int8"], "--b-set changes nothing"),
        (["--b-set", "vllm_service_port=9"], "VAR must be one of the defaults"),
        (["--b-set", "vllm_service_served_model_name=x"], "VAR must be one of the defaults"),
        (["--b-set", "vllm_service_disable_multiprocessing"], "expected VAR=VALUE"),
        (["--b", "int8", "--b-set", "vllm_service_disable_multiprocessing="], "VALUE is empty"),
        (
            ["--b", "llamacpp", "--b-set", "vllm_service_disable_multiprocessing=true"],
            "applies to the tuned service",
        ),
        (["--b", "llamacpp", "--decode-tokens", "249"], "slots hold 256 tokens"),  # 8 + 249
        (["--b", "int8-head", "--llamacpp-as", "int4"], "only with --b llamacpp"),
        (["--a", "int4", "--b", "llamacpp", "--llamacpp-as", "int4"], "another precision"),
    ],
)
def test_refused_before_the_host_is_read(
    argv: list[str], reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        ab_decode.main(argv)
    assert exit_info.value.code == 2
    assert reason in capsys.readouterr().err


def test_the_roles_default_value_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """Setting B to what A has already would pair a server with its twin."""
    var = "vllm_service_disable_multiprocessing"
    default = artifacts.role_defaults("vllm_service")[var]
    with pytest.raises(SystemExit) as exit_info:
        ab_decode.main(["--b", "int8", "--b-set", f"{var}={str(default).lower()}"])
    assert exit_info.value.code == 2
    assert "the role's default" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["--a", "int8", "--b", "llamacpp", "--decode-tokens", "248"],
        ["--a", "int8", "--b", "int8", "--b-set", "vllm_service_disable_multiprocessing=true"],
        ["--a", "bf16", "--b", "int8-head"],
        ["--a", "int8-head", "--b", "llamacpp", "--llamacpp-as", "int4"],
    ],
)
def test_a_pairing_that_measures_something_goes_on(argv: list[str]) -> None:
    with pytest.raises(_Reached):
        ab_decode.main(argv)


def test_every_setting_it_accepts_is_a_role_default() -> None:
    """TUNED_READS is read from configs.tuned's source: it must find names, and real ones."""
    defaults = artifacts.role_defaults("vllm_service")
    assert "vllm_service_disable_multiprocessing" in ab_decode.TUNED_READS
    assert defaults.keys() >= ab_decode.TUNED_READS
    assert "vllm_service_kvcache_space_gib" not in ab_decode.TUNED_READS
