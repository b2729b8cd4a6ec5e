#!/usr/bin/env python3
"""Helpers of ``scripts/gpu_check.sh`` (the GPU check kit); standard library + ``packaging`` only.

    python scripts/gpu_kit.py plan --wheels gpu-wheels [--machine]
        Check the install plan: one wheel per pin of scripts/gpu_wheels.txt, at the pinned version,
        and every requirement of every wheel met by another wheel or by the GPU machine's own
        packages (``--machine``: by what this Python has installed, versions checked). Exit 1 on a
        problem; prints a JSON summary.
    python scripts/gpu_kit.py bare-python DEST
        --dry-run's stand-in for the GPU machine: a venv at DEST whose site-packages links only the
        distributions of this Python that the GPU machine has too (torch, pytest, psutil, numpy...)
        and none of the carried ones (IPython, traitlets, ipywidgets, torchinfo...).
    python scripts/gpu_kit.py link-carried DEST
        --dry-run without downloaded wheels: link this Python's installed copies of the pinned
        distributions into DEST, in place of pip's install (another version than a pin: a warning).
    python scripts/gpu_kit.py audit [--json FILE]
        Resolve every ``torch.*`` attribute and import that torchmagic's source names against the
        torch of this Python; list what is missing with file:line (an older torch on the machine).
    python scripts/gpu_kit.py tour FILE
        Run a tour file (examples/tour.py's runner) after dropping the cells whose marker says they
        cannot run here: ``# %% cuda`` (needs CUDA), ``# %% if-magic NAME`` (needs the magic NAME).
    python scripts/gpu_kit.py report --out FILE [--junit X] [--tour T] [--audit-source DIR] ...
        The JSON of measured figures: machine, torch, test counts, failures, skip reasons, the
        figures each test recorded (``figure:*`` user properties in the JUnit XML), tour result,
        and with --audit-source the torch-name audit of that folder.
"""

from __future__ import annotations

import argparse
import ast
import email.parser
import importlib
import importlib.metadata
import json
import os
import platform
import re
import sys
import sysconfig
import tempfile
import time
import venv
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PINS = ROOT / "scripts" / "gpu_wheels.txt"

#: The Python packages of the GPU machine's image ('cuda'), as listed in the workplace's notes of
#: 2026-11-17 (Python 3.12, torch 2.11 with CUDA 13). --dry-run links exactly these (where this
#: Python has them) into its stand-in venv; `plan` without --machine checks requirements against it.
GPU_MACHINE_PACKAGES = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops
equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio
h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig
interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime
onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint
packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache
protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric
torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect
urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())

#: Markers evaluate as on the GPU machine when `plan` checks without --machine.
TARGET_ENV = {
    "python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
    "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
    "implementation_name": "cpython", "platform_python_implementation": "CPython",
    "platform_release": "", "platform_version": "", "implementation_version": "3.12.3",
    "extra": "",
}


def canon(name: str) -> str:
    """PEP 503 normalised name: ``Stack_Data`` -> ``stack-data``."""
    return re.sub(r"[-_.]+", "-", name).lower()


# -- the install plan ------------------------------------------------------------------------------
def read_pins(path: Path = PINS) -> dict[str, str]:
    """``name -> version`` of ``scripts/gpu_wheels.txt`` (``name==version`` lines, # comments)."""
    pins: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not version.strip():
            raise SystemExit(f"{path}: {raw!r} is not name==version")
        pins[canon(name.strip())] = version.strip()
    return pins


