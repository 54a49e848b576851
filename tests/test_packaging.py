"""The installed package: fastalign.kernels is importable, a top-level `kernels` is not.

transformers probes for a package named `kernels` (the Hugging Face kernel hub) and changes its
behaviour when it finds one, so our kernel folder must install only as fastalign.kernels.
"""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import importlib.util, json
import fastalign.kernels
from transformers.utils import import_utils
probe = getattr(import_utils, "is_kernels_available", lambda: None)
print(json.dumps({"top": importlib.util.find_spec("kernels") is not None,
                  "ours": fastalign.kernels.__name__, "hub": probe()}))
"""


def test_installed_fastalign_exposes_no_top_level_kernels(tmp_path):
    # A clean interpreter outside the checkout, so only the installed package is on the path.
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True, check=True)
    result = __import__("json").loads(out.stdout.strip().splitlines()[-1])
    assert result == {"top": False, "ours": "fastalign.kernels", "hub": result["hub"]}
    assert result["hub"] in (False, None)


@pytest.mark.skipif(not (ROOT / "pyproject.toml").exists(), reason="needs the source checkout")
def test_wheel_holds_kernels_only_under_fastalign(tmp_path):
    pytest.importorskip("setuptools", reason="building the wheel offline needs setuptools in this environment")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("fastalign-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fastalign/kernels/__init__.py" in names
    assert "fastalign/kernels/linear_logprobs.py" in names
    # Every subpackage of the source tree is in the wheel.
    for init in sorted((ROOT / "fastalign").rglob("*/__init__.py")):
        package = init.parent.relative_to(ROOT).as_posix()
        assert f"{package}/__init__.py" in names, package
    tops = {n.split("/")[0] for n in names}
    assert all(t == "fastalign" or t.endswith(".dist-info") for t in tops), tops
