"""Print what ci/lower_bounds.sh installs: the oldest releases pyproject.toml admits.

    python ci/lowest_pins.py pyproject.toml [EXTRA ...]

The first line is the oldest Python that requires-python admits (X.Y, from its `>=X.Y`); then one
requirement a line for the build system's requirements, the dependencies and the named extras,
each `name>=V` pinned to `name==V` (its marker kept) and a requirement with no version as it is.
A bound must be a release with a wheel for that Python: `numpy>=1.26` installs 1.26.0, so a bound
that names a release without one (or a yanked one) is the bound to raise. Any other form of
version (<, ~=, !=, two clauses) is refused, as is one package named with two bounds: their
lowest release is not this script's to guess.
"""
import re
import sys
import tomllib

REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(?:>=\s*([0-9][0-9.]*))?\s*(;.*)?$")


def pin(requirement):
    """'numpy>=1.26' -> ('numpy', '1.26', 'numpy==1.26'); 'mpich; marker' -> ('mpich', None, 'mpich ; marker')."""
    match = REQUIREMENT.match(requirement)
    if not match:
        sys.exit(f"lowest_pins.py: cannot pin {requirement!r}: write its lower bound as name>=VERSION")
    name, extras, version, marker = match.groups()
    pinned = name + (extras or "") + (f"=={version}" if version else "") + (f" {marker}" if marker else "")
    return re.sub(r"[-_.]+", "-", name).lower(), version, pinned


def main(path, *extras):
    with open(path, "rb") as f:
        toml = tomllib.load(f)
    project = toml["project"]
    python = re.fullmatch(r"\s*>=\s*(\d+\.\d+)\s*(?:,\s*<\s*[\d.]+\s*)?", project.get("requires-python", ""))
    if not python:
        sys.exit(f"lowest_pins.py: cannot read the oldest Python from requires-python "
                 f"{project.get('requires-python')!r}: write it as >=X.Y")
    wanted = list(toml["build-system"]["requires"]) + list(project["dependencies"])
    for extra in extras:
        wanted += project["optional-dependencies"][extra]
    pins = {}  # name -> (version, the first requirement's pin); an extra may repeat another's package
    for requirement in wanted:
        name, version, pinned = pin(requirement)
        if pins.setdefault(name, (version, pinned))[0] != version:
            sys.exit(f"lowest_pins.py: {name} is required with bounds {pins[name][0] or 'none'} and "
                     f"{version or 'none'}; give it one")
    print(python.group(1))
    print("\n".join(pinned for _, pinned in pins.values()))


if __name__ == "__main__":
    main(*sys.argv[1:])
