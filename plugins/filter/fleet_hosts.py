"""Facts of other hosts, shared by the roles that open a port to a group of hosts (vllm_service's
firewall, vllm_monitoring's node exporter): every address those hosts have, from their gathered
facts (filter ``host_addresses``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def host_addresses(hostvars: Mapping[str, Any], hosts: Iterable[str] | None) -> list[str]:
    """Return every IPv4 and IPv6 address (``all_ipv4_addresses``, ``all_ipv6_addresses``) of the
    hosts, in order, each once; a host without gathered facts adds none."""
    found: list[str] = []
    for host in hosts or []:
        facts = hostvars[host].get("ansible_facts", {}) if host in hostvars else {}
        for key in ("all_ipv4_addresses", "all_ipv6_addresses"):
            for address in (facts or {}).get(key) or []:
                if address not in found:
                    found.append(address)
    return found


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"host_addresses": host_addresses}
