"""What does not fit a notebook: the package imports, notebooks and package agree, notebooks are clean."""
import importlib, json, pkgutil, shutil, subprocess, sys, filecmp
from pathlib import Path
import pytest
import vla_lit

ROOT = Path(__file__).resolve().parents[1]
NBDEV_BIN = Path(sys.executable).parent
NOTEBOOKS = sorted(p for p in (ROOT/"nbs").rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def _modules():
    return sorted(m.name for m in pkgutil.walk_packages(vla_lit.__path__, "vla_lit."))


def test_there_are_modules_and_notebooks():
    assert "vla_lit.core" in _modules()
    assert any(p.name == "00_core.ipynb" for p in NOTEBOOKS)


@pytest.mark.parametrize("name", _modules())
def test_every_exported_module_imports(name):
    importlib.import_module(name)


def _copy_project(dst: Path) -> Path:
    for f in ("settings.ini", "setup.py", "README.md"):
        shutil.copy2(ROOT/f, dst/f)
    shutil.copytree(ROOT/"nbs", dst/"nbs", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    shutil.copytree(ROOT/"vla_lit", dst/"vla_lit", ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def test_nbdev_export_leaves_no_diff(tmp_path):
    "The package is exactly what the notebooks export (nbs/ is the source of truth)."
    proj = _copy_project(tmp_path)
    before = _tree(proj/"vla_lit")
    subprocess.run([str(NBDEV_BIN/"nbdev_export")], cwd=proj, check=True, capture_output=True)
    after = _tree(proj/"vla_lit")
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"nbdev_export changed {changed}: run `nbdev_export` and commit the result"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: str(p.relative_to(ROOT)))
def test_notebook_has_no_outputs(nb):
    cells = json.loads(nb.read_text())["cells"]
    dirty = [i for i, c in enumerate(cells) if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, f"{nb.name}: cells {dirty} keep outputs/execution counts; run `nbdev_clean`"


def test_nbdev_clean_leaves_no_diff(tmp_path):
    "Notebooks are stored exactly as `nbdev_clean` writes them (readable git diffs)."
    proj = _copy_project(tmp_path)
    subprocess.run([str(NBDEV_BIN/"nbdev_clean")], cwd=proj, check=True, capture_output=True)
    changed = [str(p.relative_to(ROOT)) for p in NOTEBOOKS
               if (proj/p.relative_to(ROOT)).read_bytes() != p.read_bytes()]
    assert not changed, f"nbdev_clean changed {changed}: run `nbdev_clean` and commit the result"


def test_settings_register_test_flags():
    from configparser import ConfigParser
    cfg = ConfigParser(delimiters=["="]); cfg.read(ROOT/"settings.ini")
    assert cfg["DEFAULT"]["tst_flags"].split() == ["notest", "slow", "gpu"]


RUFF = NBDEV_BIN / "ruff"
LINT = ["--select", "F", "--ignore", "F811"]


def test_lint_catches_an_undefined_name(tmp_path):
    "The lint step of `make test` (ruff's pyflakes rules) flags a name a module uses but never imports or defines."
    bad = tmp_path / "vilex_like.py"
    bad.write_text("from pathlib import Path\n\ndef tiny_random_sd():\n    return embedded_path('x') / Path('y')\n")
    out = subprocess.run([str(RUFF), "check", *LINT, str(bad)], capture_output=True, text=True)
    assert out.returncode != 0 and "F821" in out.stdout and "embedded_path" in out.stdout, out.stdout


def test_package_passes_lint():
    "No undefined name (or other pyflakes error) anywhere in the exported package."
    out = subprocess.run([str(RUFF), "check", *LINT, "--exclude", "vla_lit/_modidx.py", str(ROOT / "vla_lit")],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
