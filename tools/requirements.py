"""Print the project's requirements from pyproject.toml, one per line: its dependencies and those of the extras
named on the command line (``python tools/requirements.py test``). Environment markers stay in the lines; pip
evaluates them.

`make setup` installs these while the extension compiles (``pip install --no-deps -e .`` in the background), so
pyproject.toml stays the one list of what the project needs.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: the copy pip itself reads pyproject.toml with
    from pip._vendor import tomli as tomllib


def requirements(extras: list[str]) -> list[str]:
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise SystemExit(f"requirements.py: no extra {', '.join(unknown)} in pyproject.toml")
    lines = list(project["dependencies"])
    for extra in extras:
        lines += [r for r in optional[extra] if r not in lines]
    return lines


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1:])))
