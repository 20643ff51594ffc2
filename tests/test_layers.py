"""The architecture as import contracts (pyproject.toml, [tool.importlinter]): jobs and serving
never import each other and sit above cluster; no package has import cycles; within jobs, the
`lakeforge` command sits over the entry jobs and each stage imports only the stages below it.
Checked with import-linter on this checkout, and on a copy with a planted violation, which must
break the contract it violates."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    # cwd=root: import-linter reads root's pyproject.toml and imports root's packages.
    return subprocess.run([str(Path(sys.executable).with_name("lint-imports")), "--no-cache"], cwd=root,
                          capture_output=True, text=True, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def test_the_import_contracts_hold():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout
    for contract in ("Layers: benches over jobs and serving", "No import cycles", "Jobs: thin entry jobs"):
        assert verdict(result.stdout, contract) == "KEPT"


@pytest.mark.parametrize("module, planted, broken", [
    # A cycle hidden in a function: report -> run -> report.
    ("jobs/evaluation/report.py", "def _planted():\n    from jobs.evaluation.run import run_evaluation\n", "No import cycles"),
    # A cycle inside a stage package: split -> balance -> split.
    ("jobs/data/split.py", "def _planted():\n    from jobs.data.balance import balanced_sample\n", "No import cycles"),
    # A stage importing upwards: data reaching into evaluation.
    ("jobs/data/prepare.py", "def _planted():\n    from jobs.evaluation import baseline\n", "Jobs: thin entry jobs"),
    # Two stages side by side: training reaching into evaluation.
    ("jobs/train/run.py", "def _planted():\n    from jobs.evaluation.metrics import calibration\n", "Jobs: thin entry jobs"),
    # One entry job importing another (entry jobs are thin: shared logic lives in a stage).
    ("jobs/pipeline.py", "def _planted():\n    from jobs.finetune import main\n", "Jobs: thin entry jobs"),
    # An entry job reaching up into the command that dispatches to it.
    ("jobs/deploy.py", "def _planted():\n    from jobs.cli import JOBS\n", "Jobs: thin entry jobs"),
    # serving importing jobs.
    ("serving/gateway.py", "def _planted():\n    from jobs import data\n", "Layers: benches over jobs and serving"),
])
def test_a_planted_violation_breaks_its_contract(tmp_path, module, planted, broken):
    copy = tmp_path / "repo"
    copy.mkdir()
    for name in ("cluster", "jobs", "serving", "bench"):
        shutil.copytree(REPO / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", copy / "pyproject.toml")
    with (copy / module).open("a") as handle:
        handle.write("\n\n" + planted)
    result = lint_imports(copy)
    assert result.returncode != 0
    assert verdict(result.stdout, broken) == "BROKEN", result.stdout


def verdict(report: str, contract: str) -> str:
    """KEPT or BROKEN, as the report says of the contract whose name starts with `contract`."""
    words = " ".join(report.split()).split(contract, 1)[1].split()  # names wrap across lines
    return next(word for word in words if word in ("KEPT", "BROKEN"))
