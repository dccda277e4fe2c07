"""Quantized checkpoints deployed as a user would: the model role pointed at their repository.

The Hugging Face stand-in serves tiny random-weight Qwen2 models in the formats of the real
checkpoints (tests/fixtures/make_tiny_qwen2.py --quant):
- RedHatAI/Qwen2.5-1.5B-Instruct-quantized.w8a8: int8 weights and activations in compressed-tensors'
  W8A8 format, as llm-compressor writes them. vLLM 0.32 builds its int8 kernels for AVX2 too.
- Qwen/Qwen2.5-1.5B-Instruct-GPTQ-Int4: 4-bit weights in GPTQ's format (float16 scales per 128
  inputs), as Qwen publishes them. vLLM 0.32's 4-bit kernel is built for AVX-512 only; on a CPU with
  AVX-512 and no AMX this project's vLLM plugin (roles/vllm_install) runs its layers through torch's
  int4 GEMM instead; a test checks with a server's own Python that vLLM picks that kernel exactly
  there and that it computes what vLLM's own kernel does.
- Qwen/Qwen2.5-1.5B-Instruct-AWQ: 4-bit weights in AutoAWQ's GEMM format (packed along the
  outputs, zero points, float16 scales per 128 inputs), as Qwen publishes them. vLLM 0.32 converts
  them to GPTQ's layout at load and runs them with the same kernels as GPTQ (the plugin's too).
- standin/Qwen2.5-1.5B-Instruct-W4A16: 4-bit weights in compressed-tensors' W4A16 format
  (pack-quantized, groups of 128), as llm-compressor writes them; named for no real repository (none
  in this format for this model was found). On an AMD CPU with AVX-512, vLLM's ZenDNN path runs it
  through zentorch's DA8W4 kernel (the plugin leaves it there); elsewhere through the same 4-bit
  kernel as GPTQ.
- standin/Qwen2.5-1.5B-Instruct-W8A8-lm-head: W8A8 as above with lm_head in int8 too (untied, named
  in the quantization group's targets, as vLLM 0.32 needs to load it: with only "Linear" it fails);
  named for no real repository. On an AMD EPYC it decoded one stream faster than W8A8 with a bf16
  lm_head (benchmarks/README.md). The test reads its weights file: lm_head int8, untied.
Each checkpoint goes to its own server, whose model and service stages run with that repository
(the servers whose CPU can run theirs in one service stage, side by side); with more checkpoints
than servers, later rounds follow the first round's tests. Where the CPU has what
the checkpoint's kernel needs, the server must answer chat from the quantized weights; where it has
not, the service stage must refuse it, saying why, before it changes anything. So that the refusal
runs on every machine, it is also asked for on a server whose /proc/cpuinfo is replaced by one
without the AVX-512 flags (a bind mount, as LXCFS does for containers). W8A8 is served everywhere,
with a warning where the CPU has neither AVX-512 nor an int8 dot product (VNNI, AMX); the same kind
of mount shows that warning on every machine. GPTQ 4-bit is served with a warning where the CPU
has no AMX (vLLM's W4A16 kernel, measured slow), and W4A16 likewise unless the CPU takes the
ZenDNN path (measured fast there); with zentorch's package folder hidden on that server, the
service stage's checks warn there too, and on an AMD CPU say how to install zentorch. Afterwards
the fleet's model is served again, and the checkpoints' folders (and the fleet cache's entries) go.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import testinfra.utils.ansible_runner
from helpers import (
    CPUINFO_COPY,
    PYTHON,
    api,
    api_key,
    cpu_flags,
    cpuinfo_without,
    host_named,
    run_playbook,
    run_with_secret,
    server_state,
    zen_cpu,
)

INVENTORY = os.environ["MOLECULE_INVENTORY_FILE"]
SERVERS = testinfra.utils.ansible_runner.AnsibleRunner(INVENTORY).get_hosts("vllm_servers")
FLEET_MODEL = "/opt/vllm/models/Qwen2.5-1.5B-Instruct/current"
CACHE_MODELS = "/var/cache/vllm-fleet/models"  # fleet_cache_root: the cache host offers them there


@dataclass(frozen=True)
class Checkpoint:
    repo: str  # the repository id on the stand-in, as on huggingface.co
    tuning: str  # what the service stage's tuning says it read from the checkpoint
    engine: tuple[str, ...]  # what vLLM's journal says it loaded it with
    config: tuple[str, object]  # a key of its quantization_config and the value of that format
    needs: str | None  # the CPU flag its kernel needs (None: every x86 CPU vLLM 0.32 supports)
    refusal: str | None  # what the preflight says on a CPU without it
    slow: str | None = None  # what the service stage warns where this CPU runs it slowly:
    fast_with: frozenset[str] = frozenset()  # on a CPU with none of these flags
    fast_on_zen: bool = False  # ... and not on an AMD CPU with AVX-512 (vLLM's ZenDNN path)
    zen_engine: tuple[str, ...] = ()  # what the journal says too on such a CPU
    head: str = ""  # lm_head.weight's dtype in the weights file ("": none, tied to the embedding)

    @property
    def name(self) -> str:
        return self.repo.split("/")[1]


# AVX-512 or an int8 dot-product instruction (VNNI, AMX's int8 tiles): without any, W8A8 is served,
# with a warning
INT8_DOT_PRODUCT = frozenset({"avx512f", "avx512_vnni", "avx_vnni", "amx_int8"})
CHECKPOINTS = {
    "w8a8": Checkpoint(
        repo="RedHatAI/Qwen2.5-1.5B-Instruct-quantized.w8a8",
        tuning="compressed-tensors w8a8",
        engine=("quantization=compressed-tensors",),
        config=("format", "int-quantized"),
        needs=None,
        refusal=None,
        slow="W8A8 int8 is slow on this CPU",
        fast_with=INT8_DOT_PRODUCT,
    ),
    "gptq-int4": Checkpoint(
        repo="Qwen/Qwen2.5-1.5B-Instruct-GPTQ-Int4",
        tuning="gptq w4",
        # vLLM's CPU platform loads GPTQ as auto_gptq, with its 4-bit kernel ({wna16}: below)
        engine=("quantization=auto_gptq", "Using {wna16} for AutoGPTQLinearMethod"),
        config=("checkpoint_format", "gptq"),
        needs="avx512f",
        refusal="gptq 4-bit weights need AVX-512",
        # served where it runs (AVX-512), with a warning without AMX (its W4A8 path)
        slow="GPTQ 4-bit weights are slow on this CPU",
        fast_with=frozenset({"amx_tile"}),
    ),
    "awq": Checkpoint(
        repo="Qwen/Qwen2.5-1.5B-Instruct-AWQ",
        tuning="awq w4",
        # loaded as awq, through the same mixed-precision kernel selection as GPTQ
        engine=("quantization=awq", "Using {wna16} for AutoAWQMarlinLinearMethod"),
        config=("version", "gemm"),
        needs="avx512f",
        refusal="awq 4-bit weights need AVX-512",
        slow="AWQ 4-bit weights are slow on this CPU",
        fast_with=frozenset({"amx_tile"}),
    ),
    "w4a16": Checkpoint(
        repo="standin/Qwen2.5-1.5B-Instruct-W4A16",
        tuning="compressed-tensors w4",
        engine=("quantization=compressed-tensors", "Using {wna16} for CompressedTensorsWNA16"),
        config=("format", "pack-quantized"),
        needs="avx512f",
        refusal="compressed-tensors 4-bit weights need AVX-512",
        slow="compressed-tensors W4A16 is slow on this CPU",
        fast_with=frozenset({"amx_tile"}),
        fast_on_zen=True,
        # zentorch repacks its layers for its int8 x int4 GEMM (bf16 activations, symmetric)
        zen_engine=("[zen_cpu] Using zentorch_dynamic_qlinear for DA8W4",),
    ),
    "w8a8-head": Checkpoint(
        repo="standin/Qwen2.5-1.5B-Instruct-W8A8-lm-head",
        tuning="compressed-tensors w8a8",
        engine=("quantization=compressed-tensors",),
        config=("ignore", []),  # lm_head quantized, not ignored
        head="I8",
        needs=None,
        refusal=None,
        slow="W8A8 int8 is slow on this CPU",
        fast_with=INT8_DOT_PRODUCT,
    ),
}
# one server per checkpoint in a round; later rounds deploy after the first one's tests
ROUNDS = (("gptq-int4", "w8a8"), ("w4a16", "w8a8-head"), ("awq",))
assert sorted(k for keys in ROUNDS for k in keys) == sorted(CHECKPOINTS)
assert len(SERVERS) >= max(map(len, ROUNDS)), SERVERS
PLACED = {key: name for keys in ROUNDS for key, name in zip(keys, SERVERS, strict=False)}


@dataclass
class Deployed:
    runnable: bool  # this CPU has what the checkpoint's kernel needs
    rc: int  # the exit code and the output of the service stage that deployed it
    out: str
    before: tuple[str, str, int]  # the unit's and environment file's sha256 and vLLM's main pid
    after: tuple[str, str, int]
    seen: dict[str, Any] = field(default_factory=dict)  # the server right after (_observe)


def _stage(playbook: str, hosts: list[str], host_vars: dict, **extra: object) -> tuple[int, str]:
    """Run a stage on `hosts`, with variables per host."""
    return run_playbook(
        f"playbooks/{playbook}",
        "--limit",
        ",".join(hosts),
        extra_vars=extra,
        host_vars={h: host_vars[h] for h in hosts if h in host_vars},
    )


def _recap_ok(name: str, out: str) -> bool:
    """Whether the run's recap has `name` neither failed nor unreachable."""
    return bool(
        re.search(rf"(?<!\S){re.escape(name)} : ok=\d+ changed=\d+ unreachable=0 failed=0 ", out)
    )


