"""Why a ``%%meta_shape`` run failed, in words; and the folded tree of module calls."""

from __future__ import annotations

import re
from typing import Any

from torchmagic.core.meta_report import CallRow
from torchmagic.core.tracing import ModuleCall

# ---------------------------------------------------------------------------------------------
# explaining failures
# ---------------------------------------------------------------------------------------------
_DATA_DEP_OPS = {
    "nonzero": "nonzero / boolean-mask indexing (x[mask])",
    "argwhere": "argwhere",
    "masked_select": "masked_select / boolean-mask indexing (x[mask])",
    "_unique": "unique", "_unique2": "unique", "unique_dim": "unique",
    "unique_consecutive": "unique_consecutive", "bincount": "bincount",
    "repeat_interleave": "repeat_interleave with tensor repeats", "histc": "histc",
    "_local_scalar_dense": ".item()",
}
_NO_KERNEL = re.compile(r"(?:aten|[\w.]+)::(\w+)[\w.]*: attempted to run this operator with Meta")
_NO_KERNEL2 = re.compile(r"Could not run '([\w:.]+)' with arguments from the '(?:Meta|Fake)\w*'")
_NO_FAKE_IMPL = re.compile(r"no fake impl registered for <CustomOpDef\(([\w:.]+)\)>")
_MATMUL = re.compile(r"a and b must have same reduction dim, but got \[(\d+), (\d+)\] X "
                     r"\[(\d+), (\d+)\]")


def _torch_message(exc: BaseException) -> str:
    msg = " ".join(str(exc).strip().split("\n")[0].split()) or type(exc).__name__
    m = _MATMUL.search(msg)
    if m:  # the meta kernel's wording -> the one users know from CPU/CUDA runs
        a, b, c, d = m.groups()
        msg = f"mat1 and mat2 shapes cannot be multiplied ({a}x{b} and {c}x{d})"
    return msg


def _classify(exc: BaseException, fake: bool, flag: str) -> tuple[str, str | None]:
    """(kind, explanation) for an exception; explanation None = use torch's message."""
    text = str(exc)
    name = type(exc).__name__
    values = "meta tensors have shapes and dtypes but no values"
    if name == "GuardOnDataDependentSymNode" or "Could not guard on data-dependent" in text:
        m = re.search(r"data-dependent expression (.+?) \(unhinted", text)
        expr = m.group(1) if m else "a symbolic value"
        return "symbolic-branch", (
            f"branches on {expr}, a value only known when the code runs on real data (it comes "
            "from .item(), nonzero, a boolean mask or unique); fake tensors carry such values as "
            "symbols (u0, u1, ...) but Python control flow needs the real value; branch on shapes "
            "instead, or state the assumption with torch._check(...)")
    if "cannot be called on meta tensors" in text:
        return "data-dependent", (
            "needs the value of a tensor (.item(), bool(), int()/float(), or an if/while on a "
            f"tensor), and {values}; {flag} continues with a symbolic value (u0)")
    if "'lengths' argument should be a 1D CPU int64 tensor" in text:
        return "data-dependent", (
            "packs sequences by the values of their lengths (pack_padded_sequence / "
            f"pack_sequence), and {values}; pack real tensors first and use the PackedSequence "
            "in the code (its batch sizes are kept as they are)")
    if "Cannot copy out of meta tensor" in text:
        return "data-dependent", (
            "needs a tensor's values (.tolist(), .cpu(), .numpy() or printing values), and "
            f"{values}; {flag} continues with symbolic values")
    if "can't convert meta device type tensor to numpy" in text:
        return "data-dependent", (
            "needs a numpy array made from a tensor (x.numpy(), np.asarray(x), or arithmetic "
            f"mixing a numpy array with a tensor), and {values}; keep it in torch, or bring numpy "
            "data in with torch.as_tensor(arr)")
    if "register_meta function for torch.nonzero()" in text:
        return "data-dependent", (
            "uses nonzero / boolean-mask indexing (x[mask]): the output size depends on the "
            f"values, and {values}; {flag} continues with a symbolic size (u0, ...)")
    m = _NO_FAKE_IMPL.search(text)
    if m:
        return "no-meta-kernel", (
            f"custom op {m.group(1)} has no fake/meta implementation, so its output shape cannot "
            f"be computed without running it; add one with @{m.group(1).split('::')[-1]}"
            ".register_fake")
    m = _NO_KERNEL.search(text) or _NO_KERNEL2.search(text)
    if m:
        op = m.group(1).split("::")[-1]
        if op in _DATA_DEP_OPS:
            return "data-dependent", (
                f"uses {_DATA_DEP_OPS[op]}: the output size depends on the values, and {values}; "
                f"{flag} continues with a symbolic size (u0, ...)")
        return "no-meta-kernel", (
            f"op {m.group(1) if '::' in m.group(1) else 'aten::' + op} has no meta/fake "
            "implementation (a CUDA-only or custom op), so its output shape cannot be computed "
            "without running it; register one with torch.library.register_fake")
    if "Torch not compiled with CUDA" in text or "No CUDA GPUs are available" in text or \
            "not linked with support for cuda" in text:
        return "cuda", (
            "calls CUDA itself (a torch.cuda.* function or a CUDA-only op), which needs a CUDA "
            "device; tensor code runs on meta anyway, so drop the call or guard it with "
            "torch.cuda.is_available()")
    if "assignment destination is read-only" in text:
        return "numpy-write", (
            "writes into a numpy array from the namespace, which meta_shape passes read-only "
            "(it never changes your objects); copy it in the cell first (arr = arr.copy())")
    if "DataDependentOutputException" in name or "DynamicOutputShapeException" in name:
        return "data-dependent", (
            f"uses an op whose output size depends on values ({text.split(chr(10))[0][:60]}), "
            f"and {values}; {flag} continues with symbolic sizes")
    if isinstance(exc, RuntimeError) and ("shape" in text or "size" in text or "dimension" in text
                                          or "mat1" in text or "reduction dim" in text):
        return "shape", None
    return "error", None


