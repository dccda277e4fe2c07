"""pip's index arguments from a role's settings (filter ``pip_index_args``), shared by the roles
that run pip (vllm_build, vllm_install, vllm_webui): all reach the same indexes the same way."""

from __future__ import annotations

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


class FilterModule:
    """Ansible's entry point for the filters of this file."""

    def filters(self) -> dict[str, Any]:
        return {"pip_index_args": pip_index_args}
