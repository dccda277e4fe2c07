"""Read what a vLLM source tree (or a built wheel) declares, for the vllm_build role.

The role asks an sdist for its version before building, and checks the wheel it built. Standard
library only (runs on the build host's Python); prints one JSON object.

    python3 vllm_source_facts.py source ROOT
    python3 vllm_source_facts.py wheel WHEEL
"""

from __future__ import annotations

import argparse
import configparser
import json
import re
import sys
import zipfile
from pathlib import Path
from typing import Any

WHEEL_KERNEL = re.compile(r"^vllm/(_C(?:_AVX2|_AVX512)?)\.[^/]*so$")


def source_facts(root: Path) -> dict[str, Any]:
    """Describe a source tree: its version (an sdist's PKG-INFO; None for a git checkout)."""
    path = root / "PKG-INFO"
    found = re.search(r"^Version:\s*(\S+)", path.read_text(), re.M) if path.is_file() else None
    return {"version": found.group(1) if found else None}


def console_scripts(entry_points: str) -> list[str]:
    """Return the names in the [console_scripts] section of entry_points.txt."""
    parser = configparser.ConfigParser(delimiters=("=",))
    parser.read_string(entry_points)
    return sorted(parser["console_scripts"]) if parser.has_section("console_scripts") else []


def wheel_facts(path: Path) -> dict[str, Any]:
    """Describe a built wheel: name, version, tags, kernel libraries and console scripts."""
    with zipfile.ZipFile(path) as wheel:
        names = wheel.namelist()
        dist_info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
        metadata = wheel.read(f"{dist_info}/METADATA").decode()
        tags = wheel.read(f"{dist_info}/WHEEL").decode()
        entry_points = f"{dist_info}/entry_points.txt"
        scripts = wheel.read(entry_points).decode() if entry_points in names else ""

    def header(name: str) -> list[str]:
        return re.findall(rf"^{name}:\s*(.+?)\s*$", metadata, re.M)

    return {
        "file": path.name,
        "name": header("Name")[0],
        "version": header("Version")[0],
        "tags": re.findall(r"^Tag:\s*(\S+)", tags, re.M),
        "kernels": sorted({m.group(1) for n in names if (m := WHEEL_KERNEL.match(n))}),
        "console_scripts": console_scripts(scripts),
    }


def main() -> int:
    """Parse the command line and print the facts as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    source = sub.add_parser("source", help="describe a source tree")
    source.add_argument("root", type=Path)
    wheel = sub.add_parser("wheel", help="describe a built wheel")
    wheel.add_argument("wheel", type=Path)
    args = parser.parse_args()
    facts = source_facts(args.root) if args.command == "source" else wheel_facts(args.wheel)
    json.dump(facts, sys.stdout, indent=1, sort_keys=True)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
