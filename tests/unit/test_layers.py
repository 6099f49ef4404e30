"""The import contract of the layers (pyproject.toml, `make lint`): kept by the tree as it
is, and broken by an import that goes up, so the contract can fail."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(source: Path) -> subprocess.CompletedProcess[str]:
    """`lint-imports` with the project's contract on the package found under `source`."""
    env = {**os.environ, "PYTHONPATH": str(source)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--config", str(ROOT / "pyproject.toml")],
        cwd=source,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def test_the_tree_keeps_the_contract() -> None:
    done = lint_imports(ROOT / "src")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 kept, 0 broken" in done.stdout


@pytest.mark.parametrize(
    ("module", "upward"),
    [
        ("rule/policy.py", "from dispatch_retention.run import job"),
        ("trail/holds.py", "from dispatch_retention.checks import verify"),
        ("run/cleaner.py", "from dispatch_retention.checks import db_check"),
        ("pg/engines.py", "from dispatch_retention.trail import audit_tables"),
    ],
)
def test_an_import_that_goes_up_breaks_it(tmp_path: Path, module: str, upward: str) -> None:
    """A copy of the package with one import up a layer (or across, from `run` to
    `checks`): the contract names it broken."""
    copy = tmp_path / "dispatch_retention"
    shutil.copytree(ROOT / "src" / "dispatch_retention", copy)
    target = copy / module
    target.write_text(target.read_text() + f"\n{upward}  # noqa\n")
    done = lint_imports(tmp_path)
    assert done.returncode != 0
    assert "BROKEN" in done.stdout, done.stdout
    assert module.removesuffix(".py").replace("/", ".") in done.stdout


def test_the_architecture_page_names_every_module_in_its_layer() -> None:
    """docs/architecture.md's table of the layers names each module in the row of its
    folder, and every folder is a layer of the contract."""
    page = (ROOT / "docs" / "architecture.md").read_text()
    table = page[page.index("## The layers") : page.index("## The life of a chunk")]
    rows = {
        row.split("|")[1].strip().strip("`"): row
        for row in table.splitlines()
        if row.startswith("| `") or row.startswith("| leaves")
    }
    package = ROOT / "src" / "dispatch_retention"
    layers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    contract = {
        name.strip()
        for layer in layers["contracts"][0]["layers"]
        for name in layer.replace("|", ":").split(":")
    }
    for module in sorted(package.rglob("*.py")):
        relative = module.relative_to(package)
        if module.name == "__init__.py" or "migrations" in relative.parts:
            continue
        if len(relative.parts) == 1:
            row = rows.get(module.name) or rows["leaves"]
            assert module.name in row or row.startswith(f"| `{module.name}`"), module.name
            continue
        folder = f"{relative.parts[0]}/"
        assert f"`{module.stem}`" in rows[folder], f"{relative} is not named in its row"
        assert relative.parts[0] in contract, f"{folder} is no layer of the contract"
    assert {m.stem for m in package.glob("*.py")} - {"__init__"} <= contract