def _get(host, path: str, body: dict | None = None) -> dict:
    """GET (or POST `body` to) the server with its key; the parsed JSON answer."""
    auth = shlex.quote(f"Authorization: Bearer {api_key(host)}")
    data = f"-H 'Content-Type: application/json' -d {shlex.quote(json.dumps(body))}" if body else ""
    rc, out, err = run_with_secret(
        host,
        f"curl --silent --show-error --fail-with-body --max-time 300 -H {auth} {data}"
        f" {shlex.quote(api(host) + path)}",
    )
    assert rc == 0, f"{err} {out[-500:]}"
    return json.loads(out)


def _deploying(checkpoint: Checkpoint) -> dict[str, str]:
    """A server's variables that point the model and service stages at the checkpoint."""
    return {
        "vllm_model_repo_url": f"http://hf-standin:8080/{checkpoint.repo}",
        "vllm_model_name": checkpoint.name,
        "vllm_service_served_model_name": checkpoint.repo,
    }


def _assert_refused(checkpoint: Checkpoint, done: Deployed) -> None:
    """Refused by the preflight, in words, before the unit or the running server changed."""
    assert done.rc != 0
    assert checkpoint.refusal and checkpoint.refusal in done.out, done.out[-3000:]
    assert "Write the systemd unit" not in done.out
    assert done.after == done.before


