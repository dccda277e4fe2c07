"""pip helpers shared by the roles that run pip (vllm_build, vllm_install, vllm_webui): the index
arguments from a role's settings (filter ``pip_index_args``), so that all reach the same indexes
the same way; the pins of a lock that an environment lacks (filter ``pip_missing``), so that
pip runs only when something is missing and a converged host reports no change; and the normalised
names of requirement or ``pip freeze`` lines (filter ``pip_names``)."""

from __future__ import annotations

import re
from typing import Any


def pip_index_args(
    index_url: str,
    extra_index_urls: list[str] | None = None,
    find_links: list[str] | None = None,
    trusted_hosts: list[str] | None = None,
) -> list[str]:
    """Return pip's arguments: the index (pip's own configuration when empty), the extra indexes,
    the local wheel folders and the hosts trusted without TLS, in that order; no empty items."""
    args = ["--index-url", index_url] if index_url else []
    args += [f"--extra-index-url={url}" for url in extra_index_urls or [] if url]
    args += [f"--find-links={path}" for path in find_links or [] if path]
    args += [f"--trusted-host={host}" for host in trusted_hosts or [] if host]
    return args


def _pin(line: str) -> str:
    """A requirement line as ``name==version`` with the name normalised (PEP 503), else as is."""
    name, sep, version = line.strip().partition("==")
    if not sep:
        return line.strip()
    return f"{re.sub(r'[-_.]+', '-', name.strip()).lower()}=={version.strip()}"


def _lines(text: str | list[str]) -> list[str]:
    """The requirement lines of a text or list, without blank lines and comments."""
    lines = text.splitlines() if isinstance(text, str) else text
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def pip_names(lines: str | list[str]) -> list[str]:
    """Return the distribution names of requirement or ``pip freeze`` lines (a text or a list;
    comments and blank lines ignored), normalised (PEP 503): what precedes a version, extras, a
    marker or a direct URL (``name @ file:///...``)."""
    names = (re.split(r"[\s=<>!~@;\[]", line)[0] for line in _lines(lines))
    return [_pin(f"{name}==").split("==")[0] for name in names]


def pip_missing(
    lock: str | list[str], freeze: list[str], exclude: list[str] | None = None
) -> list[str]:
    """Return the pins of a lock (its text or lines; comments and blank lines ignored) that are not
    among the lines of ``pip freeze``, names compared normalised; ``exclude`` drops names."""
    skip = set(pip_names(exclude or []))
    pins = [_pin(line) for line in _lines(lock)]
    installed = {_pin(line) for line in freeze}
    return [pin for pin in pins if pin not in installed and pin.split("==")[0] not in skip]


class FilterModule:
    """Ansible's entry point for the filters of this file."""

    def filters(self) -> dict[str, Any]:
        return {
            "pip_index_args": pip_index_args,
            "pip_missing": pip_missing,
            "pip_names": pip_names,
        }
