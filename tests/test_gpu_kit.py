"""The GPU check kit (``scripts/gpu_check.sh`` and ``scripts/gpu_kit.py``), proven without a GPU.

The install plan's checks on wheels built here, the torch-name audit on a planted missing name,
the tour's cell markers, figures travelling from a test through the JUnit XML into the report, and
``gpu_check.sh --dry-run`` end to end: a stand-in Python without IPython & co. (like the GPU
machine), the carried packages installed into a temp target, the suite collected, a part of it run,
the GPU tour on the CPU, ``figures.json`` written.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_kit  # noqa: E402

IN_GPU_CHECK = os.environ.get("TORCHMAGIC_GPU_CHECK") == "1"


def _wheel(folder: Path, name: str, version: str, requires: list[str]) -> Path:
    """A minimal wheel file: only its METADATA matters to the plan."""
    path = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    meta = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}",
            *(f"Requires-Dist: {r}" for r in requires)]
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", "\n".join(meta) + "\n")
    return path


# -- the install plan ---------------------------------------------------------------------------
def test_plan_accepts_a_closed_set_and_names_every_problem(tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    _wheel(good, "alpha", "1.0", ["beta>=2", "numpy", 'colorama; sys_platform == "win32"',
                                  'tomli; python_version < "3.11"', 'pytest; extra == "test"'])
    _wheel(good, "beta", "2.1", [])
    pins = {"alpha": "1.0", "beta": "2.1"}
    res = gpu_kit.check_plan(good, pins=pins)
    assert res["problems"] == [] and res["wheels"] == ["alpha==1.0", "beta==2.1"]

    bad = tmp_path / "bad"
    bad.mkdir()
    _wheel(bad, "alpha", "1.0", ["beta>=3", "not-on-the-machine"])
    _wheel(bad, "beta", "2.1", [])
    _wheel(bad, "stray", "0.1", [])
    res = gpu_kit.check_plan(bad, pins={"alpha": "1.1", "beta": "2.1", "gamma": "1"})
    text = "\n".join(res["problems"])
    assert "is alpha 1.0, pinned 1.1" in text
    assert "pinned gamma==1 has no wheel" in text
    assert "stray-0.1-py3-none-any.whl is not pinned" in text
    assert "alpha needs beta>=3, the wheel is 2.1" in text
    assert "alpha needs not-on-the-machine: neither carried nor on the GPU machine" in text
    _wheel(bad, "beta", "2.2", [])  # two versions of one name
    res = gpu_kit.check_plan(bad, pins={"alpha": "1.0", "beta": "2.1", "stray": "0.1"})
    assert any("two wheels of beta" in p for p in res["problems"])


def test_plan_against_this_python_checks_versions(tmp_path):
    _wheel(tmp_path, "alpha", "1.0", ["pytest>=1", "pytest<2", "nowhere-to-be-found"])
    res = gpu_kit.check_plan(tmp_path, machine=True, pins={"alpha": "1.0"})
    assert any("needs pytest<2; this Python has pytest" in w for w in res["warnings"])
    assert any("needs nowhere-to-be-found: neither carried nor installed" in p
               for p in res["problems"])


def test_pins_and_downloaded_wheels_agree():
    pins = gpu_kit.read_pins()
    assert {"ipython", "traitlets", "ipywidgets", "torchinfo", "prompt-toolkit"} <= set(pins)
    assert not set(pins) & gpu_kit.GPU_MACHINE_PACKAGES, "carrying what the machine has"
    wheels = ROOT / "gpu-wheels"
    if not list(wheels.glob("*.whl")):
        pytest.skip("gpu-wheels/ is empty: bash scripts/gpu_wheels.sh downloads the wheels")
    res = gpu_kit.check_plan(wheels)
    assert res["problems"] == [], res["problems"]
    assert res["bytes"] < 32 * 2**20  # the device tool carries at most 64 MiB in all


# -- the torch API audit ------------------------------------------------------------------------------
def test_audit_names_what_this_torch_lacks_with_file_and_line(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "mod.py").write_text(textwrap.dedent("""\
        import torch
        import torch.nn.functional as F
        from torch.utils import flop_counter


        def f(x):
            y = torch.cuda.memory_allocated() + F.relu(x).sum()
            z = torch.no_such_function_for_the_audit(x)
            flop_counter.FlopCounterMode
            try:
                w = torch.ops.aten.no_such_op_for_the_audit.default
            except AttributeError:
                w = None
            try:
                from torch.new_module_of_a_later_torch import helper
            except ImportError:  # an older torch: the fallback is guarded too
                from torch.old_module_of_an_earlier_torch import helper
            return torch.nn.functional.not_there_either, y, z, w, helper


        aten = torch.ops.aten
        SKIP = {aten.mm.default, aten.missing_op_via_an_alias.default}
        holder = torch._GLOBAL_DEVICE_CONTEXT
        holder.set_here_not_read = 1
        """))
    (pkg / "other.py").write_text("from torch.utils.no_such_module_xyz import thing\n")
    res = gpu_kit.audit(pkg)
    found = {(m["file"], m["line"], m["name"], m["guarded"]) for m in res["missing"]}
    assert found == {
        ("pkg/mod.py", 8, "torch.no_such_function_for_the_audit", False),
        ("pkg/mod.py", 11, "torch.ops.aten.no_such_op_for_the_audit.default", True),
        ("pkg/mod.py", 15, "torch.new_module_of_a_later_torch.helper", True),
        ("pkg/mod.py", 17, "torch.old_module_of_an_earlier_torch.helper", True),
        ("pkg/mod.py", 18, "torch.nn.functional.not_there_either", False),
        ("pkg/mod.py", 22, "torch.ops.aten.missing_op_via_an_alias.default", False),
        ("pkg/other.py", 1, "torch.utils.no_such_module_xyz.thing", False),
    }, res["missing"]
    assert res["names_checked"] >= 8


# -- the tour's markers ---------------------------------------------------------------------------
def test_tour_markers_drop_only_what_cannot_run_here():
    text = textwrap.dedent("""\
        # header
        # %%
        a = 1
        # %% cuda
        b = torch.ones(1, device="cuda")
        # %% if-magic estimate
        %estimate m x
        # %% if-magic summary
        %summary m
        # %% expect-error
        1 / 0
        """)
    kept, notes = gpu_kit.filter_tour(text, cuda=False, magics={"summary"})
    assert "a = 1" in kept and "%summary m" in kept and "1 / 0" in kept
    assert "cuda" not in kept and "%estimate" not in kept
    assert notes == ['skipped (needs CUDA): b = torch.ones(1, device="cuda")',
                     "skipped (needs %estimate, which this torchmagic does not have): "
                     "%estimate m x"]
    kept, notes = gpu_kit.filter_tour(text, cuda=True, magics={"summary", "estimate"})
    assert notes == [] and kept.count("# %%") == 5


def test_gpu_tour_covers_every_magic():
    """Every magic torchmagic registers appears in the GPU tour (new ones get a cell)."""
    tour = (ROOT / "examples" / "gpu_tour.ipy").read_text()
    used = set(re.findall(r"^%%?(\w+)", tour, re.M))
    missing = gpu_kit._magic_names() - used
    assert not missing, f"magics without a cell in examples/gpu_tour.ipy: {sorted(missing)}"


# -- figures: test -> JUnit XML -> report ------------------------------------------------------------
def test_figures_travel_from_a_test_to_the_report(tmp_path):
    (tmp_path / "test_sample.py").write_text(textwrap.dedent(f"""\
        import sys
        sys.path.insert(0, {str(ROOT / "tests")!r})
        import pytest
        from cuda_helpers import figure

        def test_measures(request):
            figure(request, "ratio", 1.25)
            figure(request, "table", {{"a": 1, "b": [2, 3]}})

        def test_fails_after_measuring(request):
            figure(request, "seen", 7)
            assert 1 == 2, "boom"

        @pytest.mark.skip(reason="needs a CUDA device")
        def test_skipped():
            pass
        """))
    xml = tmp_path / "junit.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           f"--junitxml={xml}", str(tmp_path / "test_sample.py")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:]
    res = gpu_kit.read_junit(xml)
    assert res["counts"] == {"tests": 3, "passed": 1, "failed": 1, "errors": 0, "skipped": 1}
    assert res["skip_reasons"] == {"needs a CUDA device": 1}
    figs = {k.rsplit("::", 1)[-1]: v for k, v in res["figures"].items()}
    assert figs == {"test_measures": {"ratio": 1.25, "table": {"a": 1, "b": [2, 3]}},
                    "test_fails_after_measuring": {"seen": 7}}
    assert res["failures"][0]["test"].endswith("test_fails_after_measuring")
    assert "boom" in res["failures"][0]["message"]


# -- the call documented for the lead ---------------------------------------------------------------
def test_the_one_call_is_the_same_in_the_script_and_the_readme():
    call = re.compile(r'run\(command="(bash scripts/gpu_check\.sh[^"]*)", carry=\[([^\]]*)\]')
    script = call.findall((ROOT / "scripts" / "gpu_check.sh").read_text())
    readme = call.findall((ROOT / "README.md").read_text())
    assert script and readme and script[0] == readme[0], (script, readme)
    command, carry = script[0]
    assert len(command) <= 2000 and json.loads(f"[{carry}]") == ["gpu-wheels"]
    ignored = (ROOT / ".gitignore").read_text().split()
    assert "gpu-wheels/" in ignored and "gpu-check-out/" in ignored


# -- end to end -----------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(IN_GPU_CHECK, reason="runs the kit itself: not inside a gpu_check.sh run")
@pytest.mark.skipif(sys.platform != "linux", reason="the kit targets the Linux GPU machine")
def test_dry_run_end_to_end(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "GPU_CHECK_HOST_PYTHON": sys.executable}
    for name in ("OUT", "PYTHONPATH", "TORCHMAGIC_GPU_CHECK"):
        env.pop(name, None)
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["figures.json", "gpu_check.log", "junit.xml", "pytest.log", "tour.txt"]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)  # what the device tool returns
    rep = json.loads((out / "figures.json").read_text())
    assert rep["mode"] == "dry-run" and rep["machine"]["cuda_available"] is False
    assert set(rep["exit_codes"].values()) == {0} and set(rep["exit_codes"]) == {
        "collect", "pytest", "tour"}
    counts = rep["tests"]["counts"]
    cuda_tests = rep["tests"]["cuda_tests"]
    assert counts["failed"] == counts["errors"] == 0 and counts["passed"] >= 15
    assert len(cuda_tests) >= 30 and set(cuda_tests.values()) == {"skipped"}
    assert rep["tests"]["skip_reasons"] == {"needs a CUDA device": counts["skipped"]}
    assert rep["tour"]["ok"] and rep["tour"]["cells"] >= 30
    assert any("needs CUDA" in s for s in rep["tour"]["skipped"])
    assert rep["plan"]["problems"] == []
    assert [m for m in rep["audit"]["missing"] if not m["guarded"]] == []
    text = (out / "gpu_check.log").read_text()
    assert "stand-in for the GPU machine" in text and "no IPython" in text
    assert "needs nbformat" in text  # the notebook tests skip, saying why
    assert "every cell ran as expected" in (out / "tour.txt").read_text()
