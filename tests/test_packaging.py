"""The wheel installs one top-level package, ``mpa_kernels``, and works when installed as a plain
(non-editable) copy and imported from an unrelated directory.

The build runs on a copy of the sources in a temporary directory, so that setuptools' ``build/``
and ``*.egg-info`` never land in the checkout.
"""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("mpa_kernels", "reference", "training", "benchmarks")

# Run in the installed copy with the generic names made unimportable: an absolute
# ``import reference`` (or training, benchmarks) anywhere in the package then fails here, even on a
# machine where another checkout provides them.
_BLOCK = "import sys\nfor n in ('reference', 'training', 'benchmarks'): sys.modules[n] = None\n"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "results", "*.egg-info")
    for name in SOURCES:
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(src)], check=True, capture_output=True)
    (path,) = out.glob("mpa_kernels-*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True, capture_output=True)
    return target


def _run(code: str, target: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", _BLOCK + code], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_wheel_has_no_generic_top_level_names(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {n for n in top if not n.endswith(".dist-info")} == {"mpa_kernels"}
    for sub in ("reference", "training", "benchmarks"):
        assert f"mpa_kernels/{sub}/__init__.py" in names
    assert "mpa_kernels/training/configs/default.json" in names
    entry_points = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "mpa-train = mpa_kernels.training.cli:main" in entry_points


def test_installed_copy_imports_from_another_directory(installed, tmp_path):
    result = _run(
        "import torch, mpa_kernels, mpa_kernels.reference as r\n"
        f"assert mpa_kernels.__file__.startswith({str(installed)!r}), mpa_kernels.__file__\n"
        f"assert r.__file__.startswith({str(installed)!r}), r.__file__\n"
        "x, y = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])\n"
        "f = mpa_kernels.MPALoss(3, 4, proxies_per_class=2, backend='reference', dtype=x.dtype)\n"
        "expected = r.mpa_loss(x, y, f.proxies.detach(), 2)\n"
        "assert abs(f(x, y).item() - expected.item()) < 1e-12\n"
        "print('ok')\n",
        installed, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_installed_training_harness_runs_from_another_directory(installed, tmp_path):
    result = _run(
        "import runpy\n"
        "sys.argv = ['mpa-train', '--help']\n"
        "runpy.run_module('mpa_kernels.training', run_name='__main__')\n",
        installed, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "--config" in result.stdout


def test_installed_console_script(installed, tmp_path):
    env = {"PYTHONPATH": str(installed), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(installed / "bin" / "mpa-train"), "--help"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "--config" in result.stdout
