"""The wheel reader of roles/vllm_build (files/vllm_wheel_facts.py), run as the role runs it.

Wheels are written here as pip writes them (a .dist-info with METADATA, WHEEL and entry_points.txt);
the role's assertions read the facts printed, so what a wrong wheel looks like is checked here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

READER = Path(__file__).resolve().parents[2] / "roles/vllm_build/files/vllm_wheel_facts.py"
NAME = "vllm-0.32.0+cpu-cp312-cp312-linux_x86_64.whl"


KERNELS = ("_C.abi3.so", "_C_AVX2.abi3.so", "_C_AVX512.cpython-312-x86_64-linux-gnu.so")


def _wheel(
    folder: Path, name: str = NAME, kernels: tuple[str, ...] = KERNELS, scripts: bool = True
) -> None:
    info = "vllm-0.32.0+cpu.dist-info"
    with zipfile.ZipFile(folder / name, "w") as wheel:
        metadata = "Metadata-Version: 2.4\nName: vllm\nVersion: 0.32.0+cpu\n"
        wheel.writestr(f"{info}/METADATA", metadata)
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nTag: cp312-cp312-linux_x86_64\n")
        if scripts:
            wheel.writestr(f"{info}/entry_points.txt", "[console_scripts]\nvllm = vllm.cli:main\n")
        wheel.writestr("vllm/__init__.py", "")
        wheel.writestr("vllm/_C_utils.abi3.so", "")  # not a kernel library of the three
        for kernel in kernels:
            wheel.writestr(f"vllm/{kernel}", "")


def _read(folder: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(READER), str(folder)], capture_output=True, text=True, check=False
    )


def test_the_facts_of_the_one_vllm_wheel(tmp_path: Path) -> None:
    _wheel(tmp_path)
    (tmp_path / "other-1.0-py3-none-any.whl").write_bytes(b"not read")  # not a vllm wheel
    result = _read(tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "file": NAME,
        "name": "vllm",
        "version": "0.32.0+cpu",
        "tags": ["cp312-cp312-linux_x86_64"],
        "kernels": ["_C", "_C_AVX2", "_C_AVX512"],
        "console_scripts": ["vllm"],
    }


def test_no_wheel_or_two_wheels_is_an_error(tmp_path: Path) -> None:
    assert _read(tmp_path).returncode == 1
    _wheel(tmp_path)
    _wheel(tmp_path, name="vllm-0.31.0+cpu-cp312-cp312-linux_x86_64.whl")
    result = _read(tmp_path)
    assert result.returncode == 1
    assert "exactly one vllm-*.whl" in result.stderr


def test_a_wheel_without_entry_points_has_no_console_script(tmp_path: Path) -> None:
    _wheel(tmp_path, kernels=("_C_AVX2.abi3.so",), scripts=False)
    facts = json.loads(_read(tmp_path).stdout)
    assert (facts["kernels"], facts["console_scripts"]) == (["_C_AVX2"], [])
