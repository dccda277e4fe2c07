"""Describe the vLLM wheel a build wrote into a folder, for the vllm_build role's checks.

Standard library only (runs on the builder's Python). Prints one JSON object: file, name, version,
tags, kernel libraries and console scripts; fails unless the folder holds exactly one vllm-*.whl.

    python3 vllm_wheel_facts.py FOLDER
"""

from __future__ import annotations

import configparser
import json
import re
import sys
import zipfile
from pathlib import Path
from typing import Any

WHEEL_KERNEL = re.compile(r"^vllm/(_C(?:_AVX2|_AVX512)?)\.[^/]*so$")


def wheel_facts(path: Path) -> dict[str, Any]:
    """Describe a built wheel: name, version, tags, kernel libraries and console scripts."""
    with zipfile.ZipFile(path) as wheel:
        names = wheel.namelist()
        dist_info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
        metadata = wheel.read(f"{dist_info}/METADATA").decode()
        tags = wheel.read(f"{dist_info}/WHEEL").decode()
        entry_points = f"{dist_info}/entry_points.txt"
        scripts = configparser.ConfigParser(delimiters=("=",))
        scripts.read_string(wheel.read(entry_points).decode() if entry_points in names else "")
    return {
        "file": path.name,
        "name": re.search(r"^Name:\s*(\S+)", metadata, re.M).group(1),
        "version": re.search(r"^Version:\s*(\S+)", metadata, re.M).group(1),
        "tags": re.findall(r"^Tag:\s*(\S+)", tags, re.M),
        "kernels": sorted({m.group(1) for n in names if (m := WHEEL_KERNEL.match(n))}),
        "console_scripts": sorted(scripts["console_scripts"])
        if scripts.has_section("console_scripts")
        else [],
    }


def main(argv: list[str]) -> int:
    """Print the facts of the one vllm wheel in the folder argv[1] as JSON."""
    wheels = sorted(Path(argv[1]).glob("vllm-*.whl")) if len(argv) == 2 else []
    if len(wheels) != 1:
        print(f"expected a folder with exactly one vllm-*.whl, found {wheels}", file=sys.stderr)
        return 1
    json.dump(wheel_facts(wheels[0]), sys.stdout, indent=1, sort_keys=True)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
