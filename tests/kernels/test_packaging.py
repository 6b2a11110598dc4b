"""A wheel of the project carries the C kernels' sources: they are compiled on first use
(``kernels/_cbuild.py``), so an installed (not editable) package without them cannot import
``kernels``."""

import os
import shutil
import subprocess
import sys
import zipfile

import kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(kernels.__file__)))
CSRC = os.path.join(ROOT, "kernels", "csrc")


def test_the_wheel_carries_every_c_source_and_header(tmp_path):
    # Built from a copy: an in-tree build/ left by an earlier build would hide a missing entry.
    src = tmp_path / "src"
    skip = shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "*.so")
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    for package in ("rollout", "engine_core", "kernels", "weight_sync"):
        shutil.copytree(os.path.join(ROOT, package), src / package, ignore=skip)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(tmp_path), str(src)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = sorted(f for f in os.listdir(CSRC) if f.endswith((".c", ".h")))
    assert sources, "no C sources found"
    missing = [f for f in sources if f"kernels/csrc/{f}" not in names]
    assert not missing, f"wheel lacks {missing}"
