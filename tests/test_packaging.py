"""The source distribution carries everything the extension's build needs: every C++/CUDA
source and header under csrc/ (a pip install from the sdist compiles them), the package, the
README and the build files."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_sdist_has_every_source_and_header(tmp_path):
    # egg-info goes to tmp_path as well, so the checkout stays as it is
    res = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base",
                          str(tmp_path), "sdist", "--dist-dir", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    # named headq-torch-* or, by newer setuptools, headq_torch-*
    sdists = list(tmp_path.glob("headq[-_]torch-*.tar.gz"))
    assert len(sdists) == 1, (sorted(p.name for p in tmp_path.iterdir()), res.stdout[-2000:])
    (sdist,) = sdists
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    needed = {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*")
              if p.suffix in (".h", ".cuh", ".cpp", ".cu")}
    needed |= {str(p.relative_to(ROOT)) for p in (ROOT / "headq_torch").glob("*.py")}
    needed |= {"setup.py", "pyproject.toml", "README.md", "CMakeLists.txt", "MANIFEST.in"}
    assert needed <= names, f"missing from the sdist: {sorted(needed - names)}"
