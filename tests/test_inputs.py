"""Inputs as users bring them (issue 12, item 2): tokenizer outputs (any Mapping) as keyword
arguments, a dict passed as one positional argument, args=/kwargs=, shapes with keyword arguments,
batch_dim, legacy tensor types as dtypes, keyword inputs of submodules in the input column, the
free-memory check before inputs are made from shapes; in Python and through %summary."""

from __future__ import annotations

from collections import UserDict

import pytest
import torch
import torch.nn as nn
from conftest import requires_cuda, run
from IPython.core.error import UsageError
from statecheck import Snapshot

from torchmagic.core.errors import ForwardError, TorchMagicError
from torchmagic.core.inputs import InputMemoryError, parse_dtype, prepare_inputs
from torchmagic.core.summary import summary


class Batch(UserDict):
    """What a tokenizer returns: a ``UserDict`` (``BatchEncoding``), a Mapping but not a dict."""


class TextModel(nn.Module):
    """``forward(input_ids, attention_mask=None)``, as Hugging Face models take a tokenizer's
    output: ``model(**batch)``. The mask changes the output, so a dropped mask is visible."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        h = self.emb(input_ids)
        if attention_mask is not None:
            h = h * attention_mask[..., None]
        return self.head(h)


class FeatureEncoder(nn.Module):
    """``forward(self, features)`` reading ``features["input_ids"]`` (sentence-transformers)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 8)

    def forward(self, features: dict) -> dict:
        return {"sentence_embedding": self.emb(features["input_ids"]).mean(1)}


