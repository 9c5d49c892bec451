"""benchmarks/campaign/device_call.sh end to end in its CPU mode, in an environment built like the GPU machine's
(benchmarks/GPU.md): a copy of the working tree without its git history, a Python in which this project is not
installed (a fresh venv that sees this interpreter's packages through a plain path, so no editable-install hook),
the project's wheel built from the checkout into .whl/ and installed by the script with `pip install --target`,
and the script's own PYTHONPATH and `-P`. A difference between the checkout's layout and the installed package's
then fails here, not on a lent GPU. Call 1 runs on one "machine" (a CAMPAIGN_TMP folder) without the carried
data/ (a failed CIFAR-10 rebuild must not cost the kernels), call 2 on a fresh one, continuing from call 1's
returned files as a session does."""
import importlib.metadata
import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMMIT = "layout-rehearsal"
BUDGET_S = 10**5   # what runs is decided by the stage lists, never by this machine's speed


def travelling_tree(dest: Path) -> Path:
    """The files a device call receives: tracked and untracked-not-ignored, no .git (a plain copy without the
    ignored folders where git is missing)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True)
    if listed.returncode != 0:
        shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(
            ".git", ".whl", "data", "runs", "build", "__pycache__", "*.egg-info", "*.zarr", ".pytest_cache"))
        return dest
    for name in filter(None, listed.stdout.split("\0")):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


def python_without_the_project(venv: Path) -> Path:
    """bin/ of a fresh venv seeing this interpreter's site-packages as plain path entries: their .pth files (the
    editable install's import hook among them) are not run, so `cntk_gram` is whatever sys.path finds first."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python3"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    seen = [*site.getsitepackages(), site.getusersitepackages()]
    (Path(purelib) / "image.pth").write_text("".join(f"{p}\n" for p in seen if Path(p).is_dir()))
    return venv / "bin"


def device_call(tree: Path, bin_dir: Path, machine: Path, out: Path, call: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", OUT=str(out), CAMPAIGN_TMP=str(machine),
               CAMPAIGN_REHEARSE="1", GIT_CEILING_DIRECTORIES=str(tree.parent))   # no git history, as there
    out.mkdir(parents=True)
    return subprocess.run(["bash", "benchmarks/campaign/device_call.sh", call, str(BUDGET_S)], cwd=tree, env=env,
                          capture_output=True, text=True)


def stages_of(out: Path) -> dict:
    return {s["name"]: s for s in json.loads((out / "campaign.json").read_text())["stages"]}


@pytest.mark.slow
def test_device_call_runs_from_the_installed_wheel_on_fresh_machines(tmp_path, cifar_format_root):
    tree = travelling_tree(tmp_path / "tree")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tree / ".whl"), str(tree)], check=True, capture_output=True)
    (tree / ".whl" / "COMMIT").write_text(COMMIT + "\n")
    bin_dir = python_without_the_project(tmp_path / "venv")

    # call 1, without data/: the rebuild fails, is said, and env, kernels and tests still run
    machine1, out1 = tmp_path / "machine1", tmp_path / "out1"
    call1 = device_call(tree, bin_dir, machine1, out1, "1")
    log1 = call1.stdout + call1.stderr + ((out1 / "campaign.log").read_text() if (out1 / "campaign.log").exists()
                                          else "")
    assert call1.returncode == 0, log1
    assert "device_call: rebuilding CIFAR-10 failed" in call1.stdout
    got = stages_of(out1)
    assert {name: s["status"] for name, s in got.items()} == {"env": "done", "kernels": "done", "tests": "done"}, log1
    env = got["env"]["result"]
    assert Path(env["cntk_gram_from"]) == machine1 / "site" / "cntk_gram"   # the wheel, not the checkout
    assert env["packages"]["cntk-gram"] == importlib.metadata.version("cntk-gram") and "cuda-core" in env["packages"]
    doc = json.loads((out1 / "campaign.json").read_text())
    assert doc["git_commit"] == COMMIT and doc["rehearse"] is True   # the commit from .whl/COMMIT
    assert doc["calls"][0]["budget_s"] <= BUDGET_S   # what the install and the rebuild left

    # the session copies call 1's files into the tree; call 2 runs on a fresh machine that has data/ to rebuild from
    returned = tree / "benchmarks" / "results" / "gpu-campaign"
    shutil.rmtree(returned, ignore_errors=True)
    shutil.copytree(out1, returned)
    (tree / "data").mkdir()
    (tree / "data" / "build_cifar10.py").write_text(
        "import shutil, sys\n"
        f"shutil.copytree({str(cifar_format_root / 'cifar-10-batches-py')!r}, sys.argv[1] + '/cifar-10-batches-py')\n")
    machine2, out2 = tmp_path / "machine2", tmp_path / "out2"
    call2 = device_call(tree, bin_dir, machine2, out2, "table1-v")
    log2 = call2.stdout + call2.stderr + (out2 / "campaign.log").read_text()
    assert call2.returncode == 0, log2
    assert "rebuilding CIFAR-10 failed" not in call2.stdout and (machine2 / "site" / "cntk_gram").is_dir()
    doc = json.loads((out2 / "campaign.json").read_text())
    assert [k["call"] for k in doc["calls"]] == [1, 2], log2   # continued from call 1's returned files
    assert {name: (s["call"], s["status"]) for name, s in stages_of(out2).items()} == {
        "env": (1, "done"), "kernels": (1, "done"), "tests": (1, "done"), "table1-v": (2, "done")}, log2
    run = stages_of(out2)["table1-v"]["result"]["runs"]["table1-v"]
    assert run["depths"] == [3, 4] and run["validated"] == "done"
    assert "| ntk-vanilla | 4 |" in (out2 / run["results"]).read_text()
