"""The package installs under one namespace: cntk_gram.pipeline and cntk_gram.workers, never bare names."""
import json
import subprocess
import sys
from pathlib import Path

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
    """From the checkout root the local cntk_gram/ folder is found first; its subpackages still resolve."""
    found = _probe(REPO)
    assert Path(found["pipeline"]).resolve() == REPO / "pipeline" / "cli.py"
    assert Path(found["workers"]).resolve() == REPO / "workers" / "cpu.py"


def test_every_facade_name_resolves_to_a_callable_of_the_package():
    import cntk_gram

    for name in cntk_gram.__all__:
        value = getattr(cntk_gram, name)
        assert callable(value) and value.__module__.startswith("cntk_gram."), name
    assert not hasattr(cntk_gram, "no_such_name")