def _observe(host, checkpoint: Checkpoint, since: str) -> dict[str, Any]:
    """What the test checks of the running server, read as soon as the service stage ended (a later
    round replaces the checkpoint): vLLM's journal since the stage began, the served model, where
    its folder points, its config.json and one chat answer; `error` when a read failed."""
    seen: dict[str, Any] = {}
    try:
        seen["journal"] = host.check_output(
            "journalctl --unit vllm --since %s --no-pager --output cat", since
        )
        seen["model"] = model = _get(host, "/v1/models")["data"][0]
        seen["root"] = host.file(model["root"]).linked_to
        seen["fleet_root"] = host.file(FLEET_MODEL).linked_to
        seen["config"] = json.loads(host.file(f"{model['root']}/config.json").content_string)
        seen["head"] = host.check_output(
            "%s -c %s %s", PYTHON, HEAD_DTYPE, f"{model['root']}/model.safetensors"
        )
        chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
        seen["answer"] = _get(host, "/v1/chat/completions", {"model": checkpoint.repo, **chat})
    except Exception as error:  # reported by the test, with the stage's output
        seen["error"] = repr(error)
    return seen


# lm_head.weight's dtype in a safetensors file's header (8 bytes of length, then JSON), or ""
HEAD_DTYPE = (
    "import json, struct, sys; f = open(sys.argv[1], 'rb');"
    " h = json.loads(f.read(struct.unpack('<Q', f.read(8))[0]));"
    " print(h.get('lm_head.weight', {}).get('dtype', ''))"
)
HIDDEN = ".hidden-by-test"  # added to zentorch's package folder while it is hidden