def read_wheel(path: Path) -> dict[str, Any]:
    """Name, version and ``Requires-Dist`` lines from a wheel's METADATA (the file is not installed)."""
    with zipfile.ZipFile(path) as z:
        meta = [n for n in z.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")]
        if len(meta) != 1:
            raise ValueError(f"{path.name}: no single .dist-info/METADATA")
        msg = email.parser.Parser().parsestr(z.read(meta[0]).decode("utf-8"), headersonly=True)
    return {"file": path.name, "name": canon(msg["Name"]), "version": msg["Version"],
            "requires": list(msg.get_all("Requires-Dist") or [])}


def _installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_plan(wheel_dir: Path, machine: bool = False,
               pins: dict[str, str] | None = None) -> dict[str, Any]:
    """Check the wheels of ``wheel_dir`` against the pins and their requirements (see ``plan``).

    Returns ``{"wheels": [...], "problems": [...], "warnings": [...]}``: a problem makes the plan
    unusable (a pin without its wheel, two versions of one name, a requirement nobody provides);
    a warning is worth reading (a version the machine has but a wheel's specifier excludes, a
    carried wheel that shadows a package the machine already has).
    """
    from packaging.requirements import Requirement
    from packaging.version import Version

    pins = read_pins() if pins is None else pins
    wheels = [read_wheel(p) for p in sorted(wheel_dir.glob("*.whl"))]
    problems: list[str] = []
    warnings: list[str] = []
    by_name: dict[str, dict[str, Any]] = {}
    for w in wheels:
        if w["name"] in by_name:
            problems.append(f"two wheels of {w['name']}: {by_name[w['name']]['file']} and "
                            f"{w['file']} (pip stops on that)")
        by_name[w["name"]] = w
    for name, version in pins.items():
        w = by_name.get(name)
        if w is None:
            problems.append(f"pinned {name}=={version} has no wheel in {wheel_dir}")
        elif Version(w["version"]) != Version(version):
            problems.append(f"{w['file']} is {name} {w['version']}, pinned {version}")
    for name in sorted(set(by_name) - set(pins)):
        problems.append(f"{by_name[name]['file']} is not pinned in {PINS.name}")
    env = None if machine else TARGET_ENV
    for w in wheels:
        for spec in w["requires"]:
            req = Requirement(spec)
            if req.marker is not None and not req.marker.evaluate(
                    dict(env, extra="") if env else {"extra": ""}):
                continue
            dep = canon(req.name)
            if dep in by_name:
                have = by_name[dep]["version"]
                if not req.specifier.contains(have, prereleases=True):
                    problems.append(f"{w['name']} needs {req}, the wheel is {have}")
                continue
            if machine:
                have = _installed_version(dep)
                if have is None:
                    problems.append(f"{w['name']} needs {req}: neither carried nor installed here")
                elif not req.specifier.contains(have, prereleases=True):
                    warnings.append(f"{w['name']} needs {req}; this Python has {dep} {have}")
            elif dep not in GPU_MACHINE_PACKAGES:
                problems.append(f"{w['name']} needs {req}: neither carried nor on the GPU machine")
    if machine:
        for name, w in by_name.items():
            have = _installed_version(name)
            if have is not None:
                warnings.append(f"{w['file']} shadows the installed {name} {have}")
    return {"wheels": [f"{w['name']}=={w['version']}" for w in wheels],
            "bytes": sum(p.stat().st_size for p in wheel_dir.glob("*.whl")),
            "problems": problems, "warnings": warnings}


# -- the stand-in machine for --dry-run --------------------------------------------------------------
def _top_levels(dist: importlib.metadata.Distribution) -> set[str]:
    """The entries a distribution owns directly in site-packages (packages, modules, dist-info)."""
    tops: set[str] = set()
    for f in dist.files or []:
        parts = Path(str(f)).parts
        if parts and parts[0] not in ("..", "__pycache__") and not parts[0].startswith("/"):
            tops.add(parts[0])
    return tops


def _site_dists() -> list[tuple[importlib.metadata.Distribution, Path]]:
    """Distributions installed in this Python's purelib/platlib, with that folder."""
    folders = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
    out = []
    for dist in importlib.metadata.distributions(path=[str(f) for f in folders]):
        base = Path(str(dist.locate_file(""))).resolve()
        if base in folders:
            out.append((dist, base))
    return out


def _link(dists: list[tuple[importlib.metadata.Distribution, Path]], dest: Path) -> list[str]:
    dest.mkdir(parents=True, exist_ok=True)
    linked = []
    for dist, base in dists:
        for top in sorted(_top_levels(dist)):
            src, dst = base / top, dest / top
            if src.exists() and not dst.exists():
                dst.symlink_to(src)
        linked.append(f"{canon(dist.metadata['Name'])}=={dist.version}")
    return sorted(linked)


def bare_python(dest: Path) -> dict[str, Any]:
    """A venv at ``dest`` with only the GPU machine's packages of this Python (see the docstring)."""
    carried = set(read_pins())
    venv.EnvBuilder(with_pip=False, symlinks=True, clear=True).create(dest)
    site = dest / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    keep = [(d, b) for d, b in _site_dists()
            if canon(d.metadata["Name"]) in GPU_MACHINE_PACKAGES - carried]
    linked = _link(keep, site)
    names = {x.split("==")[0] for x in linked}
    missing = [n for n in ("torch", "pytest", "pip") if n not in names]
    if missing:
        raise SystemExit(f"bare-python: this Python lacks {', '.join(missing)}")
    return {"python": str(dest / "bin" / "python"), "linked": linked}


def link_carried(dest: Path) -> dict[str, Any]:
    """Link this Python's installed copies of the pinned distributions into ``dest``.

    A pinned name this Python lacks is an error; another version than the pin is a warning (the
    dry run then tests that version: the GPU machine gets the pinned wheels)."""
    pins = read_pins()
    found = {canon(d.metadata["Name"]): (d, b) for d, b in _site_dists()}
    missing = [f"{n}=={v}" for n, v in pins.items() if n not in found]
    if missing:
        raise SystemExit("link-carried: this Python lacks " + ", ".join(missing))
    warnings = [f"pinned {n}=={v}, this Python has {found[n][0].version}"
                for n, v in pins.items() if found[n][0].version != v]
    return {"source": "linked from this Python (no wheels downloaded)",
            "wheels": _link([found[n] for n in pins], dest), "problems": [], "warnings": warnings}


# -- torch API audit ---------------------------------------------------------------------------------
def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> dotted torch path, from every import in the file (any scope) and from plain
    assignments of a torch path (``aten = torch.ops.aten``)."""
    out: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "torch" or a.name.startswith("torch."):
                    out[a.asname or a.name.split(".")[0]] = a.name if a.asname else "torch"
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
                node.module == "torch" or node.module.startswith("torch.")):
            for a in node.names:
                if a.name != "*":
                    out[a.asname or a.name] = f"{node.module}.{a.name}"
    assigns = [n for n in ast.walk(tree) if isinstance(n, ast.Assign) and len(n.targets) == 1
               and isinstance(n.targets[0], ast.Name)]
    for _ in range(3):  # chains of assignments
        for node in assigns:
            dotted = _dotted(node.value)
            head, _, rest = (dotted or "").partition(".")
            if head in out and node.targets[0].id not in out:
                out[node.targets[0].id] = f"{out[head]}.{rest}" if rest else out[head]
    return out


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def _resolve(path: str) -> str | None:
    """None when ``path`` (``torch.a.b``) resolves here, else what is missing."""
    parts = path.split(".")
    obj: Any = None
    for i in range(len(parts), 0, -1):  # the longest importable module prefix
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        except Exception as exc:  # noqa: BLE001 - a module that fails to import is a finding
            return f"import {'.'.join(parts[:i])} raised {type(exc).__name__}"
        rest = parts[i:]
        break
    else:
        return f"no module {parts[0]}"
    for j, name in enumerate(rest):
        try:
            obj = getattr(obj, name)
        except Exception:  # noqa: BLE001 - AttributeError, or a lazy op lookup failing
            return f"{'.'.join(parts[:len(parts) - len(rest) + j])} has no {name}"
    return None


def _guarded_lines(tree: ast.AST) -> set[int]:
    """Lines inside a ``try`` that catches AttributeError/ImportError/Exception (and the
    ``except ImportError/AttributeError`` fallbacks themselves), or inside an ``if hasattr(...)``
    / ``getattr`` test: a missing name there is handled by the code."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        body: list[ast.stmt] = []
        if isinstance(node, ast.Try):
            caught = " ".join(ast.unparse(h.type) for h in node.handlers if h.type is not None)
            if not node.handlers or any(h.type is None for h in node.handlers) or re.search(
                    r"AttributeError|ImportError|Exception|RuntimeError", caught):
                body = list(node.body)
                # the fallback in ``except ImportError:`` is the path of another torch version
                for h in node.handlers:
                    if h.type is not None and re.search(r"AttributeError|ImportError",
                                                        ast.unparse(h.type)):
                        body.extend(h.body)
        elif isinstance(node, ast.If) and re.search(r"\b(hasattr|getattr)\(", ast.unparse(node.test)):
            body = node.body
        for stmt in body:
            lines.update(range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1))
    return lines


