"""The package installs under one namespace: cntk_gram.pipeline and cntk_gram.workers, never bare names."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROBE = """
import importlib.util, json
import cntk_gram, cntk_gram.pipeline.cli, cntk_gram.workers.cpu
found = {name: getattr(importlib.util.find_spec(name), "origin", None) for name in ("pipeline", "workers")}
print(json.dumps({"pipeline": cntk_gram.pipeline.cli.__file__, "workers": cntk_gram.workers.cpu.__file__,
                  "bare": found, "run": cntk_gram.run.__module__, "open_gram": cntk_gram.open_gram.__module__}))
"""


def _probe(cwd: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _inside_repo(path) -> bool:
    return path is not None and Path(path).resolve().is_relative_to(REPO)


def test_namespace_from_outside_the_repository(tmp_path):
    found = _probe(tmp_path)
    assert _inside_repo(found["pipeline"]) and _inside_repo(found["workers"])
    # the repository's folders are not importable under their bare names (other distributions use them)
    assert not any(_inside_repo(origin) for origin in found["bare"].values()), found["bare"]
    assert found["run"].startswith("cntk_gram.pipeline.") and found["open_gram"] == "cntk_gram.pipeline.store"


def test_namespace_from_the_repository_root():
    """From the checkout root the local cntk_gram/ folder is found first; its subpackages still resolve, through the
    install's mapping (pyproject.toml package-dir; the package never edits its own search path)."""
    found = _probe(REPO)
    assert Path(found["pipeline"]).resolve() == REPO / "pipeline" / "cli.py"
    assert Path(found["workers"]).resolve() == REPO / "workers" / "cpu.py"


def test_every_facade_name_resolves_to_a_callable_of_the_package():
    import cntk_gram

    for name in cntk_gram.__all__:
        value = getattr(cntk_gram, name)
        assert callable(value) and value.__module__.startswith("cntk_gram."), name
    assert not hasattr(cntk_gram, "no_such_name")


BARE = """
import json, sys
out = {}
for name in ("pipeline", "pipeline.errors", "workers", "workers.vocab"):
    try:
        __import__(name)
        out[name] = "imported"
    except ImportError as exc:
        out[name] = str(exc)
import cntk_gram
from cntk_gram.pipeline.errors import UserError
out["UserError"] = [UserError.__module__, UserError is cntk_gram.UserError]
out["bare modules"] = sorted(m for m in sys.modules if m.split(".")[0] in ("pipeline", "workers"))
out["cntk_gram path"] = list(cntk_gram.__path__)
print(json.dumps(out))
"""


def test_bare_folder_names_fail_cleanly_from_the_repository_root():
    """From the checkout root `import pipeline` finds the folder, and refuses: a second copy of every class
    (pipeline.errors.UserError beside cntk_gram.pipeline.errors.UserError) can never load."""
    result = subprocess.run([sys.executable, "-c", BARE], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    for name in ("pipeline", "pipeline.errors", "workers", "workers.vocab"):
        package = name.split(".")[0]
        assert f"import cntk_gram.{package}" in found[name] and "pip install -e ." in found[name], found[name]
        assert f"cannot be imported as '{package}'" in found[name], found[name]
    assert found["UserError"] == ["cntk_gram.pipeline.errors", True]
    assert found["bare modules"] == []
    assert [Path(p).resolve() for p in found["cntk_gram path"]] == [REPO / "cntk_gram"]


# the GPU campaign's script still puts benchmarks/ on sys.path for itself (left to its owner)
PATH_EDITS_LEFT = {"benchmarks/gpu_campaign.py"}


@pytest.mark.parametrize("folder", ["cntk_gram", "pipeline", "workers", "benchmarks"])
def test_no_module_edits_an_import_path(folder):
    """Every module has one importable name because nothing adds search paths: benchmarks run as
    `python -m benchmarks.NAME` from the repository root and import the installed package."""
    edits = re.compile(r"__path__\.|sys\.path\.(insert|append|extend)|sys\.path\s*[+]?=")
    found = [f"{path.relative_to(REPO)}:{number}" for path in sorted((REPO / folder).rglob("*.py"))
             if str(path.relative_to(REPO)) not in PATH_EDITS_LEFT
             for number, line in enumerate(path.read_text().splitlines(), 1) if edits.search(line)]
    assert found == []
