"""requirements.lock is what runs: the venv the tests run in holds exactly the
lock, the lock satisfies pyproject.toml, and every pin carries hashes.
(The Modal image reads the same file: tests/test_deploy.py.)"""

from __future__ import annotations

import re
import sysconfig
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOCK = (ROOT / "requirements.lock").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", re.M)
SEED = {"pip", "setuptools", "wheel"}  # what a new venv starts with: checked only where the lock pins them


def pins() -> dict[str, str]:
    found = {canonicalize_name(name): version for name, version in PIN.findall(LOCK)}
    assert len(found) == len(PIN.findall(LOCK)), "a package is pinned twice"
    return found


def test_the_venv_holds_exactly_the_lock() -> None:
    locked = pins()
    # the venv's own site-packages: not what other tests may have put on sys.path (setuptools' vendored copies)
    paths = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions(path=paths)}
    installed.pop("voicechat")  # this project, installed editable
    for name in SEED - locked.keys():
        installed.pop(name, None)
    differ = {n: (installed.get(n), locked.get(n)) for n in installed.keys() | locked.keys()
              if installed.get(n) != locked.get(n)}  # fmt: skip
    assert not differ, f"(installed, locked) differ; run `make venv`: {differ}"


def test_the_lock_satisfies_pyproject() -> None:
    project = PYPROJECT["project"]
    wanted = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    locked = pins()
    for line in wanted:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name in locked, f"{req.name} is not in requirements.lock: run `make lock`"
        assert req.specifier.contains(locked[name], prereleases=True), (
            f"requirements.lock pins {req.name}=={locked[name]}, pyproject.toml wants {req}: run `make lock`"
        )
    no_deps = [Requirement(r) for r in (ROOT / "requirements/no-deps.in").read_text().splitlines()
               if r.strip() and not r.startswith("#")]  # fmt: skip
    for req in no_deps:
        assert req.specifier.contains(locked[canonicalize_name(req.name)])


def test_every_pin_has_hashes() -> None:
    entries = re.split(r"\n(?=[A-Za-z0-9])", LOCK)
    for entry in entries:
        if PIN.match(entry):
            assert "--hash=sha256:" in entry, entry.splitlines()[0]


def test_the_makefile_bootstraps_the_locked_uv() -> None:
    makefile = (ROOT / "Makefile").read_text()
    (version,) = re.findall(r"^UV_VERSION := (\S+)$", makefile, re.M)
    assert pins()["uv"] == version
