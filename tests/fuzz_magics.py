"""The fuzz run of tests/test_fuzz.py, in a child process (a segfault is then a failed test, not a
dead test run). ``python tests/fuzz_magics.py SEED SECONDS`` prints one JSON line.

Every torchmagic magic gets malformed lines (its own options with bad values, shapes, names of
unusual tensors and models, junk) and cells, chosen by a seeded RNG; the namespace holds tensors of
every layout and models that are hard to copy. After each call: the outcome must be a result, a
one-line ``UsageError``, or the user's own exception from a cell (no torchmagic frame left in its
traceback); no call may run past its time limit; global torch state must be unchanged; every few
calls, and at the end, the snapshot helper must find no change in the models, tensors and objects
of the namespace.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
import traceback
import warnings
from typing import Any

warnings.simplefilter("ignore")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from statecheck import Snapshot  # noqa: E402

from torchmagic.core.state import GlobalState  # noqa: E402

CALL_LIMIT_S = 20  # one call running longer is a hang


class Hang(BaseException):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise Hang


# -- the namespace ------------------------------------------------------------------------------------
def namespace(tmp: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(objects the magics may see, the subset the snapshot checks)."""
    from torch.testing._internal.two_tensor import TwoTensor

    from torchmagic.models import GPT, GPTConfig, SmallCNN

    torch.manual_seed(0)
    cnn = SmallCNN().eval()
    qnet = nn.Linear(4, 4)
    qnet.register_buffer("q", torch.quantize_per_tensor(torch.zeros(4), 0.1, 0, torch.quint8))
    qnet.register_buffer("sp", torch.eye(3).to_sparse())
    seen: list = []
    hooked = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    hooked[0].register_forward_hook(lambda m, a, o: seen.append(o))
    locked = nn.Linear(4, 4)
    locked.lock = threading.Lock()
    genmod = nn.Linear(4, 4)
    genmod.src = (i for i in range(3))
    lazy = nn.LazyLinear(3)
    with torch.device("meta"):
        meta_gpt = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, d_model=16))
    gpt = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, d_model=16))

    class Raises(nn.Module):
        def forward(self, x):  # noqa: ANN001, ANN201
            raise ValueError("the forward refuses")

    class ReturnsDict(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):  # noqa: ANN001, ANN201
            return {"a": self.lin(x), "b": None, "c": [x, 3]}

    adam = torch.optim.Adam(hooked.parameters())
    hooked(torch.randn(2, 4)).sum().backward()
    adam.step()
    ckpt = os.path.join(tmp, "good.pt")
    torch.save(cnn.state_dict(), ckpt)
    with open(os.path.join(tmp, "text.pt"), "w") as f:
        f.write("not a checkpoint")
    tensors = {
        "x": torch.randn(2, 4), "img": torch.randn(1, 3, 32, 32), "ids": torch.randint(0, 64, (2, 8)),
        "big": torch.zeros(1).expand(10**10), "nanx": torch.tensor([float("nan"), float("inf"), 1.0]),
        "q": torch.quantize_per_tensor(torch.zeros(8), 0.1, 0, torch.quint8),
        "sp": torch.eye(4).to_sparse(), "csr": torch.eye(4).to_sparse_csr(),
        "nt": torch.nested.nested_tensor([torch.zeros(2, 3), torch.zeros(4, 3)]),
        "mk": torch.zeros(2, 3).to_mkldnn(), "mt": torch.zeros(3, 3, device="meta"),
        "fn": torch._to_functional_tensor(torch.ones(3)), "two": TwoTensor(torch.zeros(3),
                                                                           torch.ones(3)),
        "scalar": torch.tensor(3.0), "empty": torch.zeros(0, 5), "f8": torch.zeros(4).to(
            torch.float8_e4m3fn), "cplx": torch.zeros(3, dtype=torch.complex64),
        "grad_x": torch.randn(3, requires_grad=True) * 2,
    }
    models = {"cnn": cnn, "qnet": qnet, "hooked": hooked, "locked": locked, "genmod": genmod,
              "lazy": lazy, "meta_gpt": meta_gpt, "gpt": gpt, "raises": Raises(),
              "returns_dict": ReturnsDict()}
    others = {"adam": adam, "seen": seen, "cfg": {"lr": 0.1, "sizes": [1, 2]}, "n": 3,
              "s": "text", "none": None, "ckpt": ckpt, "tmp": tmp}
    ns = {"torch": torch, "nn": nn, **tensors, **models, **others,
          "fz": nn.Sequential(nn.Linear(2, 2)), "ck": SmallCNN()}  # fz, ck: changed by design
    # what the snapshot checks: not lazy (a real forward initialises it), not genmod (advanced
    # by a cell run for real), not `seen` (the hooked model's hook appends to it in real runs)
    checked = {**{k: v for k, v in models.items() if k not in ("lazy", "genmod")},
               **{k: v for k, v in tensors.items() if k not in ("fn", "two", "mk")},
               "adam": adam, "cfg": ns["cfg"]}
    return ns, checked


