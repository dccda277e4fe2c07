"""Read what a vLLM source tree (or a built wheel) declares, for the vllm_build role.

The role asks the tree (laid out as vLLM 0.32's) for its version, build requirements, compiler
check and kernel libraries instead of copying them. Standard library only (runs on the build
host's Python); prints one JSON object.

    python3 vllm_source_facts.py source ROOT [--machine x86_64]
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

BUILD_REQUIREMENTS = "requirements/build/cpu.txt"
CPU_CMAKE = "cmake/cpu_extension.cmake"
KERNEL = r"_C(?:_AVX2|_AVX512)?"
DECLARED_KERNEL = re.compile(r'CMakeExtension\(name="vllm\.(' + KERNEL + r')"')
EXTRACTED_KERNEL = re.compile(r'"vllm/(' + KERNEL + r')\.abi3\.so"')
WHEEL_KERNEL = re.compile(r"^vllm/(" + KERNEL + r")\.[^/]*so$")
GCC_FATAL = re.compile(
    r'message\(\s*FATAL_ERROR\s+"([^"]*(?:gcc|g\+\+)[^"]*?>=\s*([0-9][0-9.]*)[^"]*)"'
)


def requirement_lines(path: Path, seen: set[Path]) -> list[str]:
    """Return the requirement lines of a file, following ``-r`` includes (pip options dropped)."""
    if path in seen or not path.is_file():
        return []
    seen.add(path)
    lines: list[str] = []
    for raw in path.read_text().splitlines():
        line = re.split(r"\s+#", raw, maxsplit=1)[0].strip()
        include = re.match(r"^(?:-r|--requirement)\s*=?\s*(\S+)$", line)
        if include:
            lines += requirement_lines(path.parent / include.group(1), seen)
        elif line and not line.startswith(("#", "-")):
            lines.append(line)
    return lines


def pkg_info_version(root: Path) -> str | None:
    """Return the version an sdist records in PKG-INFO, if the tree is an sdist."""
    path = root / "PKG-INFO"
    if not path.is_file():
        return None
    found = re.search(r"^Version:\s*(\S+)", path.read_text(), re.M)
    return found.group(1) if found else None


def gcc_requirement(cmake: str, machine: str) -> tuple[str | None, str | None]:
    """Return the minimum gcc version the CPU cmake requires for this machine, and its message."""
    found = GCC_FATAL.findall(cmake)
    if machine in ("x86_64", "AMD64"):
        found = [f for f in found if "x86" in f[0].lower()] or found
    if not found:
        return None, None
    message, version = found[0]
    return version.rstrip("."), message


def source_facts(root: Path, machine: str) -> dict[str, Any]:
    """Describe a source tree: version, build requirements, gcc check, kernel libraries."""
    build = requirement_lines(root / BUILD_REQUIREMENTS, set())
    setup_py = (root / "setup.py").read_text() if (root / "setup.py").is_file() else ""
    cmake_path = root / CPU_CMAKE
    cmake = cmake_path.read_text() if cmake_path.is_file() else ""
    gcc_min, gcc_message = gcc_requirement(cmake, machine)
    x86 = machine in ("x86_64", "AMD64")
    declared = (sorted(set(DECLARED_KERNEL.findall(setup_py))) if x86 else []) or ["_C"]
    extracted = sorted(set(EXTRACTED_KERNEL.findall(setup_py)))
    return {
        "version": pkg_info_version(root),
        "build_requirements_file": BUILD_REQUIREMENTS,
        "build_requirements": build,
        "gcc_min": gcc_min,
        "gcc_message": gcc_message,
        "kernels_declared": declared,
        "kernels_precompiled": extracted,
    }


def console_scripts(entry_points: str) -> list[str]:
    """Return the names in the [console_scripts] section of entry_points.txt."""
    parser = configparser.ConfigParser(delimiters=("=",))
    parser.read_string(entry_points)
    return sorted(parser["console_scripts"]) if parser.has_section("console_scripts") else []


def wheel_facts(path: Path) -> dict[str, Any]:
    """Describe a built wheel: name, version, tags, kernel libraries and requirements."""
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
        "requires": header("Requires-Dist"),
        "console_scripts": console_scripts(scripts),
    }


def main() -> int:
    """Parse the command line and print the facts as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    source = sub.add_parser("source", help="describe a source tree")
    source.add_argument("root", type=Path)
    source.add_argument("--machine", default="x86_64")
    wheel = sub.add_parser("wheel", help="describe a built wheel")
    wheel.add_argument("wheel", type=Path)
    args = parser.parse_args()
    if args.command == "source":
        facts = source_facts(args.root, args.machine)
    else:
        facts = wheel_facts(args.wheel)
    json.dump(facts, sys.stdout, indent=1, sort_keys=True)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
