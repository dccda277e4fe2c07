"""Facts of other hosts, shared by the roles that open a port to a group of hosts (vllm_service's
firewall, vllm_monitoring's node exporter): every address those hosts have, from their gathered
facts (filter ``host_addresses``); the one address the others reach a server on (filter
``server_address``: the gateway's upstream, Prometheus's targets, the node exporter's bind); and an
address as it goes in a URL or ``host:port`` (filter ``url_host``: IPv6 in brackets)."""

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


# Listen addresses that name no host: every interface, or not chosen yet.
_WILDCARDS = ("", "0.0.0.0", "::", "[::]")


def server_address(hostvars: Mapping[str, Any], host: str) -> str:
    """Return the address other hosts reach ``host``'s vLLM on: the address vllm_service publishes
    (``vllm_service_listen_address``, in the same run or set in the inventory), else
    ``vllm_service_host``, either unless it is a wildcard; else the host's default IPv4 address
    (its facts), else ``ansible_host``, else the inventory name."""
    hv = hostvars[host]
    for name in ("vllm_service_listen_address", "vllm_service_host"):
        value = str(hv.get(name) or "").strip()
        if value not in _WILDCARDS:
            return value
    facts = hv.get("ansible_facts") or {}
    default_ipv4 = (facts.get("default_ipv4") or {}).get("address")
    return str(default_ipv4 or hv.get("ansible_host") or host).strip()


def url_host(address: str) -> str:
    """Return ``address`` as the host of a URL or of ``host:port``: an IPv6 address in brackets
    (once), anything else as it is; surrounding white space dropped."""
    address = str(address).strip()
    return f"[{address}]" if ":" in address and not address.startswith("[") else address


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "host_addresses": host_addresses,
            "server_address": server_address,
            "url_host": url_host,
        }
