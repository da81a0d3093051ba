"""Packaging: what `pip install .` gives, and the pins of pyproject.toml.

- The wheel (`pip wheel . --no-deps`, built from a copy of the sources) holds
  every module, bpf/*.c and *.h as streamer/bpf, schemas/*.json as
  streamer/schemas; installed into a fresh venv (--system-site-packages, for
  Debian's bcc), the loader and the wire module find them with no
  CTSTREAM_BPF_DIR or CTSTREAM_SCHEMA_DIR.
- That venv holds the LOWEST version every pin allows (each `>=X` installed
  as `==X`, from PyPI), and the tests that exercise the pinned libraries run
  in it: the unit tests (tests/unit/test_dependency_apis.py among them), the
  producer against a real broker, the ledger and `top` against real SQLite
  and PostgreSQL, MQTT status and alerts against a real Mosquitto, the BPF
  cases (scapy frames), and a real daemon in a namespace (pyroute2's tc, BCC
  compiling the wheel's own BPF sources). A bound set too low fails here
  (about two minutes; pip's cache makes later runs quicker).
- Every third-party module that streamer/ or tests/ import is declared: in
  the dependencies, in the extra it belongs to (psycopg: [postgres], only in
  streamer/accounting; jsonschema: [validate], only in wire.py), or as a
  Debian package that scripts/setup.sh installs. The daemon's modules import
  neither extra.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
BUILD_TIMEOUT = 600
INSTALL_TIMEOUT = 900
TESTS_TIMEOUT = 1800

# Import name -> distribution, for what streamer/ and tests/ import.
DISTRIBUTIONS = {
    "aiokafka": "aiokafka", "aiomqtt": "aiomqtt", "msgpack": "msgpack", "pyroute2": "pyroute2",
    "cramjam": "cramjam", "prometheus_client": "prometheus-client", "psycopg": "psycopg",
    "jsonschema": "jsonschema", "pytest": "pytest", "scapy": "scapy", "paho": "paho-mqtt",
}
# Import name -> the Debian package scripts/setup.sh installs (not on PyPI).
DEBIAN = {"bcc": "python3-bpfcc", "fusepy": "python3-fusepy"}
# test_deploy.py reads docker-compose v1's YAML output with PyYAML, which
# comes with Debian's docker-compose (setup.sh's fallback), only when v1 runs.
OPTIONAL_IMPORTS = {"yaml"}
# Only these parts of the package may import an extra's library.
EXTRA_ONLY = {"psycopg": ("postgres", "streamer/accounting/"),
              "jsonschema": ("validate", "streamer/delivery/wire.py")}

# The tests run under the lowest pins (paths relative to the repository).
LOWEST_PIN_TESTS = [
    "tests/unit", "--ignore=tests/unit/test_packaging.py", "--ignore=tests/unit/test_deploy.py",
    "tests/kafka/test_producer.py",
    "tests/accounting/test_ledger.py", "tests/accounting/test_top_and_password.py",
    "tests/mqtt/test_options.py", "tests/mqtt/test_status_alerts.py",
    "tests/bpf/test_datapath.py", "tests/netns/test_sd_notify.py",
]


# ---- the pins ------------------------------------------------------------------------------

_REQUIREMENT = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]+\])?\s*(.*)")


def requirements() -> list[tuple[str, str, str, str]]:
    """(group, name, extras, specifiers) of every requirement, the extras'
    too, but not the project's references to its own extras."""
    out = []
    groups = {"dependencies": PROJECT["dependencies"], **PROJECT["optional-dependencies"]}
    for group, reqs in groups.items():
        for req in reqs:
            name, extras, spec = _REQUIREMENT.fullmatch(req.strip()).groups()
            if name != PROJECT["name"]:
                out.append((group, name.lower(), extras or "", spec.replace(" ", "")))
    return out


def lower_bound(spec: str) -> str:
    (low,) = [s[2:] for s in spec.split(",") if s.startswith(">=")]
    return low


def lowest_pins() -> list[str]:
    return [f"{name}{extras}=={lower_bound(spec)}" for _, name, extras, spec in requirements()]


