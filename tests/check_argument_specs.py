"""Check that every role documents exactly the variables it defines.

For each role under roles/, the option names of meta/argument_specs.yml (entry point ``main``) must
equal the keys of defaults/main.yml, every option must have a description, and every public variable
must carry the role's name as prefix. Exits non-zero and names each mismatch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

ROLES = Path(__file__).resolve().parent.parent / "roles"


def problems_of(role: Path) -> list[str]:
    """Return the mismatches between a role's defaults and its argument spec."""
    defaults = yaml.safe_load((role / "defaults" / "main.yml").read_text()) or {}
    specs = yaml.safe_load((role / "meta" / "argument_specs.yml").read_text())
    options = specs["argument_specs"]["main"].get("options") or {}
    found = []
    for name in sorted(set(defaults) - set(options)):
        found.append(f"{role.name}: {name} is in defaults/main.yml but not in argument_specs")
    for name in sorted(set(options) - set(defaults)):
        found.append(f"{role.name}: {name} is in argument_specs but not in defaults/main.yml")
    for name, option in options.items():
        if not option.get("description"):
            found.append(f"{role.name}: {name} has no description")
        if not name.startswith(role.name + "_"):
            found.append(f"{role.name}: {name} lacks the prefix {role.name}_")
    return found


def main() -> int:
    """Check every role and report."""
    roles = sorted(p for p in ROLES.iterdir() if (p / "meta" / "argument_specs.yml").exists())
    found = [problem for role in roles for problem in problems_of(role)]
    for problem in found:
        print(problem, file=sys.stderr)
    print(f"argument specs: {len(roles)} roles checked, {len(found)} problems")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
