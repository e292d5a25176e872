"""Development sessions: ``nox`` runs tests, lint, typecheck and docs; ``nox -s bench`` too.

The Python matrix comes from ``[tool.meterkit.nox] python`` in pyproject.toml.

Inside an environment that already has ``pip install -e ".[dev]"`` (such as the one
``.ci/run`` makes), ``nox --no-venv -s lint typecheck docs`` runs the checks in place:
sessions then skip their own installs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nox

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib  # type: ignore[import-not-found, no-redef, unused-ignore]

ROOT = Path(__file__).parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PYTHONS: list[str] = PYPROJECT["tool"]["meterkit"]["nox"]["python"]
DEFAULT_PYTHON = PYTHONS[-1]
LINT_PATHS = ("src", "tests", "bench", "examples", "docs/check.py", "noxfile.py")

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_external_run = True
nox.options.sessions = ["tests", "lint", "typecheck", "docs"]


def _install(session: nox.Session, *args: str) -> None:
    """Install into the session's virtualenv; with ``--no-venv`` use what is there already."""
    if session.venv_backend == "none":
        session.log(f"no virtualenv: not installing {' '.join(args)}")
        return
    session.install(*args)


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The test suite. Extra arguments go to pytest: ``nox -s tests -- -k sqlite -x``."""
    _install(session, "-e", ".[dev]")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session(python=DEFAULT_PYTHON)
def lint(session: nox.Session) -> None:
    """ruff: lint rules and formatting, as configured in pyproject.toml."""
    _install(session, "ruff")
    paths = [p for p in LINT_PATHS if (ROOT / p).exists()]
    session.run("ruff", "check", *paths)
    session.run("ruff", "format", "--check", *paths)


@nox.session(python=DEFAULT_PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy --strict; the files and settings are in pyproject.toml."""
    _install(session, "-e", ".[dev]")
    session.run("mypy", *session.posargs)


@nox.session(python=DEFAULT_PYTHON)
def docs(session: nox.Session) -> None:
    """The docs site builds strictly (links, anchors, API references); every relative link
    resolves, every Python block and example runs, the catalog table is current."""
    _install(session, "-e", ".[dev]")  # the docs import meterkit.testing (pytest, hypothesis)
    session.run("python", "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", "site")
    session.run("python", "docs/check.py", *session.posargs)


@nox.session(python=DEFAULT_PYTHON)
def bench(session: nox.Session) -> None:
    """The benchmarks in bench/ (not part of the default sessions)."""
    _install(session, "-e", ".[dev]")
    session.run("python", "bench/run.py", *session.posargs)
