"""Print a pip constraints file pinning every dependency of pyproject.toml (and its extras named
on the command line) to the lowest version its bound admits: `name>=X` -> `name==X`. A
dependency without a lower bound is an error (its oldest release would be untestable)."""
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
requirements = project["dependencies"] + [r for extra in sys.argv[1:] for r in project["optional-dependencies"][extra]]
for text in requirements:
    req = Requirement(text)
    floors = [s.version for s in req.specifier if s.operator in (">=", "==")]
    if not floors:
        sys.exit(f"{req.name} has no lower bound in pyproject.toml")
    marker = f"; {req.marker}" if req.marker else ""
    print(f"{req.name}=={floors[0]}{marker}")
