"""The source distribution builds and tests the package by itself: it holds every file of
csrc/ (the headers too, which setuptools does not add on its own) and of tests/."""

import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def files_under(folder: str) -> set[str]:
    """Paths relative to the repository of the files under ``folder``, bytecode caches aside."""
    return {
        str(path.relative_to(ROOT))
        for path in (ROOT / folder).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }


def test_sdist_holds_every_source_and_test_file(tmp_path):
    # egg_info's folder goes to tmp_path too, so the checkout is left as it was.
    env = dict(os.environ, ECHO_KERNELS_CUDA="0")
    subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path), "sdist",
                    "-d", str(tmp_path)], cwd=ROOT, env=env, check=True, capture_output=True)
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        shipped = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    wanted = files_under("csrc") | files_under("tests") | {"configs/tiny.yaml", "pyproject.toml", "setup.py"}
    assert "csrc/cpu/vrope_common.h" in wanted  # the header the C++ kernels include
    assert sorted(wanted - shipped) == []
    assert [name for name in shipped if name.endswith(".pyc")] == []  # tests/__pycache__ is on disk here
