"""What ``pip install .`` (not ``-e``) ships: every package of the tree, and the data directory.

pyproject.toml lists the packages by hand because one of them lives outside ``minilora/``:
the repository's ``data/`` is installed as ``minilora/_shipped`` (see
:func:`minilora.data.data_dir` for the one rule that finds it). ``.ci/run`` installs the wheel into
a fresh venv and runs ``minilora tour --fast`` from another directory.
"""
import pathlib

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_pyproject_lists_every_package_of_the_tree():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    tree = {".".join(p.parent.relative_to(ROOT).parts)
            for p in (ROOT / "minilora").rglob("__init__.py")}
    assert listed - {"minilora._shipped"} == tree, (
        f"add to pyproject.toml [tool.setuptools] packages: {sorted(tree - listed)}; "
        f"remove: {sorted(listed - tree - {'minilora._shipped'})}")
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert cfg["package-dir"]["minilora._shipped"] == "data"


def test_data_dir_rule(monkeypatch, tmp_path):
    import pytest

    from minilora.data import DataMissingError, data_dir
    monkeypatch.delenv("MINILORA_DATA", raising=False)
    assert (data_dir() / "SOURCES.md").is_file()
    monkeypatch.setenv("MINILORA_DATA", str(tmp_path))
    assert data_dir() == tmp_path
    monkeypatch.setenv("MINILORA_DATA", str(tmp_path / "nope"))
    with pytest.raises(DataMissingError, match="MINILORA_DATA"):
        data_dir()
