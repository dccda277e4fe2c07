"""Every address of a group of hosts, and the one a server is reached on
(plugins/filter/fleet_hosts.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_PATH = Path(__file__).resolve().parents[2] / "plugins/filter/fleet_hosts.py"
_SPEC = importlib.util.spec_from_file_location("fleet_hosts", _PATH)
assert _SPEC and _SPEC.loader
fleet_hosts = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(fleet_hosts)

HOSTVARS = {
    "gw-1": {
        "ansible_facts": {
            "all_ipv4_addresses": ["10.0.0.5", "172.17.0.2"],
            "all_ipv6_addresses": ["fd00::5"],
        }
    },
    "mon-1": {"ansible_facts": {"all_ipv4_addresses": ["10.0.0.9", "10.0.0.5"]}},
    "new-1": {},
}


def test_every_address_of_every_host_once_in_order() -> None:
    addresses = fleet_hosts.host_addresses(HOSTVARS, ["gw-1", "mon-1"])
    assert addresses == ["10.0.0.5", "172.17.0.2", "fd00::5", "10.0.0.9"]


def test_hosts_without_facts_or_outside_the_inventory_add_nothing() -> None:
    assert fleet_hosts.host_addresses(HOSTVARS, ["new-1", "absent"]) == []
    assert fleet_hosts.host_addresses(HOSTVARS, []) == []
    assert fleet_hosts.host_addresses(HOSTVARS, None) == []


SERVERS = {
    "published": {
        "vllm_service_listen_address": " 10.0.0.11\n",
        "ansible_facts": {"default_ipv4": {"address": "10.0.0.99"}},
    },
    "wildcard": {
        "vllm_service_listen_address": "0.0.0.0",
        "ansible_facts": {"default_ipv4": {"address": "10.0.0.12"}},
    },
    "set-host": {
        "vllm_service_host": "fd00::13",
        "ansible_facts": {"default_ipv4": {"address": "10.0.0.99"}},
    },
    "set-wildcard": {
        "vllm_service_host": "::",
        "ansible_facts": {"default_ipv4": {"address": "10.0.0.14"}},
    },
    "no-facts": {"ansible_host": "srv-15.example"},
    "bare": {},
}


def test_the_published_listen_address_first_then_the_set_host() -> None:
    assert fleet_hosts.server_address(SERVERS, "published") == "10.0.0.11"
    assert fleet_hosts.server_address(SERVERS, "set-host") == "fd00::13"


def test_a_wildcard_is_never_an_address_to_reach() -> None:
    # vllm_service_host: 0.0.0.0 makes vLLM listen everywhere; the others reach it on its address
    assert fleet_hosts.server_address(SERVERS, "wildcard") == "10.0.0.12"
    assert fleet_hosts.server_address(SERVERS, "set-wildcard") == "10.0.0.14"


def test_without_facts_the_inventorys_address_then_its_name() -> None:
    assert fleet_hosts.server_address(SERVERS, "no-facts") == "srv-15.example"
    assert fleet_hosts.server_address(SERVERS, "bare") == "bare"


def test_an_ipv6_address_goes_in_brackets_once_in_a_url() -> None:
    assert fleet_hosts.url_host("fd00::13") == "[fd00::13]"
    assert fleet_hosts.url_host("[fd00::13]") == "[fd00::13]"
    assert fleet_hosts.url_host(" 10.0.0.11\n") == "10.0.0.11"
    assert fleet_hosts.url_host("srv-15.example") == "srv-15.example"