# -- lines ----------------------------------------------------------------------------------------------
VALUES = ["-1", "0", "1", "2", "3", "inf", "-inf", "nan", "1e300", "1e-9", "abc", "''", '""',
          "--", "None", "10**10", "2.5", "-0", "x", "cnn", "(1,2)", "[", "]", "{}", "ü", "$n",
          "{n}", "'quoted value'", "x" * 300]
SHAPES = ["(1,3,32,32)", "(2,4)", "(1,3,32)", "(0,)", "(-1,2)", "(1e9,3)", "(2.5,3)", "((",
          "(1,", "[(2,8),(2,8)]", "(2,8)", "()", "(1,1,1,1,1,1,1,1)", "torch.Size([2,4])",
          "x.shape", "(64,)", "(1,64)", "dict(x=x)", "(x, x)", "x ids"]
JUNK = ["%", "'", '"', "\\", "(", ")", "[", "]", "{", "}", ",", ";", "#", "--", "-", "-o",
        "-o 1bad", "--help", "-h", "lambda: 0", "__import__('os')", "x.", ".x", "x[", "!ls",
        "?", "%%", "ü√", "\t", "None", "0", "-5", "--depth -5", "--first 0", "--rows -1"]
SAFE_CELLS = ["y = cnn(img)", "y = hooked(x)", "y = qnet(x)", "z = x + 1", "x.sum()",
              "y = raises(x)", "y = returns_dict(x)", "1 / 0", "undefined_name",
              "y = cnn(torch.randn(1, 3, 32))", "for i in range(2):\n    y = hooked(x)",
              "y = gpt(ids)", "y = meta_gpt(ids)", "torch.log(-x).sum()", "", "# only a comment",
              "x = (", "y = lazy(x)", "print(len(seen))", "cfg['lr'] = 5", "seen.append(1)",
              "hooked.eval()", "adam.step()", "y = torch.where(nanx < 1, torch.cos(nanx), 0)"]
STATE_CELLS = ["torch.set_num_threads(1)", "torch.use_deterministic_algorithms(True)",
               "torch.set_float32_matmul_precision('medium')",
               "torch.backends.cudnn.benchmark = True", "torch.set_default_dtype(torch.float64)",
               "torch.set_grad_enabled(False)", "torch.manual_seed(3)",
               "torch.set_default_device('meta')"]
#: cells that change the namespace's objects for real, by design (%%amp, %%gpumem...): only where
#: the magic runs on twins or a copy
MUTATING = {"cfg['lr'] = 5", "seen.append(1)", "hooked.eval()", "adam.step()"}
TWINNED = {"meta_shape"}  # runs the cell on twins: any cell, nothing may change
RESTORED = {"meta_shape", "benchmark"}  # global state the cell changes is put back
#: cells of the other cell magics run for real on the real objects (by design): they may consume
#: the RNG and run hooks, so the RNG and the hook's list are not checked after them
CODE_LINE_MAGICS = {"benchmark"}  # the line form runs a statement: its own errors are the user's


#: (magic, name) pairs left out of the fuzz (none: nested, quantized and lazy inputs of
#: %summary, %params and %device are handled since issue 12)
ELSEWHERE: set[tuple[str, str]] = set()


def options(fn: Any) -> list[str]:
    parser = getattr(fn, "parser", None)
    if parser is None:
        return []
    return [o for a in parser._actions for o in a.option_strings if o not in ("-h", "--help")]


def line_for(rng: random.Random, name: str, fn: Any, names: list[str], tmp: str) -> str:
    opts = options(fn)
    parts: list[str] = []
    for _ in range(rng.randint(0, 4)):
        r = rng.random()
        if r < 0.3:
            parts.append(rng.choice(names))
        elif r < 0.45:
            parts.append(rng.choice(SHAPES))
        elif r < 0.75 and opts:
            parts.append(rng.choice(opts))
            if rng.random() < 0.8:
                parts.append(rng.choice(VALUES))
        elif r < 0.85:
            parts.append(rng.choice(JUNK))
        else:
            parts.append(os.path.join(tmp, rng.choice(["good.pt", "text.pt", "new.pt", "dir/x.pt",
                                                       "fifo", "link.pt"])))
    if name == "checkpoint":
        parts.insert(0, rng.choice(["save", "load", "save", "load", "copy", ""]))
        if rng.random() < 0.7:
            parts.insert(1, "ck" if rng.random() < 0.7 else rng.choice(names))
    if name in ("freeze", "unfreeze"):  # they change requires_grad by design: only fz's
        parts = ["fz" if p in names and p != "fz" else p for p in parts]
        if rng.random() < 0.5:
            parts.insert(0, "fz")
    if name == "benchmark":
        parts = [p for p in parts if p not in ("-n",)] + ["-n", str(rng.randint(1, 3))]
    parts = [p for p in parts if (name, p) not in ELSEWHERE]
    return " ".join(parts)