def test_every_pin_has_a_full_lower_bound_and_an_upper_bound():
    reqs = requirements()
    assert {name for _, name, _, _ in reqs} >= set(DISTRIBUTIONS.values())
    for group, name, _, spec in reqs:
        parts = spec.split(",")
        assert len(parts) == 2 and sum(p.startswith(">=") for p in parts) == 1 \
            and sum(p.startswith("<") and not p.startswith("<=") for p in parts) == 1, (name, spec)
        # X.Y.Z: installing ==X.Y.Z is then installing the lowest allowed.
        assert re.fullmatch(r"\d+\.\d+\.\d+", lower_bound(spec)), (name, spec)
    daemon = {name for group, name, _, _ in reqs if group == "dependencies"}
    assert not daemon & {"psycopg", "jsonschema"}, "the daemon node installs no extra's library"
    assert "ctstream[postgres,validate]" in PROJECT["optional-dependencies"]["test"]


def test_the_packages_are_every_package_and_the_two_data_directories():
    setup = PYPROJECT["tool"]["setuptools"]
    found = {".".join(p.relative_to(REPO).parts) for p in (REPO / "streamer").rglob("*")
             if p.is_dir() and (p / "__init__.py").exists()} | {"streamer"}
    assert set(setup["packages"]) == found | {"streamer.bpf", "streamer.schemas"}
    assert setup["package-dir"] == {"streamer.bpf": "bpf", "streamer.schemas": "schemas"}
    assert (REPO / "bpf" / "ctstream.bpf.c").is_file() and list((REPO / "schemas").glob("*.json"))