def _line_text(filename: str, line: int | None) -> str:
    import linecache

    if line is None:
        return ""
    text = linecache.getline(filename, line).strip()
    return text if len(text) <= 60 else text[:59] + "…"


# ---------------------------------------------------------------------------------------------
# folding the call tree
# ---------------------------------------------------------------------------------------------
_INDEXED = re.compile(r"^(.*?)(\d+)$")


def _next_index(prev: str, path: str) -> bool:
    """True when ``path`` is the entry after ``prev`` in a ModuleList/Sequential (``x.3`` after
    ``x.2``): only such calls are folded, so no differently named module is hidden."""
    if prev == path:  # the same module called again (a loop)
        return True
    a, b = _INDEXED.match(prev), _INDEXED.match(path)
    return bool(a and b and a.group(1) == b.group(1) and a.group(1).endswith((".", "["))
                and int(b.group(2)) == int(a.group(2)) + 1)


def _fold_calls(calls: list[ModuleCall], fold: bool,
                lines: dict[int, int | None]) -> list[CallRow]:
    """Every call as a row, in call order, identical consecutive ModuleList/Sequential entries
    folded into one row (``repeat``) with the children of the first."""
    children: dict[int | None, list[ModuleCall]] = {}
    for c in calls:
        children.setdefault(c.parent, []).append(c)
    sig_cache: dict[int, Any] = {}

    def sig(c: ModuleCall) -> Any:
        if c.index not in sig_cache:
            sig_cache[c.index] = (c.cls, repr(c.input_shapes), repr(c.output_shapes),
                                  tuple(sig(k) for k in children.get(c.index, [])))
        return sig_cache[c.index]

    rows: list[CallRow] = []

    def emit(group: list[ModuleCall]) -> None:
        i = 0
        while i < len(group):
            c = group[i]
            j = i + 1
            if fold and c.output_shapes is not None:
                while j < len(group) and group[j].output_shapes is not None and \
                        _next_index(group[j - 1].path, group[j].path) and sig(group[j]) == sig(c):
                    j += 1
            n = j - i
            rows.append(CallRow(path=c.path, cls=c.cls, depth=c.depth, line=lines.get(c.index),
                                inputs=list(c.input_shapes),
                                outputs=None if c.output_shapes is None else list(c.output_shapes),
                                repeat=n, last_path=group[j - 1].path if n > 1 else ""))
            emit(children.get(c.index, []))
            i = j

    emit(children.get(None, []))
    return rows


__all__ = ["classify", "fold_calls", "line_text", "torch_message"]
classify, fold_calls, line_text, torch_message = _classify, _fold_calls, _line_text, _torch_message