def _zentorch_restored(host) -> tuple[str, str]:
    """Where zentorch's package folder is in `host`'s Python environment, and its name while hidden
    (`without_zentorch`); the folder renamed back first if a killed run left it hidden."""
    platlib = "import sysconfig; print(sysconfig.get_paths()['platlib'])"  # zentorch's wheel's
    site = host.check_output("%s -c %s", PYTHON, platlib)
    package, hidden = f"{site}/zentorch", f"{site}/zentorch{HIDDEN}"
    if host.file(hidden).exists and not host.file(package).exists:  # left by a killed run
        host.check_output("mv --no-target-directory %s %s", hidden, package)
    return package, hidden


def _deploy(keys: tuple[str, ...]) -> dict[str, Deployed]:
    """Each checkpoint of `keys` deployed on its server: the model stage for all, then one service
    stage for the servers that can run theirs (side by side) and one for each that cannot (its
    preflight stops the run); each server observed right after."""
    hosts = {key: host_named(PLACED[key]) for key in keys}
    for host in hosts.values():
        # the flags below must be the CPU's: a killed run may have left its fake cpuinfo mounted
        assert not host.file(CPUINFO_COPY).exists, f"{CPUINFO_COPY} is left mounted: umount it"
        _zentorch_restored(host)  # and it may have left zentorch's package folder hidden
    model_vars = {PLACED[key]: _deploying(CHECKPOINTS[key]) for key in keys}
    runnable = {key: CHECKPOINTS[key].needs in (None, *cpu_flags(hosts[key])) for key in keys}
    rc, out = _stage("model.yml", list(model_vars), model_vars)
    assert rc == 0, out[-3000:]
    result: dict[str, Deployed] = {}
    runs = [[key for key in keys if runnable[key]]] + [[key] for key in keys if not runnable[key]]
    for run in filter(None, runs):
        since = {key: hosts[key].check_output("date '+%Y-%m-%d %H:%M:%S'") for key in run}
        before = {key: server_state(hosts[key]) for key in run}
        rc, out = _stage(
            "serve.yml", [PLACED[key] for key in run], model_vars, vllm_rollout_batch=len(run)
        )
        for key in run:
            seen = _observe(hosts[key], CHECKPOINTS[key], since[key]) if runnable[key] else {}
            result[key] = Deployed(
                runnable[key], rc, out, before[key], server_state(hosts[key]), seen
            )
    return result