def imports_of(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
    return out


def third_party(names: set[str], path: Path) -> set[str]:
    local = {"streamer", "tests", "bench", "__future__"}
    return {n for n in names if n not in sys.stdlib_module_names and n not in local
            and not (path.parent / f"{n}.py").exists()}


def test_every_third_party_import_is_declared():
    declared = {name for _, name, _, _ in requirements()}
    setup_sh = (REPO / "scripts" / "setup.sh").read_text()
    problems = []
    for path in sorted([*(REPO / "streamer").rglob("*.py"), *(REPO / "tests").rglob("*.py")]):
        rel = str(path.relative_to(REPO))
        for mod in sorted(third_party(imports_of(path), path)):
            if mod in DEBIAN:
                if DEBIAN[mod] not in setup_sh:
                    problems.append(f"{rel}: {mod} (Debian {DEBIAN[mod]}) is not in setup.sh")
            elif mod in OPTIONAL_IMPORTS:
                continue
            elif DISTRIBUTIONS.get(mod) not in declared:
                problems.append(f"{rel}: imports {mod}, which pyproject.toml does not declare")
            elif mod in EXTRA_ONLY and rel.startswith("streamer/") \
                    and not rel.startswith(EXTRA_ONLY[mod][1]):
                problems.append(f"{rel}: imports {mod} of [{EXTRA_ONLY[mod][0]}]")
    assert not problems, "\n".join(problems)


def test_the_daemons_modules_import_no_extra():
    # Every module but the accounting consumer's, with psycopg and
    # jsonschema made unimportable: the daemon node has neither.
    script = """
import pkgutil, sys, importlib
sys.modules["psycopg"] = sys.modules["jsonschema"] = None
import streamer
names = [m.name for m in pkgutil.walk_packages(streamer.__path__, "streamer.")
         if not m.name.startswith("streamer.accounting")]
for name in names:
    importlib.import_module(name)
from streamer.cli import load_config
load_config(["run", "-i", "lo", "--kafka", "127.0.0.1:9092", "--topic", "t"])
print(len(names))
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) >= 30


def test_validate_names_the_extra_to_install_without_jsonschema(monkeypatch):
    from streamer.delivery import wire
    from streamer.errors import WireError

    monkeypatch.setitem(sys.modules, "jsonschema", None)
    with pytest.raises(WireError, match=re.escape("pip install 'ctstream[validate]'")):
        wire.validate({"schemaVersion": wire.SCHEMA_VERSION})


# ---- the wheel and a venv of the lowest pins ---------------------------------------------------

def run(argv: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                       timeout=timeout, **kw)
    assert r.returncode == 0, f"{' '.join(map(str, argv))}: exit {r.returncode}\n" \
                              f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def no_overrides() -> dict:
    return {k: v for k, v in os.environ.items()
            if k not in ("CTSTREAM_BPF_DIR", "CTSTREAM_SCHEMA_DIR", "PYTHONPATH", "PYTHONHOME")}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of what the sdist would hold (a build in
    the checkout would write build/ there, under other runs' feet)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("streamer", "bpf", "schemas"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)],
        BUILD_TIMEOUT, env=no_overrides())
    (whl,) = out.glob("ctstream-*.whl")
    return whl


@pytest.fixture(scope="module")
def lowest_venv(tmp_path_factory, wheel) -> Path:
    """A venv with the lowest pins and the wheel; Debian's bcc through the
    system site-packages (which pip does not satisfy pins from: each pinned
    version goes into the venv)."""
    venv = tmp_path_factory.mktemp("lowest") / "venv"
    run(["/usr/bin/python3", "-m", "venv", "--system-site-packages", str(venv)], 120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    run([*pip, "install", *lowest_pins()], INSTALL_TIMEOUT, env=no_overrides())
    run([*pip, "install", "--no-deps", str(wheel)], INSTALL_TIMEOUT, env=no_overrides())
    return venv


def test_the_wheel_holds_every_module_the_bpf_sources_and_the_schemas(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    want = {f"streamer/bpf/{p.name}" for p in (REPO / "bpf").iterdir() if p.suffix in (".c", ".h")}
    want |= {f"streamer/schemas/{p.name}" for p in (REPO / "schemas").glob("*.json")}
    want |= {str(p.relative_to(REPO)) for p in (REPO / "streamer").rglob("*.py")}
    assert len([n for n in want if n.startswith("streamer/bpf/")]) >= 10
    assert want <= names, sorted(want - names)
    assert "ctstream = streamer.cli:main" in entry
    # Requirements without an extra marker are what a daemon node installs.
    plain = [ln for ln in meta.splitlines() if ln.startswith("Requires-Dist:") and "extra ==" not in ln]
    assert plain and not [ln for ln in plain if "psycopg" in ln or "jsonschema" in ln], plain


def test_the_installed_wheel_finds_its_bpf_sources_and_schemas_without_variables(lowest_venv,
                                                                                tmp_path):
    script = """
import json, sys
from streamer.datapath import loader
from streamer.delivery import wire
from streamer.errors import WireError
source = loader.expand_source()
try:
    wire.validate({"schemaVersion": wire.SCHEMA_VERSION, "eventType": "DESTROY"})
    said = "valid"
except WireError as exc:
    said = str(exc)
print(json.dumps({"package": loader.__file__, "bpf": str(loader.BPF_DIR),
                  "schemas": str(wire.schema_dir()), "source": source, "validate": said}))
"""
    python = str(lowest_venv / "bin" / "python")
    r = run([python, "-c", script], 120, cwd=tmp_path, env=no_overrides())   # not the checkout
    got = json.loads(r.stdout)
    package = Path(got["package"]).parents[1]
    assert package.is_relative_to(lowest_venv) and package.name == "streamer", got["package"]
    assert got["bpf"] == str(package / "bpf") and got["schemas"] == str(package / "schemas")
    for header in ("ct_abi.h", "ct_maps.h", "ct_parse.h", "ct_logic.h", "ct_table.h"):
        assert f'#line 1 "{package / "bpf" / header}"' in got["source"], header
    # The schema was found and read: the record is judged, not the file missing.
    assert got["validate"].startswith("record does not match ctstream-event.v"), got["validate"]
    version = run([str(lowest_venv / "bin" / "ctstream"), "--version"], 60, cwd=tmp_path)
    assert version.stdout.split() == ["ctstream", PROJECT["version"]]


def test_the_lowest_pins_pass_the_tests_of_what_they_pin(lowest_venv):
    python = str(lowest_venv / "bin" / "python")
    script = ("import json, importlib.metadata as m; "
              f"print(json.dumps({{d: m.version(d) for d in {sorted({n for _, n, _, _ in requirements()})!r}}}))")
    installed = json.loads(run([python, "-c", script], 60).stdout)
    assert installed == {name: lower_bound(spec) for _, name, _, spec in requirements()}
    # Unknown ini options (asyncio_default_fixture_loop_scope below
    # pytest-asyncio 0.24) are errors here, not warnings.
    r = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "-W", "error::pytest.PytestConfigWarning", *LOWEST_PIN_TESTS],
                       capture_output=True, text=True, stdin=subprocess.DEVNULL, cwd=REPO,
                       timeout=TESTS_TIMEOUT, env=no_overrides())
    tail = r.stdout[-6000:] + r.stderr[-3000:]
    assert r.returncode == 0, tail
    summary = r.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) > 500 and "failed" not in summary, summary
    assert not (IN_CI and "skipped" in summary), summary
