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