@pytest.fixture(scope="module")
def deployed() -> Iterator[dict[str, Deployed]]:
    """The first round's checkpoints deployed (`_deploy`). Afterwards, also after the later rounds,
    the service stage with the fleet's own model, and the checkpoints' folders go."""
    servers = sorted(set(PLACED.values()))
    hosts = [host_named(name) for name in servers]
    try:
        yield _deploy(ROUNDS[0])
    finally:
        rc, out = _stage("serve.yml", servers, {}, vllm_rollout_batch=len(servers))
        for host in hosts:
            for c in CHECKPOINTS.values():
                host.run("rm -rf %s %s", f"/opt/vllm/models/{c.name}", f"{CACHE_MODELS}/{c.name}")
        assert rc == 0, out[-3000:]
        for host in hosts:
            assert _get(host, "/v1/models")["data"][0]["id"] == "Qwen/Qwen2.5-1.5B-Instruct"


def _assert_deployed(key: str, done: Deployed) -> None:
    """Served, as that kind of checkpoint, where the CPU can run it; refused where it cannot."""
    checkpoint, host = CHECKPOINTS[key], host_named(PLACED[key])
    if not done.runnable:
        _assert_refused(checkpoint, done)
        return
    # its server's part of the shared run (the run's exit code would blame the other one too)
    assert _recap_ok(PLACED[key], done.out), done.out[-3000:]
    # the tuning read the checkpoint's quantization_config (the message is quoted when its dtype
    # reason holds ": ")
    tuning = re.search(
        rf"ok: \[{re.escape(PLACED[key])}\] => msg: '?dtype .*? quantization ([^,]+),", done.out
    )
    assert tuning and tuning.group(1) == checkpoint.tuning, done.out[-3000:]
    # on an AMD CPU with AVX-512, vLLM's ZenDNN path (roles/vllm_install) runs 4-bit layers too
    zen = zen_cpu(host)
    # a warning where this CPU runs it slowly, and only there
    warned = f"WARNING {PLACED[key]}: {checkpoint.slow}" in done.out if checkpoint.slow else False
    fast = checkpoint.fast_with & set(cpu_flags(host)) or (checkpoint.fast_on_zen and zen)
    assert warned == (bool(checkpoint.slow) and not fast), done.out[-3000:]
    seen = done.seen
    assert "error" not in seen, (seen.get("error"), done.out[-3000:])
    # vLLM loaded it as that kind of checkpoint (the unit's journal): its 4-bit layers first offered
    # to this project's kernel where it is installed for (roles/vllm_install's plugin: AVX-512
    # without AMX), which runs them unless they are compressed-tensors' on the ZenDNN path
    engine = checkpoint.engine + (checkpoint.zen_engine if zen else ())
    if int4pack_cpu(host):
        wna16 = INT4PACK
        if checkpoint.needs == "avx512f":  # a 4-bit checkpoint
            left = checkpoint.fast_on_zen and zen
            engine += (
                "4-bit layers left to ZentorchWNA16LinearKernel"
                if left
                else "4-bit layers through torch's int4 GEMM",
            )
    else:
        wna16 = "ZentorchWNA16LinearKernel" if zen else "CPUWNA16LinearKernel"
    for line in engine:
        assert line.format(wna16=wna16) in seen["journal"], seen["journal"][-3000:]
    assert seen["model"]["id"] == checkpoint.repo
    assert seen["root"].startswith(f"/opt/vllm/models/{checkpoint.name}/")
    assert seen["root"] != seen["fleet_root"]
    key_, value = checkpoint.config
    assert seen["config"]["quantization_config"][key_] == value
    # its own lm_head (int8 in the W8A8-lm-head one), or the embedding's, tied
    assert seen["head"] == checkpoint.head
    assert seen["config"]["tie_word_embeddings"] is not bool(checkpoint.head)
    answer = seen["answer"]
    assert answer["usage"]["completion_tokens"] > 0
    assert answer["choices"][0]["message"]["content"]


INT4PACK = "TorchInt4PackLinearKernel"  # roles/vllm_install/files/plugin's kernel
INT4_KERNEL_CHECK = Path(__file__).parent / "files" / "int4_kernel.py"


