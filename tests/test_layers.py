"""The layering of docs/architecture holds: no module imports from a layer above its own.

The contracts live in pyproject.toml ([tool.importlinter]); import-linter checks them on the
package's real import graph (in-function imports included).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lint_imports(config: Path) -> subprocess.CompletedProcess:
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={str(config)!r}, no_cache=True, no_logo=True))")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_every_layers_contract_is_kept():
    result = lint_imports(ROOT / "pyproject.toml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_an_upward_import_would_be_caught(tmp_path):
    """The same checker on a contract the code breaks on purpose (api above cli) fails, so the
    green result above means something."""
    config = tmp_path / "inverted.toml"
    config.write_text('[tool.importlinter]\nroot_package = "vpt_cli"\n\n[[tool.importlinter.contracts]]\n'
                      'name = "inverted"\ntype = "layers"\nlayers = ["vpt_cli.api", "vpt_cli.cli.train"]\n')
    result = lint_imports(config)
    assert result.returncode != 0 and "vpt_cli.cli.train -> vpt_cli.api" in result.stdout


def test_type_checking_imports_count(tmp_path):
    """`cli.render` imports the api's result types only under TYPE_CHECKING; the project's
    settings count such imports, so inverting those two layers is caught too."""
    config = tmp_path / "inverted.toml"
    config.write_text('[tool.importlinter]\nroot_package = "vpt_cli"\nexclude_type_checking_imports = false\n\n'
                      '[[tool.importlinter.contracts]]\nname = "inverted"\ntype = "layers"\n'
                      'layers = ["vpt_cli.api", "vpt_cli.cli.render"]\n')
    result = lint_imports(config)
    assert result.returncode != 0 and "vpt_cli.cli.render -> vpt_cli.api" in result.stdout
    assert "exclude_type_checking_imports = false" in (ROOT / "pyproject.toml").read_text()
