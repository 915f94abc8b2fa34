"""Packaging: one installed top-level namespace (conventions.md, rule 0) and the README's commands."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def readme_block(name: str) -> str:
    text = (REPO / "README.md").read_text()
    block = text.split(f"<!-- {name} -->")[1].split(f"<!-- /{name} -->")[0]
    lines = [line for line in block.strip().splitlines() if not line.startswith("```")]
    assert len(lines) == 1, f"the README's {name} must be exactly one command"
    return lines[0]


def test_ci_runs_the_readme_test_command():
    command = readme_block("test-command")
    assert "pytest" in command and "ruff check" in command and "ruff format --check" in command
    assert "test-command" in (REPO / ".ci" / "run").read_text()  # .ci/run extracts and runs that very block


def test_main_command_installs_and_runs_the_pipeline():
    command = readme_block("main-command")
    assert command.startswith("python3 -m venv") and command.endswith("ddt pipeline --config configs/pipeline.yaml")
    assert "torch==2.13.0" in command and "pip uninstall -y torchvision" in command


@pytest.mark.slow
def test_a_wheel_installs_exactly_one_top_level_package(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(REPO)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("ddt_lightning-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"ddt_lightning"}
    for module in ("datamodules/world.py", "callbacks/dead_code.py", "models/quantizer.py", "mllm/model.py", "cli.py"):
        assert f"ddt_lightning/{module}" in names, module