def int4pack_cpu(host) -> bool:
    """Where the plugin puts its kernel first: a CPU with AVX-512 and without AMX."""
    flags = set(cpu_flags(host))
    return "avx512f" in flags and "amx_tile" not in flags


def test_4bit_layers_go_to_torchs_int4_gemm_where_installed_for_and_compute_the_same() -> None:
    # the server's own Python (the installed plugin, vLLM's kernel selection and kernels): a GPTQ
    # and an AWQ-style layer, each computed by the chosen kernel and by vLLM's own 4-bit kernel
    host = host_named(SERVERS[0])
    out = json.loads(host.check_output("%s -c %s", PYTHON, INT4_KERNEL_CHECK.read_text()))
    assert "fleet_kernels" in out["plugins"], out
    avx512 = "avx512f" in cpu_flags(host)
    assert (out["capability"] == "AVX512") == avx512, out
    for weights, seen in out["layers"].items():
        assert (seen["chosen"] == INT4PACK) == int4pack_cpu(host), (weights, out)
        if not avx512:  # vLLM 0.32's own 4-bit kernel is not built below AVX-512
            continue
        assert seen["chosen_torch_int4pack"] == int4pack_cpu(host), (weights, out)
        assert not seen["vllm_torch_int4pack"], (weights, out)
        # bf16's rounding (~0.4 % of the largest output): within it of the dequantized weights'
        # product, and of vLLM's own kernel's distance from it (a zero point of the wrong sign is
        # off by ~190 %)
        assert seen["chosen_error"] < 0.01, (weights, out)
        assert seen["chosen_error"] < 2 * seen["vllm_error"] + 0.002, (weights, out)


@pytest.mark.parametrize("key", ROUNDS[0])
def test_a_quantized_checkpoint_is_served_where_the_cpu_can_and_refused_where_it_cannot(
    deployed: dict[str, Deployed], key: str
) -> None:
    _assert_deployed(key, deployed[key])


@pytest.fixture
def without_avx512(deployed: dict[str, Deployed]) -> Iterator[str]:
    """The GPTQ checkpoint's server with a /proc/cpuinfo without the AVX-512 and AMX flags (its
    running vLLM is not affected), restored afterwards; yields its name. After `deployed`, which
    put the checkpoint's folder on that server."""
    name = PLACED["gptq-int4"]
    host = host_named(name)
    with cpuinfo_without(host, "avx512[a-z0-9_]*|amx[a-z0-9_]*"):
        assert not {"avx512f", "amx_tile"} & set(cpu_flags(host))
        yield name


def test_a_4bit_checkpoint_is_refused_on_a_cpu_without_avx512(without_avx512: str) -> None:
    checkpoint, host = CHECKPOINTS["gptq-int4"], host_named(without_avx512)
    before = server_state(host)
    rc, out = _stage("serve.yml", [without_avx512], {without_avx512: _deploying(checkpoint)})
    _assert_refused(checkpoint, Deployed(False, rc, out, before, server_state(host)))


def _preflight_only(name: str, checkpoint: Checkpoint, refused: bool = False) -> str:
    """The service stage's checks only (read-only, on any CPU) on server `name`, pointed at
    `checkpoint`: refused, in words, or passed without a change (its recap); either way the unit is
    not written and the server is as before. The run's output, for what the test checks more."""
    host = host_named(name)
    before = server_state(host)
    rc, out = run_playbook(
        "playbooks/serve.yml",
        "--limit",
        name,
        "--tags",
        "vllm_service_preflight",
        host_vars={name: _deploying(checkpoint)},
    )
    if refused:
        assert rc != 0 and checkpoint.refusal and checkpoint.refusal in out, out[-3000:]
    else:
        assert rc == 0, out[-3000:]
        assert re.search(rf"{re.escape(name)} : ok=\d+ changed=0 ", out), out[-3000:]
    assert "Write the systemd unit" not in out
    assert server_state(host) == before
    return out


