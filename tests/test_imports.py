"""The package's layers: the core (protocol, models, data, fleet) never imports its public façade
``fedsplitkd.library`` (issue 37), and every module imports on its own."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
CORE = ("protocol", "models", "data", "fleet")
# What resolves to the façade: the module, and the names fedsplitkd's __getattr__ fetches from it.
FACADE = "fedsplitkd.library"


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, root: Path = ROOT) -> set[str]:
    """Modules ``path`` imports anywhere in it (a function's import counts: it still closes a circle)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                parent = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join([*parent, base] if base else parent)
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}
    return names


def facade_imports(path: Path, root: Path = ROOT) -> list[str]:
    from fedsplitkd import _LIBRARY

    lazy = {f"fedsplitkd.{name}" for name in _LIBRARY}  # ``from fedsplitkd import SplitDevice``
    return sorted(n for n in imported(path, root) if n == FACADE or n.startswith(FACADE + ".") or n in lazy)


def core_files() -> list[Path]:
    return sorted(p for layer in CORE for p in (ROOT / "fedsplitkd" / layer).rglob("*.py"))


def test_the_core_never_imports_the_library():
    assert len(core_files()) > 15  # the walk found the layers
    offenders = {module_name(p): facade_imports(p) for p in core_files() if facade_imports(p)}
    assert not offenders, f"the core imports its façade fedsplitkd.library: {offenders}"
    # nor does what the library itself is built on
    assert not facade_imports(ROOT / "fedsplitkd" / "splitkd_config.py")
    assert not facade_imports(ROOT / "fedsplitkd" / "config.py")


def test_the_scan_sees_each_form_of_import(tmp_path):
    core = tmp_path / "fedsplitkd" / "protocol"
    core.mkdir(parents=True)
    forms = {"a.py": "from fedsplitkd.library import SplitDevice\n",
             "b.py": "def f():\n    import fedsplitkd.library\n",
             "c.py": "from .. import library\n",
             "d.py": "from fedsplitkd import SplitDevice\n",
             "e.py": "from fedsplitkd.protocol import device\n"}
    found = {name: bool(facade_imports(_write(core / name, text), tmp_path)) for name, text in forms.items()}
    assert found == {"a.py": True, "b.py": True, "c.py": True, "d.py": True, "e.py": False}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_the_core_imports_without_the_library_and_every_module_imports():
    """In a fresh interpreter, importing each core module (first one, then the next) never loads
    the library; then every module of the package imports."""
    core = [module_name(p) for p in core_files()]
    script = ("import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
              "    assert 'fedsplitkd.library' not in sys.modules, m + ' loaded fedsplitkd.library'\n")
    done = subprocess.run([sys.executable, "-c", script, *core], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    package = [module_name(p) for p in (ROOT / "fedsplitkd").rglob("*.py")]
    package += [module_name(p) for sub in ("strategies", "clients", "baselines") for p in (ROOT / sub).rglob("*.py")]
    assert len(package) > 40
    for module in package:
        name = module if module.startswith("fedsplitkd") else f"fedsplitkd.{module}"  # installed as such
        assert importlib.import_module(name)


def test_the_library_keeps_its_public_names():
    library = importlib.import_module(FACADE)
    for name in ("SplitKDConfig", "SplitDevice", "edge_server", "split_model", "teacher_model", "to_arrays",
                 "teacher_accuracy", "Blocks", "OptimizerFactory", "TEACHER_EMBEDDING"):
        assert hasattr(library, name), name
    import fedsplitkd

    assert fedsplitkd.SplitKDConfig is library.SplitKDConfig and fedsplitkd.SplitDevice is library.SplitDevice
