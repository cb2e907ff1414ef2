"""The package's layering (docs/design.md), enforced: import-linter's `layers` contract in
pyproject.toml (imports inside functions count), and no import cycle among the commands."""
from pathlib import Path

import pytest

importlinter = pytest.importorskip("importlinter", reason="the test extra installs import-linter")
from importlinter.cli import lint_imports  # noqa: E402

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_no_module_imports_a_layer_above_it(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # analyse the installed package, not a source tree on sys.path
    assert lint_imports(config_filename=str(PYPROJECT)) == 0


def test_the_contract_sees_imports(monkeypatch, tmp_path):
    """The same checker flags a known upward import (sampling imports diffusion): a contract
    that puts diffusion above sampling must break, so the real one is able to fail."""
    config = tmp_path / "reversed.toml"
    config.write_text('[tool.importlinter]\nroot_package = "fastdiff"\n\n[[tool.importlinter.contracts]]\n'
                      'name = "reversed"\ntype = "layers"\ncontainers = ["fastdiff"]\n'
                      'layers = ["diffusion", "sampling"]\n')
    monkeypatch.chdir(tmp_path)
    assert lint_imports(config_filename=str(config)) != 0


def test_commands_import_no_cycle():
    """The command modules are imported by fastdiff.cli, never the other way round (the old
    cli <-> evaluation_cli cycle)."""
    import grimp

    graph = grimp.build_graph("fastdiff")
    commands = sorted(m for m in graph.find_descendants("fastdiff.cli"))
    assert commands, "fastdiff.cli has no submodules?"
    for module in commands:
        assert not graph.direct_import_exists(importer=module, imported="fastdiff.cli"), module