@pytest.fixture
def without_vnni(deployed: dict[str, Deployed]) -> Iterator[str]:
    """The W8A8 checkpoint's server with a /proc/cpuinfo without AVX-512, AMX and AVX-VNNI (no int8
    dot product), restored afterwards; yields its name. After `deployed`, which serves the
    checkpoint there."""
    name = PLACED["w8a8"]
    host = host_named(name)
    with cpuinfo_without(host, "avx512[a-z0-9_]*|amx[a-z0-9_]*|avx_vnni"):
        assert not INT8_DOT_PRODUCT & set(cpu_flags(host))
        yield name


def test_w8a8_on_a_cpu_without_an_int8_dot_product_is_served_with_a_warning(
    without_vnni: str,
) -> None:
    # the service stage's checks only (read-only, on any CPU): they pass, with the warning
    checkpoint = CHECKPOINTS["w8a8"]
    out = _preflight_only(without_vnni, checkpoint)
    assert f"WARNING {without_vnni}: {checkpoint.slow}" in out, out[-3000:]
    assert "serve the unquantized checkpoint here" in out


@pytest.fixture(scope="module")
def deployed_later(deployed: dict[str, Deployed]) -> dict[str, Deployed]:
    """The later rounds' checkpoints deployed (`_deploy`), after the first round's tests (this
    module's last tests ask for it); `deployed` serves the fleet's model again afterwards."""
    return {key: done for keys in ROUNDS[1:] for key, done in _deploy(keys).items()}


@pytest.mark.parametrize("key", [key for keys in ROUNDS[1:] for key in keys])
def test_a_quantized_checkpoint_of_a_later_round_is_served_or_refused_likewise(
    deployed_later: dict[str, Deployed], key: str
) -> None:
    _assert_deployed(key, deployed_later[key])


@pytest.fixture
def without_zentorch(deployed_later: dict[str, Deployed]) -> Iterator[str]:
    """The W4A16 checkpoint's server with zentorch's package folder renamed in its Python
    environment, so that the role's probe (find_spec) finds no zentorch there; its metadata stays,
    so pip freeze and the environment file's hash do not change, and the running vLLM has imported
    it already. Restored afterwards; yields the server's name. After `deployed_later`, which put the
    checkpoint's folder on that server. Where zentorch is not installed (off AMD), nothing is
    hidden."""
    name = PLACED["w4a16"]
    host = host_named(name)
    where = "import importlib.util as u; s = u.find_spec('zentorch'); print(s.origin if s else '')"
    package, hidden = _zentorch_restored(host)
    origin = host.check_output("%s -c %s", PYTHON, where)
    present = bool(origin)
    if present:
        assert origin == f"{package}/__init__.py", origin  # the folder renamed below
        host.check_output("mv --no-target-directory %s %s", package, hidden)
    try:
        assert host.check_output("%s -c %s", PYTHON, where) == ""
        yield name
    finally:
        if present:
            host.check_output("mv --no-target-directory %s %s", hidden, package)


def test_w4a16_where_zentorch_is_not_found_is_warned(without_zentorch: str) -> None:
    # the service stage's checks only (read-only): without zentorch vLLM runs W4A16 on
    # cpu_gemm_wna16 (measured slow), so the stage warns wherever the CPU has no AMX, on an AMD CPU
    # with AVX-512 too, and there it says how to install zentorch
    checkpoint, host = CHECKPOINTS["w4a16"], host_named(without_zentorch)
    flags = set(cpu_flags(host))
    refused = checkpoint.needs not in flags  # no 4-bit kernel at all: refused
    out = _preflight_only(without_zentorch, checkpoint, refused)
    if not refused:
        warned = f"WARNING {without_zentorch}: {checkpoint.slow}" in out
        assert warned == (not checkpoint.fast_with & flags), out[-3000:]
        assert ("vllm_install_zendnn: true" in out) == (warned and zen_cpu(host)), out[-3000:]