class Options(nn.Module):
    """Image model with keyword options (``return_dict``, an extra tensor ``z``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None,
                return_dict: bool = True) -> object:
        y = self.conv(x).mean((2, 3))
        if z is not None:
            y = y + z
        return {"y": y} if return_dict else (y,)


def ids_and_mask() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.arange(12).reshape(2, 6) % 50
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    return ids, mask


# -- Mappings are keyword arguments ----------------------------------------------------------
@pytest.mark.parametrize("kind", ["UserDict", "dict", "BatchEncoding"])
def test_any_mapping_is_keyword_arguments(kind: str) -> None:
    ids, mask = ids_and_mask()
    data = {"input_ids": ids, "attention_mask": mask}
    if kind == "UserDict":
        batch = Batch(data)
    elif kind == "BatchEncoding":
        transformers = pytest.importorskip("transformers")
        batch = transformers.BatchEncoding(data)
    else:
        batch = dict(data)
    m = TextModel()
    snap = Snapshot.take(m, ids=ids, mask=mask)
    s = summary(m, batch)
    snap.assert_unchanged()
    assert s.input_shapes == [(2, 6), (2, 6)] and s.input_kwargs == ["input_ids", "attention_mask"]
    assert s.output_shapes == [(2, 6, 3)]
    # the mask really reached the forward: the model's output as model(**batch) gives it
    # (a hook on the model itself would run on the isolated twin: watch with a global hook)
    seen: list[torch.Tensor] = []

    def record(mod: nn.Module, i: tuple, o: object) -> None:
        if isinstance(mod, nn.Linear) and mod.out_features == 3:
            seen.append(i[0])

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        summary(m, batch)
    finally:
        handle.remove()
    with torch.no_grad():
        want = m.emb(ids) * mask[..., None]
    assert torch.equal(seen[0], want)


def test_dict_as_one_positional_argument() -> None:
    feats = {"input_ids": torch.zeros(2, 5, dtype=torch.long)}
    enc = FeatureEncoder()
    for s in (summary(enc, (feats,)), summary(enc, args=(feats,)), summary(enc, args=[feats])):
        assert s.output_shapes == [(2, 8)] and s.input_shapes == [(2, 5)]
    # a bare mapping is keyword arguments: this forward has no input_ids argument
    with pytest.raises(ForwardError, match="unexpected keyword argument 'input_ids'") as info:
        summary(enc, feats)
    assert "\n" not in str(info.value)


def test_explicit_args_and_kwargs() -> None:
    ids, mask = ids_and_mask()
    m = TextModel()
    s = summary(m, args=(ids,), kwargs=Batch(attention_mask=mask))
    assert s.input_shapes == [(2, 6), (2, 6)] and s.input_kwargs == ["attention_mask"]
    s = summary(m, kwargs={"input_ids": ids})
    assert s.input_shapes == [(2, 6)] and s.ran_forward
    s = summary(m, ids, kwargs={"attention_mask": mask})
    assert s.input_shapes == [(2, 6), (2, 6)]


def test_shapes_with_keyword_arguments() -> None:
    m = Options()
    z = torch.ones(1, 4)
    s = summary(m, input_size=(1, 3, 8, 8), kwargs={"return_dict": False, "z": z})
    assert s.output_shapes == [(1, 4)] and s.output_type is None  # (y,): a plain tuple
    assert s.input_shapes == [(1, 3, 8, 8), (1, 4)] and s.input_kwargs == ["z"]
    s = summary(m, {"return_dict": True}, input_size=(1, 3, 8, 8))
    assert s.output_shapes == [(1, 4)]


def test_batch_dim_inserts_a_batch_of_one() -> None:
    m = Options()
    s = summary(m, input_size=(3, 8, 8), batch_dim=0)
    assert s.input_shapes == [(1, 3, 8, 8)] and s.output_shapes == [(1, 4)]
    p = prepare_inputs(nn.Linear(4, 2), input_size=[(5, 4), (4,)], batch_dim=-1)
    assert [tuple(t.shape) for t in p.args] == [(5, 4, 1), (4, 1)]
    with pytest.raises(TorchMagicError, match="batch_dim 4 is out of range for shape"):
        prepare_inputs(m, input_size=(3, 8, 8), batch_dim=4)
    with pytest.raises(TorchMagicError, match="batch_dim applies to input_size shapes"):
        prepare_inputs(m, torch.randn(1, 3, 8, 8), batch_dim=0)
    with pytest.raises(TorchMagicError, match="batch_dim must be a whole number"):
        prepare_inputs(m, input_size=(3, 8, 8), batch_dim="0")


@pytest.mark.parametrize("value, want", [
    (torch.FloatTensor, torch.float32), (torch.LongTensor, torch.int64),
    (torch.HalfTensor, torch.float16), (torch.cuda.FloatTensor, torch.float32),
    ("torch.LongTensor", torch.int64), ("torch.cuda.HalfTensor", torch.float16),
    ("BoolTensor", torch.bool), ("bf16", torch.bfloat16), (torch.long, torch.int64),
])
def test_legacy_tensor_types_as_dtypes(value: object, want: torch.dtype) -> None:
    assert parse_dtype(value) is want
    s = summary(nn.Identity(), input_size=(2, 3), dtypes=[value])
    assert s.input_dtypes == [str(want).replace("torch.", "")]


def test_bad_input_combinations_are_one_line() -> None:
    m = TextModel()
    ids, _ = ids_and_mask()
    cases = [
        (lambda: summary(m, ids, args=(ids,)), "either as values or as args=, not both"),
        (lambda: summary(m, args=(ids,), input_size=(2, 6)), "input_size shapes or as args"),
        (lambda: summary(m, ids, input_size=(2, 6)), "either as tensors or as input_size"),
        (lambda: summary(m, kwargs=[ids]), "kwargs must be a mapping"),
        (lambda: summary(m, {"input_ids": ids}, kwargs={"input_ids": ids}), "given twice"),
        (lambda: summary(m, {1: ids}), "need string names"),
        (lambda: summary(m, ids, dtypes="long"), "dtypes applies to input_size"),
    ]
    for call, words in cases:
        with pytest.raises(TorchMagicError, match=words) as info:
            call()
        assert "\n" not in str(info.value)


# -- keyword inputs of submodules --------------------------------------------------------------
class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                scale: float = 1.0) -> torch.Tensor:
        y = self.lin(x) * scale
        return y if mask is None else y * mask


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Block()

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.block(x, mask=mask, scale=2.0)


def test_submodule_keyword_inputs_in_the_input_column() -> None:
    m = Outer()
    x, mask = torch.randn(2, 3, 4), torch.ones(2, 3, 1)
    seen: dict[str, list] = {}  # what a with_kwargs pre-hook written here sees

    def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        seen["block"] = [tuple(a.shape) for a in args] + [
            tuple(v.shape) for v in kwargs.values() if isinstance(v, torch.Tensor)]

    handle = m.block.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        m(x, mask)
    handle.remove()
    snap = Snapshot.take(m)
    s = summary(m, x, {"mask": mask})
    snap.assert_unchanged()  # the kwargs hooks went on the twin, not on the user's modules
    row = next(r for r in s.rows if r.path == "block")
    assert row.input_shapes == seen["block"] == [(2, 3, 4), (2, 3, 1)]
    assert row.input_kwargs == ["mask"]
    assert "(2,3,4), (2,3,1)" in next(li for li in str(s).splitlines() if li.startswith("block "))


# -- free memory -----------------------------------------------------------------------------
def test_inputs_too_big_for_free_memory_are_refused_before_allocating() -> None:
    import psutil

    free = psutil.virtual_memory().available
    side = int((2 * free / 4) ** 0.5) + 1  # a float32 square needing twice the free RAM
    with pytest.raises(InputMemoryError) as info:
        summary(nn.Identity(), input_size=(side, side))
    err = info.value
    assert err.need == side * side * 4 and err.free > 0 and err.device == "cpu"
    assert "meta=True" in str(err) and "\n" not in str(err)
    # on meta nothing is allocated: the same shape works
    s = summary(nn.Identity(), input_size=(side, side), meta=True)
    assert s.output_shapes == [(side, side)]


def test_free_memory_check_uses_the_device_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    from torchmagic.core import inputs

    monkeypatch.setattr(inputs, "free_memory", lambda device: 100 << 20)
    with pytest.raises(InputMemoryError, match=r"need 128\.0 MiB but cpu has 100\.0 MiB free"):
        summary(nn.Identity(), input_size=(32, 1024, 1024))
    assert summary(nn.Identity(), input_size=(16, 1024, 1024)).error is None  # 64 MiB fits


# -- the magic ---------------------------------------------------------------------------------
def test_magic_mapping_tuple_keywords_and_args(ip) -> None:
    ids, mask = ids_and_mask()
    ip.user_ns.update(text=TextModel(), enc=FeatureEncoder(), opts=Options(),
                      batch=Batch(input_ids=ids, attention_mask=mask), ids=ids, mask=mask,
                      feats={"input_ids": ids}, z=torch.ones(1, 4))
    cases = {
        "text batch": ([(2, 6), (2, 6)], [(2, 6, 3)]),
        "text ids attention_mask=mask": ([(2, 6), (2, 6)], [(2, 6, 3)]),
        "text --kwargs batch": ([(2, 6), (2, 6)], [(2, 6, 3)]),
        "text attention_mask=mask --args (ids,)": ([(2, 6), (2, 6)], [(2, 6, 3)]),
        "enc (feats,)": ([(2, 6)], [(2, 8)]),
        "enc --args (feats,)": ([(2, 6)], [(2, 8)]),
        "opts (1,3,8,8) return_dict=False z=z": ([(1, 3, 8, 8), (1, 4)], [(1, 4)]),
        "opts (3,8,8) dict(return_dict=False) --batch-dim 0": ([(1, 3, 8, 8)], [(1, 4)]),
        "opts (1,3,8,8) --dtypes torch.FloatTensor": ([(1, 3, 8, 8)], [(1, 4)]),
    }
    for line, (inputs, outputs) in cases.items():
        run(ip, f"summary {line} -o r")
        r = ip.user_ns["r"]
        assert (r.input_shapes, r.output_shapes) == (inputs, outputs), line


@pytest.mark.parametrize("line, words, absent", [
    ("text (2,6) --batch-dim 9", "--batch-dim 9 is out of range", "batch_dim"),
    ("text ids --batch-dim 0", "--batch-dim applies to shape inputs", None),
    ("text ids --args (ids,)", "either as INPUTS or with --args", None),
    ("text --kwargs ids", "--kwargs must be a mapping", None),
    ("text ids mask=mask mask=mask", "keyword input 'mask' given twice", None),
    ("text (2,6) ids", "not a mix", None),
    ("text (100000,100000,100) --dtypes long", "--meta", "meta=True"),
    ("emb (2,5)", "--dtypes long", "dtypes='long'"),
    ("lin xs", "--args (xs,)", None),
])
def test_magic_messages_name_flags_not_python_arguments(ip, line: str, words: str,
                                                        absent: str | None) -> None:
    ids, mask = ids_and_mask()
    ip.user_ns.update(text=TextModel(), ids=ids, mask=mask, lin=nn.Linear(4, 2),
                      emb=nn.Sequential(nn.Embedding(100, 8)),
                      xs=[torch.randn(1, 4), torch.randn(1, 4)])
    with pytest.raises(UsageError) as info:
        run(ip, f"summary {line}")
    msg = str(info.value)
    assert words in msg and "\n" not in msg, msg
    if absent:
        assert absent not in msg, msg


@pytest.mark.cuda
@requires_cuda
def test_cuda_inputs_too_big_for_free_gpu_memory() -> None:
    free, _ = torch.cuda.mem_get_info()
    side = int((2 * free / 4) ** 0.5) + 1
    before = torch.cuda.memory_allocated()
    with pytest.raises(InputMemoryError) as info:
        summary(nn.Identity(), input_size=(side, side), device="cuda")
    assert info.value.device.startswith("cuda") and "meta=True" in str(info.value)
    assert torch.cuda.memory_allocated() == before  # nothing was made


@pytest.mark.parametrize("magic, tail", [
    ("summary", "-o r"), ("estimate", "--train --no-what-if -o r"),
    ("compile", "--backend eager -o r"),
])
def test_options_before_between_and_after_the_inputs(ip, magic: str, tail: str) -> None:
    """``%summary m --meta (2,4)`` reads as ``%summary m (2,4) --meta``: options may come
    anywhere among MODEL and INPUTS, for every magic that takes inputs."""
    ip.user_ns.update(lin=nn.Linear(4, 2))
    seen = []
    for line in (f"{magic} lin (3,4) {tail}", f"{magic} lin {tail} (3,4)",
                 f"{magic} {tail} lin (3,4)"):
        ip.user_ns.pop("r", None)
        run(ip, line)
        r = ip.user_ns["r"]
        if magic == "summary":
            seen.append(repr(r.input_shapes))
        elif magic == "estimate":
            seen.append(f"{r.settings['inputs']} {r.peak_bytes}")
        else:  # the compile report keeps no input shapes: the graph it traced
            seen.append(f"{r.graph_count} graph, {r.graphs[0].op_names} (3, 4)")
    assert len(set(seen)) == 1 and "3, 4" in seen[0], seen
    with pytest.raises(UsageError) as info:  # still refused: an unknown flag among the inputs
        run(ip, f"{magic} lin --bogus (3,4)")
    assert "unknown option --bogus" in str(info.value)