def audit(source_root: Path) -> dict[str, Any]:
    """Every torch name torchmagic's source uses, resolved against this torch (see the docstring)."""
    import torch

    missing: list[dict[str, Any]] = []
    seen: dict[str, str | None] = {}
    checked = 0
    for path in sorted(source_root.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        aliases = _aliases(tree)
        guarded = _guarded_lines(tree)
        uses: list[tuple[int, str]] = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for full in set(_aliases(ast.Module([node], [])).values()):
                    uses.append((node.lineno, full))
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                dotted = _dotted(node)
                if dotted is None:
                    continue
                head, _, rest = dotted.partition(".")
                if head in aliases:
                    uses.append((node.lineno, f"{aliases[head]}.{rest}" if rest else aliases[head]))
        for line, full in uses:
            checked += 1
            if full not in seen:
                seen[full] = _resolve(full)
            if seen[full] is not None:
                missing.append({"file": str(path.relative_to(source_root.parent)), "line": line,
                                "name": full, "why": seen[full], "guarded": line in guarded})
    # Attribute chains are walked whole and as every prefix; report each place once, longest name.
    best: dict[tuple[str, int, str], dict[str, Any]] = {}
    for m in missing:
        key = (m["file"], m["line"], m["why"])
        if key not in best or len(m["name"]) > len(best[key]["name"]):
            best[key] = m
    return {"torch": torch.__version__, "names_checked": len(seen), "uses_checked": checked,
            "missing": sorted(best.values(), key=lambda m: (m["file"], m["line"]))}


# -- the tour -------------------------------------------------------------------------------------------
def _magic_names() -> set[str]:
    from torchmagic.magics import magic_modules

    names: set[str] = set()
    for mod in magic_modules():
        module = importlib.import_module(f"torchmagic.magics.{mod}")
        for cls in getattr(module, "MAGICS", ()):
            for table in getattr(cls, "magics", {}).values():
                names.update(table)
    return names


def filter_tour(text: str, cuda: bool, magics: set[str]) -> tuple[str, list[str]]:
    """Drop the cells whose ``# %%`` marker line says they cannot run here; return the kept text
    and one note per dropped cell (its marker and first code line)."""
    out: list[str] = []
    notes: list[str] = []
    block: list[str] = []
    marker = ""

    def flush() -> None:
        words = marker.split()[2:]
        why = None
        if "cuda" in words and not cuda:
            why = "needs CUDA"
        if "if-magic" in words:
            idx = words.index("if-magic")
            name = words[idx + 1] if idx + 1 < len(words) else ""
            if name not in magics:
                why = f"needs %{name}, which this torchmagic does not have"
        if why is None:
            out.extend(block)
        else:
            first = next((ln for ln in block[1:] if ln.strip() and not ln.startswith("#")), "")
            notes.append(f"skipped ({why}): {first.strip()}")

    for line in text.splitlines():
        if line.startswith("# %%"):
            flush()
            block, marker = [line], line
        else:
            block.append(line)
    flush()
    return "\n".join(out) + "\n", notes


def run_tour(path: Path) -> int:
    import torch

    sys.path.insert(0, str(ROOT / "examples"))
    import tour  # examples/tour.py: the runner of the terminal tour

    kept, notes = filter_tour(path.read_text(), torch.cuda.is_available(), _magic_names())
    print(f"[gpu tour] {path.name}: torch {torch.__version__}, "
          f"CUDA {'yes: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no'}")
    for note in notes:
        print(f"[gpu tour] {note}")
    with tempfile.TemporaryDirectory() as tmp:
        filtered = Path(tmp) / path.name
        filtered.write_text(kept)
        return tour.main(filtered)


# -- the figures ----------------------------------------------------------------------------------------
def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, TypeError):
        return text


