"""Every address of a group of hosts (plugins/filter/fleet_hosts.py)."""

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
