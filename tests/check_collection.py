"""Check an installed vllm_cpu.fleet collection: every role, playbook and plugin of the checkout is
in it, and nothing of the test or benchmark tooling is. Exits non-zero and names each problem."""

from __future__ import annotations

import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent


def problems_of(installed: Path) -> list[str]:
    """Return what the installed collection lacks or holds that it should not."""
    found = []
    for kind, pattern in (
        ("roles", "*/tasks/main.yml"),
        ("playbooks", "*.yml"),
        ("playbooks", "vars/*.yml"),
        ("plugins", "*/*.py"),
    ):
        for path in sorted((CHECKOUT / kind).glob(pattern)):
            relative = path.relative_to(CHECKOUT)
            if not (installed / relative).is_file():
                found.append(f"missing from the collection: {relative}")
    for name in ("MANIFEST.json", "FILES.json", "meta/runtime.yml", "README.md"):
        if not (installed / name).is_file():
            found.append(f"missing from the collection: {name}")
    for name in ("molecule", "tests", "benchmarks", ".cache", ".venv", "inventory"):
        if (installed / name).exists():
            found.append(f"the collection holds {name}/ (add it to build_ignore in galaxy.yml)")
    return found


def main() -> int:
    problems = problems_of(Path(sys.argv[1]))
    for problem in problems:
        print(problem, file=sys.stderr)
    print(f"collection: {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