def read_junit(path: Path) -> dict[str, Any]:
    """Counts, failures, skip reasons and recorded figures from pytest's JUnit XML."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures: list[dict[str, str]] = []
    skipped: dict[str, int] = {}
    figures: dict[str, dict[str, Any]] = {}
    cuda_tests: dict[str, str] = {}
    seconds = 0.0
    for suite in suites:
        seconds += float(suite.get("time", 0) or 0)
        for case in suite.iter("testcase"):
            test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
            counts["tests"] += 1
            outcome = "passed"
            for tag, kind in (("failure", "failed"), ("error", "errors"), ("skipped", "skipped")):
                el = case.find(tag)
                if el is None:
                    continue
                outcome = kind
                msg = " ".join((el.get("message") or el.text or "").split())[:300]
                if kind == "skipped":
                    reason = re.sub(r"^.*?Skipped: ", "", msg) or "(no reason)"
                    skipped[reason] = skipped.get(reason, 0) + 1
                else:
                    failures.append({"test": test_id, "kind": kind, "message": msg})
                break
            counts[outcome] += 1
            props = {p.get("name", "")[len("figure:"):]: _value(p.get("value", ""))
                     for p in case.iter("property") if p.get("name", "").startswith("figure:")}
            if props:
                figures[test_id] = props
            if "test_cuda_" in test_id or props:
                cuda_tests[test_id] = outcome
    return {"counts": counts, "seconds": round(seconds, 1), "failures": failures,
            "skip_reasons": dict(sorted(skipped.items(), key=lambda kv: -kv[1])),
            "cuda_tests": cuda_tests, "figures": figures}


def machine_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "host": platform.node(), "cpus": os.cpu_count(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_count=torch.cuda.device_count(),
                    capability=f"{props.major}.{props.minor}", gpu_memory=int(props.total_memory),
                    cudnn=torch.backends.cudnn.version())
    return info


def report(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"kit": "scripts/gpu_check.sh", "mode": args.mode,
                           "written": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                           "machine": machine_info()}
    out["phases_seconds"] = {k: float(v) for k, v in (p.split("=", 1) for p in args.phase)}
    out["exit_codes"] = {k: int(v) for k, v in (p.split("=", 1) for p in args.rc)}
    if args.junit and Path(args.junit).exists():
        out["tests"] = read_junit(Path(args.junit))
    else:
        out["tests"] = {"error": f"no JUnit XML at {args.junit}"}
    if args.tour and Path(args.tour).exists():
        text = Path(args.tour).read_text(errors="replace")
        out["tour"] = {"ok": "[tour] every cell ran as expected" in text,
                       "cells": len(re.findall(r"^In \[\d+\]:", text, re.M)),
                       "skipped": re.findall(r"^\[gpu tour\] skipped .*$", text, re.M),
                       "unexpected": re.findall(r"^\[tour\] (?:unexpected|cell).*$", text, re.M)}
    if args.plan and Path(args.plan).exists():
        out["plan"] = json.loads(Path(args.plan).read_text())
    if args.audit_source:
        out["audit"] = audit(Path(args.audit_source).resolve())
    return out


def print_summary(rep: dict[str, Any]) -> None:
    """A few lines for the log: where it ran, the counts, each recorded figure."""
    m = rep["machine"]
    print(f"[gpu_check] machine: {m.get('gpu', 'no GPU')}, torch {m['torch']}, "
          f"Python {m['python']}")
    tests = rep.get("tests", {})
    if "counts" in tests:
        c = tests["counts"]
        print(f"[gpu_check] tests: {c['passed']} passed, {c['failed']} failed, {c['errors']} "
              f"errors, {c['skipped']} skipped ({tests['seconds']} s)")
        for f in tests["failures"][:30]:
            print(f"[gpu_check]   {f['kind'].upper()} {f['test']}: {f['message'][:160]}")
        for test, figs in tests["figures"].items():
            for k, v in figs.items():
                print(f"[gpu_check]   figure {test.rsplit('::', 1)[-1]}: {k} = {v}")
    if "tour" in rep:
        t = rep["tour"]
        print(f"[gpu_check] tour: {'ok' if t['ok'] else 'FAILED'} ({t['cells']} cells, "
              f"{len(t['skipped'])} skipped)")
    for miss in rep.get("audit", {}).get("missing", []):
        print(f"[gpu_check] torch API missing: {miss['file']}:{miss['line']} {miss['name']} "
              f"({miss['why']}{', guarded' if miss['guarded'] else ''})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_kit.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("plan")
    sp.add_argument("--wheels", type=Path, required=True)
    sp.add_argument("--machine", action="store_true")
    sp.add_argument("--json", type=Path)
    sb = sub.add_parser("bare-python")
    sb.add_argument("dest", type=Path)
    sl = sub.add_parser("link-carried")
    sl.add_argument("dest", type=Path)
    sl.add_argument("--json", type=Path)
    sa = sub.add_parser("audit")
    sa.add_argument("--json", type=Path)
    sa.add_argument("--source", type=Path, default=ROOT / "torchmagic")
    st = sub.add_parser("tour")
    st.add_argument("file", type=Path)
    sr = sub.add_parser("report")
    sr.add_argument("--out", type=Path, required=True)
    sr.add_argument("--mode", default="gpu")
    sr.add_argument("--junit")
    sr.add_argument("--tour")
    sr.add_argument("--plan")
    sr.add_argument("--audit-source", help="also audit the torch names used under this folder")
    sr.add_argument("--phase", action="append", default=[], metavar="NAME=SECONDS")
    sr.add_argument("--rc", action="append", default=[], metavar="NAME=CODE")
    args = p.parse_args(argv)

    if args.cmd == "plan":
        res = check_plan(args.wheels, machine=args.machine)
        if args.json:
            args.json.write_text(json.dumps(res, indent=1))
        print(json.dumps(res, indent=1))
        return 1 if res["problems"] else 0
    if args.cmd == "bare-python":
        print(json.dumps(bare_python(args.dest), indent=1))
        return 0
    if args.cmd == "link-carried":
        res = link_carried(args.dest)
        if args.json:
            args.json.write_text(json.dumps(res, indent=1))
        print(json.dumps(res, indent=1))
        return 0
    if args.cmd == "audit":
        res = audit(args.source)
        if args.json:
            args.json.write_text(json.dumps(res, indent=1))
        for m in res["missing"]:
            print(f"{m['file']}:{m['line']}: {m['name']}: {m['why']}"
                  f"{' (guarded)' if m['guarded'] else ''}")
        print(f"audit: {res['names_checked']} torch names in {res['uses_checked']} places checked "
              f"against torch {res['torch']}: {len(res['missing'])} missing")
        return 0
    if args.cmd == "tour":
        return run_tour(args.file)
    rep = report(args)
    args.out.write_text(json.dumps(rep, indent=1, default=str))
    print_summary(rep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