def run(seed: int, seconds: float) -> dict[str, Any]:
    from IPython.core.error import UsageError
    from IPython.testing.globalipapp import start_ipython
    from IPython.utils.capture import capture_output

    rng = random.Random(seed)
    tmp = tempfile.mkdtemp(prefix="tm-fuzz-")
    os.chdir(tmp)  # relative paths the fuzz writes (checkpoints, traces) land here, nowhere else
    os.mkfifo(os.path.join(tmp, "fifo"))
    os.symlink(os.path.join(tmp, "good.pt"), os.path.join(tmp, "link.pt"))
    ip = start_ipython()
    ip.run_line_magic("load_ext", "torchmagic")
    ns, checked = namespace(tmp)
    ip.user_ns.update(ns)
    names = [n for n in ns if n not in ("torch", "nn")]
    table = ip.magics_manager.magics
    ours = [(kind, name, fn) for kind in ("line", "cell") for name, fn in table[kind].items()
            if type(getattr(fn, "__self__", None)).__module__.startswith("torchmagic.")]
    snap = Snapshot.take(**checked)
    state = GlobalState.capture()
    ids = {k: id(v) for k, v in ns.items()}
    signal.signal(signal.SIGALRM, _alarm)
    failures: list[str] = []
    calls = 0
    outcomes = {"ok": 0, "usage": 0, "user": 0}
    deadline = time.monotonic() + seconds
    recent: list[str] = []
    while time.monotonic() < deadline and len(failures) < 10:
        kind, name, fn = rng.choice(ours)
        line = line_for(rng, name, fn, names, tmp)
        cell = None
        if kind == "cell":
            pool = SAFE_CELLS + (STATE_CELLS if name in RESTORED else [])
            if name not in TWINNED:
                pool = [c for c in pool if c not in MUTATING]
            cell = rng.choice(pool)
        what = f"%{'%' if cell is not None else ''}{name} {line}" + (
            f"  <<cell: {cell!r}>>" if cell is not None else "")
        recent = (recent + [what])[-8:]
        calls += 1
        signal.alarm(CALL_LIMIT_S)
        try:
            with capture_output():
                if cell is None:
                    ip.run_line_magic(name, line)
                else:
                    ip.run_cell_magic(name, line, cell)
            outcomes["ok"] += 1
        except UsageError as exc:
            outcomes["usage"] += 1
            if "\n" in str(exc) or exc.__context__ is not None or exc.__cause__ is not None:
                failures.append(f"{what}: UsageError not one clean line: {exc!r}"[:400])
        except Hang:
            failures.append(f"{what}: still running after {CALL_LIMIT_S} s")
        except BaseException as exc:  # noqa: BLE001 - classified below
            frames = traceback.extract_tb(exc.__traceback__)
            own = [f for f in frames if "/torchmagic/" in f.filename.replace("\\", "/")]
            runs_code = cell is not None or name in CODE_LINE_MAGICS
            if own or not runs_code or isinstance(exc, KeyboardInterrupt):
                failures.append(f"{what}: {type(exc).__name__}: {exc}"[:300] + " at " + "; ".join(
                    f"{os.path.basename(f.filename)}:{f.lineno}" for f in frames[-4:]))
            else:
                outcomes["user"] += 1
        finally:
            signal.alarm(0)
        diff = state.diff(GlobalState.capture())
        if cell is not None and name not in RESTORED:
            diff = [d for d in diff if d != "rng"]  # the cell ran for real: it may draw numbers
        if diff:
            failures.append(f"{what}: global state changed: {diff}")
            state.restore()
        state = GlobalState.capture()
        stored = {t for a, t in zip(line.split(), line.split()[1:]) if a == "-o"}
        changed = [k for k, v in ids.items() if k not in ("fz", "ck") and k not in stored
                   and id(ip.user_ns.get(k)) != v]
        ip.user_ns.update({k: ns[k] for k in stored if k in ns})
        if changed:
            failures.append(f"{what}: names rebound or removed: {changed}")
            ip.user_ns.update({k: ns[k] for k in changed})
        if calls % 10 == 0:
            diffs = [d for d in snap.differences() if d != "global rng"]
            if diffs:
                failures.append(f"objects changed within: {recent}: {diffs[:5]}")
                snap = Snapshot.take(**checked)
    diffs = [d for d in snap.differences() if d != "global rng"]
    if diffs:
        failures.append(f"objects changed within: {recent}: {diffs[:5]}")
    return {"seed": seed, "calls": calls, "magics": sorted({n for _, n, _ in ours}),
            "outcomes": outcomes, "failures": failures}


if __name__ == "__main__":
    print(json.dumps(run(int(sys.argv[1]), float(sys.argv[2]))))
