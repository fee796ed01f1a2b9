"""mixdq installs as a package: its data found through one function, its CLI as a script."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_data_is_found_through_one_function_only():
    """No module finds repo folders by walking up from its own file, except resources.py."""
    walkers = [str(p.relative_to(ROOT)) for p in (ROOT / "mixdq").rglob("*.py")
               if p.name != "resources.py" and re.search(r"parents?\b(\[\d\]|\.parent)", p.read_text())]
    assert walkers == []
    from mixdq.resources import shipped

    assert (shipped("assets", "tiny-sdxl") / "model_index.json").is_file()
    assert (shipped("presets") / "sensitivity.json").is_file()
    with pytest.raises(ValueError, match="ships"):
        shipped("weights")


def test_installed_wheel_runs_outside_the_checkout(tmp_path):
    """`pip install .` (offline, here without dependencies: the test's own are used): the
    package, its shipped data and the `mixdq` script work from another folder."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(ROOT)],
                   check=True, capture_output=True, text=True, timeout=600)
    env = dict(os.environ, PYTHONPATH=str(target), HF_HUB_OFFLINE="1")
    probe = ("import mixdq; from mixdq.resources import shipped; from mixdq.loading import EMBEDDED; "
             "print(mixdq.__file__); print(EMBEDDED); print(shipped('presets', 'sensitivity.json').is_file())")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, check=True, capture_output=True,
                         text=True, timeout=120).stdout.split("\n")
    assert out[0].startswith(str(target)) and out[1].startswith(str(target)) and out[2] == "True"
    assert (Path(out[1]) / "unet" / "config.json").is_file()  # the embedded model went into the wheel
    script = subprocess.run([str(target / "bin" / "mixdq"), "allocate", "--help"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert script.returncode == 0 and "--budget-mb" in script.stdout


def test_this_checkout_is_installed_with_its_script():
    """The README's set-up installs the checkout itself (editable), `mixdq` script included."""
    from importlib.metadata import distribution

    dist = distribution("mixdq")
    assert {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"} == {"mixdq": "mixdq.cli:main"}
    import mixdq

    assert Path(mixdq.__file__).resolve().is_relative_to(ROOT)


def test_every_subpackage_is_in_the_wheel():
    """pyproject.toml lists the packages (the data folders are mapped into it): a new
    subpackage must be listed too, or `pip install .` would leave it out."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "mixdq").rglob("__init__.py")}
    assert found <= listed, sorted(found - listed)
