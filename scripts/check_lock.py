"""Fail when requirements/lock.txt is out of date with pyproject.toml.

Offline and quick, so CI runs it before installing: every requirement that
pyproject.toml declares (runtime and every extra) must be pinned in the lock at a
version its specifier allows, and every package the lock says it pins for soundsight
itself ("via soundsight") must still be declared. A real resolution (`make lock`)
needs the registry; this check needs only the two files.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # a bare interpreter before `make install`: pip vendors packaging
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
LOCK = ROOT / "requirements" / "lock.txt"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)")


def declared() -> list[Requirement]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    lines = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        lines += extra
    return [Requirement(line) for line in lines]


def locked() -> tuple[dict[str, str], set[str]]:
    """Pinned versions by canonical name, and the names pinned "via soundsight"."""
    pins: dict[str, str] = {}
    direct: set[str] = set()
    current = None
    for line in LOCK.read_text().splitlines():
        match = PIN.match(line)
        if match:
            current = canonicalize_name(match.group(1))
            pins[current] = match.group(2)
        elif current and line.strip().startswith("#") and "soundsight" in line:
            direct.add(current)  # uv's "# via soundsight (pyproject.toml)" annotation
    return pins, direct


def main() -> int:
    pins, direct = locked()
    problems = []
    names = set()
    for requirement in declared():
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        name = canonicalize_name(requirement.name)
        names.add(name)
        if name not in pins:
            problems.append(f"{requirement.name} is declared in pyproject.toml but not locked")
        elif not requirement.specifier.contains(pins[name], prereleases=True):
            problems.append(
                f"{requirement.name}=={pins[name]} in the lock does not satisfy "
                f"'{requirement}' in pyproject.toml"
            )
    for name in sorted(direct - names):
        problems.append(f"{name} is locked for soundsight but no longer declared in pyproject.toml")
    if problems:
        print(f"{LOCK.relative_to(ROOT)} is out of date with pyproject.toml:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        print("Run `make lock` and commit both files together.", file=sys.stderr)
        return 1
    print(f"lock: {len(pins)} pinned packages, all {len(names)} declared requirements agree")
    return 0


if __name__ == "__main__":
    sys.exit(main())
