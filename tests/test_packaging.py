"""The installed import names are namespaced; generic top-level names are refused."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_installed_names_import():
    from fedsplitkd.baselines import __name__ as baselines
    from fedsplitkd.clients.client_app import app
    from fedsplitkd.strategies import SplitKD

    assert baselines == "fedsplitkd.baselines"
    assert SplitKD.__module__ == "fedsplitkd.strategies.splitkd"
    assert app is not None


@pytest.mark.parametrize("name", ["strategies", "clients", "baselines"])
def test_bare_top_level_import_is_refused(name):
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import {name}"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode != 0
    assert f"import this package as 'fedsplitkd.{name}'" in run.stderr


def test_wheel_installs_only_the_fedsplitkd_namespace(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("fedsplitkd-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fedsplitkd/strategies/splitkd.py" in names
    assert "fedsplitkd/clients/client_app.py" in names
    assert "fedsplitkd/baselines/__init__.py" in names
    tops = {n.split("/")[0] for n in names if not n.startswith("fedsplitkd-")}
    assert tops == {"fedsplitkd"}
