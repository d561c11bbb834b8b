"""The wheel: everything under openelm_mlx/, a working console script, no generic top-level names, and on
Linux x86-64 the compiled kernels (openelm_mlx/small_gemm.c, cpu_attention.c)."""

import platform
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
                   check=True, capture_output=True)
    (path,) = out.glob("openelm_mlx-*.whl")
    return path


@pytest.mark.slow
def test_wheel_has_no_generic_top_level_packages(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"openelm_mlx"}
    assert "openelm_mlx/convert/__init__.py" in names and "openelm_mlx/bench/__init__.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "openelm-mlx = openelm_mlx.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    kernels = [n for n in names if n.startswith("openelm_mlx/_kernels") and n.endswith(".so")]
    assert len(kernels) == (1 if sys.platform == "linux" and platform.machine() == "x86_64" else 0), names


@pytest.mark.slow
def test_installed_wheel_runs_from_any_directory(wheel, tmp_path):
    """A non-editable install (to a target dir, dependencies from this environment) runs its CLI
    from an unrelated working directory, so nothing leans on the source tree."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = target / "bin" / "openelm-mlx"  # the console script pip generated
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    run = subprocess.run([str(script), "--version"], cwd=elsewhere, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("openelm-mlx ")
    where = subprocess.run([sys.executable, "-c", "import openelm_mlx; print(openelm_mlx.__file__)"], cwd=elsewhere,
                           capture_output=True, text=True, env=env)
    assert where.stdout.startswith(str(target)), where.stdout  # the installed copy, not the source tree
