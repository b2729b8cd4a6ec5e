"""%summary and torchmagic.summary: numbers against independent references (parameters(),
forward hooks written here), tied weights, inputs of every kind, the state invariants (Snapshot on
success, on a failing forward and on KeyboardInterrupt), bad input, and the three renderings."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from conftest import requires_cuda, run
from IPython.core.error import UsageError
from statecheck import Snapshot, assert_released

import torchmagic
from torchmagic.core.errors import ForwardError, TorchMagicError
from torchmagic.core.summary import ModelSummary, summary
from torchmagic.models import GPT, GPTConfig, Llama, SmallCNN

SEEN: list[tuple[bool, bool]] = []


class Boom(nn.Module):
    """Raises what it is told to, after the BatchNorms have run (and updated their clones)."""

    def __init__(self) -> None:
        super().__init__()
        self.exc: BaseException | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.exc is not None:
            raise self.exc
        return x


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.frozen_bn = nn.BatchNorm2d(4)
        self.boom = Boom()
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        SEEN.append((self.bn.training, self.frozen_bn.training))
        x = self.boom(self.frozen_bn(self.bn(self.conv(x))))
        return self.head(self.drop(x.mean((2, 3))))


def bn_net() -> BNNet:
    """A model in train mode holding a frozen BatchNorm in eval, a user hook and a .grad."""
    torch.manual_seed(0)
    m = BNNet()
    m.train()
    m.frozen_bn.eval()
    for p in m.frozen_bn.parameters():
        p.requires_grad_(False)
    m.frozen_bn.running_mean.uniform_()
    m.head.weight.grad = torch.ones_like(m.head.weight)
    m.conv.register_forward_hook(lambda mod, i, o: None)
    return m


# -- numbers -------------------------------------------------------------------------------------
def test_totals_match_parameters_and_rows_in_module_order() -> None:
    m = SmallCNN()
    s = summary(m, input_size=(2, 3, 32, 32))
    assert s.total_params == sum(p.numel() for p in m.parameters())
    assert s.trainable_params == s.total_params and s.frozen_params == 0
    assert s.param_bytes == sum(p.numel() * p.element_size() for p in m.parameters())
    assert s.buffer_bytes == sum(b.numel() * b.element_size() for b in m.buffers())
    assert [r.path for r in s.rows] == [n for n, _ in m.named_modules()]
    rows = {r.path: r for r in s.rows}
    for name, mod in m.named_modules():
        assert rows[name].params == sum(p.numel() for p in mod.parameters())
        assert rows[name].cls == type(mod).__name__
    assert rows["features.0"].kernel == "3x3" and rows["features.3"].kernel == "2x2"
    assert rows["head.1"].kernel is None
    assert s.output_shapes == [(2, 10)]


def test_shapes_and_activation_bytes_against_hooks() -> None:
    m = SmallCNN()
    x = torch.randn(2, 3, 32, 32)
    outs: dict[str, tuple] = {}
    leaf_bytes = 0

    def hook(name: str):
        def fn(mod, inp, out):
            nonlocal leaf_bytes
            outs[name] = (tuple(inp[0].shape), tuple(out.shape))
            if not list(mod.children()):
                leaf_bytes += out.numel() * out.element_size()
        return fn

    handles = [mod.register_forward_hook(hook(n)) for n, mod in m.named_modules()]
    with torch.no_grad():
        m(x)
    for h in handles:
        h.remove()
    s = summary(m, x)
    for r in s.rows:
        assert (r.input_shapes[0], r.output_shapes[0]) == outs[r.path]
        assert r.calls == 1
    assert s.activation_bytes == leaf_bytes


def test_tied_weights_counted_once() -> None:
    g = GPT()
    assert g.lm_head.weight is g.wte.weight
    s = summary(g, input_size=(1, 8), dtypes="long")
    assert s.total_params == sum(p.numel() for p in g.parameters()) == 172_288
    rows = {r.path: r for r in s.rows}
    assert rows["lm_head"].tied == ["weight tied to wte.weight"]
    assert rows["lm_head"].params == 0 and rows["wte"].params == 1000 * 64
    assert sum(r.params for r in s.rows if r.depth == 1) == s.total_params
    assert "tied to wte.weight" in s._repr_html_()
    # the re-using row itself says where the weight lives, also in plain text
    line = next(li for li in str(s).splitlines() if li.startswith("lm_head"))
    assert "tied to wte " in line, line
    assert "Note: lm_head: weight tied to wte.weight (counted once)" in str(s)

    class LongTie(nn.Module):  # "tied to <a long name>" cannot fit: the row says "tied"
        def __init__(self) -> None:
            super().__init__()
            self.token_embedding_table_with_a_really_long_attribute_name = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.token_embedding_table_with_a_really_long_attribute_name.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.token_embedding_table_with_a_really_long_attribute_name(x))

    text = str(summary(LongTie(), input_size=(2, 3), dtypes="long",
                       columns=list(torchmagic.core.summary.COLUMNS)))
    assert max(len(li) for li in text.splitlines()) <= 100
    head = next(li for li in text.splitlines() if li.startswith("head "))
    assert " tied " in head and "tied to" not in head
    assert "head: weight tied to token_embedding_table_with_a_really_long_attribute_name" in text


def test_frozen_and_dtypes() -> None:
    m = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2).to(torch.bfloat16))
    m[0].weight.requires_grad_(False)
    s = summary(m)
    assert s.frozen_params == 32 and s.trainable_params == 8 + 16 + 2
    assert s.param_bytes_by_dtype == {"float32": 40 * 4, "bfloat16": 18 * 2}
    rows = {r.path: r for r in s.rows}
    assert rows["0"].trainable == "partly" and rows["1"].trainable == "yes"
    assert not s.ran_forward and s.total_flops is None
    assert "trainable" in s.visible_columns()


def test_shared_module_called_twice_and_uncalled_module() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.unused = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(self.lin(x))

    s = summary(M(), input_size=(3, 4))
    rows = {r.path: r for r in s.rows}
    assert rows["lin"].calls == 2 and rows["lin"].flops == 2 * (2 * 3 * 4 * 4)
    assert rows["unused"].status == "not called" and rows["unused"].calls == 0
    assert "calls" in s.visible_columns()
    assert "not called" in str(s)


def test_depth_limits_rows_and_container_rows_aggregate() -> None:
    g = GPT()
    s1 = summary(g, input_size=(1, 8), dtypes="long", depth=1)
    assert {r.depth for r in s1.rows} == {0, 1}
    blocks = next(r for r in s1.rows if r.path == "blocks")
    s3 = summary(g, input_size=(1, 8), dtypes="long", depth=3)
    assert blocks.flops == sum(r.flops for r in s3.rows if r.path in ("blocks.0", "blocks.1"))
    assert blocks.status == ""  # a ModuleList is never called itself, but it is not "not called"
    assert summary(g, depth=0).rows[0].path == ""


def test_inputs_tensors_tuple_and_kwargs() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
            y = self.a(x)
            return y if mask is None else y * mask

    x, mask = torch.randn(2, 4), torch.ones(2, 3)
    m = Two()
    for s in (summary(m, x, mask), summary(m, (x, mask)), summary(m, x, {"mask": mask}),
              summary(m, {"x": x, "mask": mask})):
        assert s.input_shapes == [(2, 4), (2, 3)]
        assert s.rows[0].input_shapes == [(2, 4), (2, 3)]
    s = summary(m, input_size=[(2, 4), (2, 3)], dtypes=["float", "float"])
    assert s.input_dtypes == ["float32", "float32"]


def test_integer_shape_inputs_are_valid_token_ids_and_rng_untouched() -> None:
    g = GPT()
    state = torch.get_rng_state()
    s = summary(g, input_size=(2, 16), dtypes=["long"])
    assert torch.equal(state, torch.get_rng_state())
    assert s.input_dtypes == ["int64"] and s.output_shapes == [(2, 16, 1000)]


def test_bf16_model_gets_bf16_inputs() -> None:
    m = nn.Linear(4, 2).to(torch.bfloat16)
    s = summary(m, input_size=(1, 4))
    assert s.input_dtypes == ["bfloat16"] and s.error is None


def llama_forward_flops(cfg, batch: int, seq: int) -> int:
    """Analytic forward FLOPs of torchmagic.models.Llama (2 per multiply-add, matmuls only):
    q/k/v/o projections (grouped k/v heads), the gated MLP, QK^T and AV over all query heads,
    and the untied lm_head."""
    d, hd = cfg.d_model, cfg.d_model // cfg.n_head
    proj = d * cfg.n_head * hd + 2 * d * cfg.n_kv_head * hd + cfg.n_head * hd * d
    per_token_layer = 2 * (proj + 3 * d * cfg.d_ff)
    attn = 2 * 2 * cfg.n_head * seq * seq * hd
    return batch * (cfg.n_layer * (seq * per_token_layer + attn) + seq * 2 * d * cfg.vocab_size)


@pytest.mark.parametrize("config", ["config_7b", "config_70b"])
def test_model_already_on_meta_7b_and_70b_llama(config: str) -> None:
    cfg = getattr(Llama, config)()
    with torch.device("meta"):
        model = Llama(cfg)
    s = summary(model, input_size=(1, 16), dtypes="long", depth=1)
    assert s.meta and s.device == "meta"
    assert s.total_params == sum(p.numel() for p in model.parameters())
    want = llama_forward_flops(cfg, 1, 16)
    assert abs(s.total_flops - want) <= 0.01 * want, (s.total_flops, want)
    assert all(p.device.type == "meta" for p in model.parameters())


def test_to_dict_is_json_and_text_fits() -> None:
    s = summary(GPT(), input_size=(2, 16), dtypes="long")
    d = s.to_dict()
    json.dumps(d)
    assert d["total_params"] == s.total_params and d["rows"][0]["path"] == ""
    assert d["total_macs"] == d["total_flops"] // 2 and d["total_macs"] is not None
    assert [r["macs"] for r in d["rows"]] == [r["flops"] // 2 for r in d["rows"]]
    assert summary(GPT()).to_dict()["total_macs"] is None  # no forward, no FLOPs
    table_part = str(s)
    assert all(len(line) <= 100 for line in table_part.splitlines())
    h = s._repr_html_()
    assert "<script" not in h
    assert f'title="{s.total_flops:,}' in h  # exact values on hover


def test_columns_option() -> None:
    s = summary(SmallCNN(), input_size=(1, 3, 32, 32), columns="params,macs")
    assert s.visible_columns() == ["params", "macs"]
    header = str(s).splitlines()[2]
    assert "MACs" in header and "input" not in header
    with pytest.raises(TorchMagicError, match="unknown column 'foo'"):
        summary(SmallCNN(), columns="params,foo")


# -- invariants ----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["same", "train", "eval"])
@pytest.mark.parametrize("meta", [False, True])
def test_state_unchanged_on_success(mode: str, meta: bool) -> None:
    m = bn_net()
    x = torch.randn(2, 3, 8, 8)
    snap = Snapshot.take(m, x=x)
    SEEN.clear()
    s = summary(m, x, mode=mode, meta=meta)
    snap.assert_unchanged()
    assert s.error is None and s.total_params == sum(p.numel() for p in m.parameters())
    expected = {"same": (True, False), "train": (True, True), "eval": (False, False)}[mode]
    assert SEEN == [expected]
    assert m.conv.weight.device.type == "cpu"


def test_state_unchanged_on_failing_forward() -> None:
    m = bn_net()
    m.boom.exc = RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x5 and 4x2)")
    x = torch.randn(2, 3, 8, 8)
    snap = Snapshot.take(m, x=x)
    with pytest.raises(ForwardError) as info:
        summary(m, x)
    snap.assert_unchanged()
    err = info.value
    assert err.module_path == "boom" and err.module_class == "Boom"
    assert str(err).startswith("boom (Boom): got input (2, 4, 6, 6); mat1 and mat2")
    partial = err.partial
    assert isinstance(partial, ModelSummary) and partial.error == str(err)
    paths = [r.path for r in partial.rows]
    assert paths == ["", "conv", "bn", "frozen_bn", "boom"]  # up to the failure
    assert partial.rows[-1].status == "failed" and partial.rows[0].status == "running"
    assert "FORWARD FAILED" in str(partial)
    # raise_on_error=False returns the partial summary instead
    s = summary(m, x, raise_on_error=False)
    assert s.error == str(err)
    snap.assert_unchanged()


@pytest.mark.parametrize("meta", [False, True])
def test_state_unchanged_on_keyboard_interrupt(meta: bool) -> None:
    m = bn_net()
    m.boom.exc = KeyboardInterrupt()
    x = torch.randn(2, 3, 8, 8)
    snap = Snapshot.take(m, x=x)
    with pytest.raises(KeyboardInterrupt):
        summary(m, x, mode="train", meta=meta)
    snap.assert_unchanged()


def test_meta_never_moves_the_model() -> None:
    m = SmallCNN()
    snap = Snapshot.take(m)
    s = summary(m, input_size=(1, 3, 32, 32), meta=True)
    snap.assert_unchanged()
    assert all(p.device.type == "cpu" for p in m.parameters())
    assert s.total_flops == summary(m, input_size=(1, 3, 32, 32)).total_flops


def test_meta_failure_names_the_reason() -> None:
    class ReadsValues(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(ForwardError, match="meta tensors, which have shapes but no values"):
        summary(ReadsValues(), input_size=(2, 2), meta=True)


def test_model_released() -> None:
    assert_released(SmallCNN, lambda m: summary(m, input_size=(1, 3, 32, 32)))
    assert_released(SmallCNN, lambda m: summary(m, input_size=(1, 3, 32, 32), torchinfo=True))
    assert_released(SmallCNN, lambda m: summary(m, input_size=(1, 3, 32, 32), meta=True))

    def failing(m: BNNet) -> None:
        try:
            summary(m, torch.randn(1, 3, 8, 8))
        except ForwardError as exc:
            return exc.partial

    def make() -> BNNet:
        m = bn_net()
        m.boom.exc = RuntimeError("x")
        return m

    assert_released(make, failing)


def test_torchinfo_on_a_twin() -> None:
    from torchinfo import torchinfo as ti

    m = bn_net()
    x = torch.randn(2, 3, 8, 8)
    before = dict(ti._cached_forward_pass)
    snap = Snapshot.take(m, x=x)
    s = summary(m, x, torchinfo=True)
    snap.assert_unchanged()  # frozen BN still eval, stats and RNG untouched
    assert ti._cached_forward_pass == before
    assert s.torchinfo is not None and "Total params" in s.torchinfo
    assert "torchinfo's own table" in str(s)
    s = summary(m, x, torchinfo=True, meta=True)
    snap.assert_unchanged()
    assert "Total params" in s.torchinfo


def test_bad_arguments_plain_python() -> None:
    with pytest.raises(TorchMagicError, match="must be a torch.nn.Module; got int"):
        summary(3)
    with pytest.raises(TorchMagicError, match="depth"):
        summary(SmallCNN(), depth=-1)
    with pytest.raises(TorchMagicError, match="mode must be one of"):
        summary(SmallCNN(), mode="test")
    with pytest.raises(TorchMagicError, match="unknown dtype"):
        summary(SmallCNN(), input_size=(1, 3, 32, 32), dtypes="floaty")
    with pytest.raises(TorchMagicError, match="2 dtypes for 1 input shapes"):
        summary(SmallCNN(), input_size=(1, 3, 32, 32), dtypes=["float", "long"])
    with pytest.raises(TorchMagicError, match="unknown device"):
        summary(SmallCNN(), input_size=(1, 3, 32, 32), device="gpu0")
    with pytest.raises(TorchMagicError, match="negative"):
        summary(SmallCNN(), input_size=(1, -3, 32, 32))
    if not torch.cuda.is_available():
        with pytest.raises(TorchMagicError, match="CUDA is not available"):
            summary(SmallCNN(), input_size=(1, 3, 32, 32), device="cuda")


@requires_cuda
def test_device_twin_on_cuda() -> None:
    m = bn_net()
    x = torch.randn(2, 3, 8, 8)
    snap = Snapshot.take(m, x=x)
    s = summary(m, x, device="cuda")
    snap.assert_unchanged()
    assert s.device.startswith("cuda") and s.error is None


def test_public_api() -> None:
    s = torchmagic.summary(SmallCNN(), input_size=(1, 3, 32, 32))
    assert isinstance(s, torchmagic.ModelSummary)
    assert s.total_flops == 2 * s.total_macs


# -- the magic -----------------------------------------------------------------------------------
def test_magic_shows_table_and_stores(ip) -> None:
    ip.user_ns["cnn"] = SmallCNN()
    _, shown = run(ip, "summary cnn (1,3,32,32) --depth 1 -o s")
    assert "SmallCNN summary" in shown and "features" in shown and "Forward FLOPs" in shown
    assert isinstance(ip.user_ns["s"], ModelSummary)
    assert ip.user_ns["s"].depth == 1


def test_magic_input_forms(ip) -> None:
    ip.run_cell("from torchmagic.models import GPT\n"
                "gpt = GPT()\nids = torch.zeros(2, 8, dtype=torch.long)\n"
                "class Two(nn.Module):\n"
                "    def forward(self, a, b=None):\n"
                "        return a + (0 if b is None else b)\n"
                "two = Two()\nx = torch.ones(2, 3)\n")
    for line in ("gpt ids", "gpt dict(idx=ids)", "gpt (2,8) --dtypes long", "two (x, x)",
                 "two x x", "two [(2,3),(2,3)]", "two (2,3) (2,3) --dtypes float,float",
                 "two x dict(b=x)", "gpt ids.shape --dtypes long"):
        _, shown = run(ip, f"summary {line} -o r")
        assert "FORWARD FAILED" not in shown, line
        assert ip.user_ns["r"].ran_forward, line


def test_magic_meta_and_mode_keep_state(ip) -> None:
    m = bn_net()
    ip.user_ns["m"] = m
    snap = Snapshot.take(m)
    for line in ("m (2,3,8,8)", "m (2,3,8,8) --meta", "m (2,3,8,8) --mode train",
                 "m (2,3,8,8) --mode eval --torchinfo"):
        run(ip, f"summary {line}")
        snap.assert_unchanged()


def test_magic_failing_forward_shows_partial_then_one_line(ip) -> None:
    m = bn_net()
    m.boom.exc = RuntimeError("something broke\nsecond line")
    ip.user_ns["m"] = m
    snap = Snapshot.take(m)
    from IPython.utils.capture import capture_output

    with capture_output() as cap, pytest.raises(UsageError) as info:
        ip.run_line_magic("summary", "m (2,3,8,8) -o part")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg == "%summary: boom (Boom): got input (2, 4, 6, 6); something broke"
    shown = "".join(o.data.get("text/plain", "") for o in cap.outputs) + cap.stdout
    assert "FAILED" in shown and "frozen_bn" in shown
    assert ip.user_ns["part"].error
    snap.assert_unchanged()


def test_magic_keyboard_interrupt_propagates_state_kept(ip) -> None:
    m = bn_net()
    m.boom.exc = KeyboardInterrupt()
    ip.user_ns["m"] = m
    snap = Snapshot.take(m)
    with pytest.raises(KeyboardInterrupt):
        ip.run_line_magic("summary", "m (2,3,8,8)")
    snap.assert_unchanged()


@pytest.mark.parametrize("line, expected", [
    ("", "%summary: give a model"),
    ("nope (1,3,32,32)", "name 'nope' is not defined"),
    ("three", "MODEL must be a torch.nn.Module; got int"),
    ("cnn (1,3", "unclosed bracket"),
    ("cnn (1,3,,32)", "malformed input shape"),
    ("cnn (1,3,32,32) --bogus", "unknown option --bogus"),
    ("cnn (1,3,32)", "features.0 (Conv2d"),
    ("cnn (1,3,32,32) --mode test", "invalid choice"),
    ("cnn (1,3,32,32) --columns foo", "unknown column 'foo'"),
    ("cnn (1,3,32,32) --dtypes floaty", "unknown dtype 'floaty'"),
    ("cnn (1,3,32,32) --device gpu0", "unknown device"),
    ("cnn (1,3,32,32) --depth -1", "depth must be"),
    ("cnn (1,3,32,32) xs", "not a mix"),
    ("cnn xs --dtypes long", "--dtypes applies to shape inputs"),
    ("cnn (1,3,32,32) -o 1x", "-o needs a variable name"),
])
def test_magic_bad_input_one_line(ip, line: str, expected: str) -> None:
    ip.user_ns.update(cnn=SmallCNN(), three=3, xs=torch.randn(1, 3, 32, 32))
    with pytest.raises(UsageError) as info:
        run(ip, f"summary {line}")
    msg = str(info.value)
    assert expected in msg
    assert "\n" not in msg


def test_magic_depth_default_from_config(ip) -> None:
    ip.user_ns["g"] = GPT(GPTConfig(n_layer=1))
    ip.run_line_magic("config", "TorchMagic.depth = 1")
    try:
        _, shown = run(ip, "summary g -o r")
        assert ip.user_ns["r"].depth == 1
    finally:
        ip.run_line_magic("config", "TorchMagic.depth = 3")


# -- widget --------------------------------------------------------------------------------------
def test_widget_view_is_one_html_widget_with_the_tree() -> None:
    """Widget mode shows the summary as one HTML widget (never a widget per row); the tree
    inside is the same native <details> HTML as the HTML rendering."""
    import ipywidgets

    from torchmagic.display import mimebundle

    s = summary(GPT(), input_size=(1, 8), dtypes="long")
    from ipywidgets.widgets.widget import _instances

    def views() -> list:
        return [w for w in _instances.values() if isinstance(w, ipywidgets.DOMWidget)]

    before = len(views())
    widget_frontend = torchmagic.display.widget_frontend
    torchmagic.display.widget_frontend = lambda: True
    try:
        bundle = mimebundle(s, "widget")
    finally:
        torchmagic.display.widget_frontend = widget_frontend
    assert len(views()) - before == 1
    view = _instances[bundle["application/vnd.jupyter.widget-view+json"]["model_id"]]
    assert view.value == bundle["text/html"] == s._repr_html_()
    assert "<details" in view.value and 'title="blocks.1.mlp"' in view.value
    view.close()


def test_device_cpu_and_meta_strings() -> None:
    m = bn_net()
    x = torch.randn(2, 3, 8, 8)
    snap = Snapshot.take(m, x=x)
    s = summary(m, x, device="cpu")
    assert s.device == "cpu" and not s.meta and "copy" not in " ".join(s.notes)
    s = summary(m, x, device="meta")
    assert s.meta and s.device == "meta"
    snap.assert_unchanged()


# -- reviewer's additions: models and inputs real users bring ---------------------------------
class KwModel(nn.Module):
    """forward(input_ids, attention_mask=None) returning a dict with a None in it."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> dict:
        h = self.emb(input_ids)
        if attention_mask is not None:
            h = h * attention_mask[..., None]
        return {"logits": self.head(h), "hidden": h, "past": None}


class _Raiser:
    """A forward hook on a submodule that raises ``exc`` when set (registered before the
    snapshot, so the snapshot includes it)."""

    def __init__(self) -> None:
        self.exc: BaseException | None = None

    def __call__(self, *args: object) -> None:
        if self.exc is not None:
            raise self.exc


def _new_cases() -> dict:
    from torch.nn.utils.rnn import pack_padded_sequence

    gru = nn.GRU(8, 16, num_layers=2, bidirectional=True, batch_first=True)
    packed = pack_padded_sequence(torch.randn(3, 5, 8), [5, 3, 2], batch_first=True)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 2).eval()
    mha = nn.MultiheadAttention(16, 2, kdim=8, vdim=12)
    kw = KwModel()
    ids = torch.zeros(2, 6, dtype=torch.long)
    shared = nn.Linear(4, 4)
    twice = nn.Sequential(shared, nn.ReLU(), shared)
    frozen = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    frozen[0].requires_grad_(False)
    frozen[1].eval()
    dp = nn.DataParallel(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    return {
        # name: (model, inputs, submodule whose hook raises)
        "gru_packed": (gru, (packed,), gru),
        "encoder_fast_path": (enc, (torch.randn(2, 5, 16),), enc.layers[1].linear2),
        "mha_kdim_vdim": (mha, (torch.randn(4, 2, 16), torch.randn(6, 2, 8),
                                torch.randn(6, 2, 12)), mha),
        "kwargs_dict": (kw, ({"input_ids": ids, "attention_mask": torch.ones(2, 6)},), kw.head),
        "shared_twice": (twice, (torch.randn(2, 4),), twice[1]),
        "frozen_bn": (frozen.train(), (torch.randn(3, 4),), frozen[2]),
        "data_parallel": (dp, (torch.randn(2, 4),), dp.module[1]),
    }


@pytest.mark.parametrize("case", list(_new_cases()))
@pytest.mark.parametrize("meta", [False, True])
def test_new_cases_state_on_success_failure_and_interrupt(case: str, meta: bool) -> None:
    model, inputs, where = _new_cases()[case]
    raiser = _Raiser()
    handle = where.register_forward_hook(raiser)
    try:
        snap = Snapshot.take(model, *[t for t in inputs if isinstance(t, torch.Tensor)])
        s = summary(model, *inputs, meta=meta)
        assert s.error is None and s.total_params == sum(p.numel() for p in model.parameters())
        assert s.output_shapes
        snap.assert_unchanged()
        raiser.exc = RuntimeError("boom in the user's code")
        with pytest.raises(ForwardError, match="boom in the user's code") as info:
            summary(model, *inputs, meta=meta)
        assert "\n" not in str(info.value)
        snap.assert_unchanged()
        raiser.exc = KeyboardInterrupt()
        with pytest.raises(KeyboardInterrupt):
            summary(model, *inputs, meta=meta, mode="train")
        snap.assert_unchanged()
    finally:
        handle.remove()


def test_kwargs_dict_input_and_dict_output() -> None:
    m = KwModel()
    ids = torch.zeros(2, 6, dtype=torch.long)
    s = summary(m, {"input_ids": ids, "attention_mask": torch.ones(2, 6)})
    assert s.rows[0].input_shapes == [(2, 6), (2, 6)]
    assert s.output_shapes == [(2, 6, 4), (2, 6, 8)]  # the None is skipped
    assert summary(m, {"input_ids": ids}, meta=True).output_shapes == [(2, 6, 4), (2, 6, 8)]


def test_dataclass_and_none_outputs_are_shown() -> None:
    from dataclasses import dataclass

    @dataclass
    class Out:
        logits: torch.Tensor
        aux: torch.Tensor | None

    class DC(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> Out:
            return Out(self.lin(x), None)

    s = summary(DC(), input_size=(2, 4))
    assert s.output_shapes == [(2, 3)]
    assert s.rows[0].output_bytes == 2 * 3 * 4
    assert s.output_type == "Out" and "Output: Out: (2, 3)" in str(s)


def test_multihead_attention_out_proj_is_in_parent_not_unused() -> None:
    """MHA uses out_proj's weights in F.multi_head_attention_forward, never calling it: the row
    says so (not "not called") and the activation estimate counts MHA's own outputs."""
    m = nn.MultiheadAttention(16, 2, batch_first=True)
    x = torch.randn(2, 5, 16)
    s = summary(m, x, x, x)
    out_proj = next(r for r in s.rows if r.path == "out_proj")
    assert out_proj.status == "in parent"
    line = next(li for li in str(s).splitlines() if li.startswith("out_proj"))
    assert "not called" not in line
    assert "used directly by the parent's forward" in str(s)
    assert s.activation_bytes == (2 * 5 * 16 + 2 * 5 * 5) * 4  # output + averaged weights


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_wrappers_are_unwrapped_and_torchscript_is_explained() -> None:
    inner = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    s = summary(nn.DataParallel(inner), input_size=(2, 4))
    assert [r.path for r in s.rows] == ["", "0", "1"] and s.total_flops == 2 * 2 * 4 * 4
    assert any("DataParallel wrapper" in n for n in s.notes)

    class OptimizedModule(nn.Module):  # torch.compile's wrapper, without importing dynamo here
        def __init__(self, mod: nn.Module) -> None:
            super().__init__()
            self._orig_mod = mod

        def forward(self, *a: object) -> object:
            raise AssertionError("the compiled wrapper must not run")

    s = summary(OptimizedModule(inner), input_size=(2, 4))
    assert [r.path for r in s.rows] == ["", "0", "1"]
    assert any("torch.compile" in n for n in s.notes)

    scripted = torch.jit.script(inner)
    with pytest.raises(TorchMagicError, match="TorchScript module") as info:
        summary(scripted, input_size=(2, 4))
    assert "\n" not in str(info.value)
    assert summary(scripted).total_params == 20  # no inputs: parameters only

    container = nn.ModuleList([nn.Linear(2, 2)])
    with pytest.raises(TorchMagicError, match="ModuleList has no forward"):
        summary(container, input_size=(1, 2))
    assert summary(container).total_params == 6


def test_integer_input_hint_and_list_hint(ip) -> None:
    ip.user_ns["emb"] = nn.Sequential(nn.Embedding(100, 8), nn.Linear(8, 2))
    with pytest.raises(ForwardError, match="dtypes='long'"):  # Python's own argument name
        summary(ip.user_ns["emb"], input_size=(2, 5))
    assert summary(ip.user_ns["emb"], input_size=(2, 5), dtypes="long").output_shapes == [(2, 5, 2)]
    ip.user_ns["xs"] = [torch.randn(1, 4), torch.randn(1, 4)]
    ip.user_ns["lin"] = nn.Linear(4, 2)
    for line, want in [("summary emb (2,5)", "--dtypes long"),
                       ("summary lin xs", "wrap it: (xs,)"),
                       ("summary lin 1e9,4", "sizes must be whole numbers")]:
        with pytest.raises(UsageError, match=want.replace("(", r"\(").replace(")", r"\)")) as info:
            run(ip, line)
        assert "\n" not in str(info.value)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_bad_input_never_gives_an_internal_traceback(ip) -> None:
    """Through run_cell (what a notebook does): every bad line ends in a UsageError."""
    ip.user_ns["cnn"] = SmallCNN()
    ip.user_ns["sm"] = torch.jit.script(nn.Linear(2, 2))
    lines = ["%summary cnn (1,3,32,32) --depth -1", "%summary cnn (1,3,32,32) --mode bogus",
             "%summary cnn (1,3,32,32) --device cuda:7", "%summary cnn (1,3,32,32) --device gpu",
             "%summary cnn (1,3,32,32) --columns params,bogus", "%summary cnn (1,3,32,32) -o 1x",
             "%summary cnn (1,3,32,32) --dtypes long,float", "%summary cnn (1,3,32,32) --dtypes x",
             "%summary cnn (1,3,32", "%summary cnn (1,3,32,32) (1,3)", "%summary cnn 1.5,3,32,32",
             "%summary sm (1,2)", "%summary cnn {1: 2}", "%params cnn --depth -1",
             "%params cnn --frozen --trainable", "%summary cnn (1,3,32,32) --columns ''"]
    if not torch.cuda.is_available():
        lines.append("%summary cnn (1,3,32,32) --device cuda")
    for line in lines:
        result = ip.run_cell(line, silent=True)
        assert isinstance(result.error_in_exec, UsageError), (line, result.error_in_exec)
        assert "\n" not in str(result.error_in_exec), line


def test_text_fits_100_columns_with_many_inputs_and_torchinfo() -> None:
    m = nn.MultiheadAttention(32, 4, kdim=16, vdim=24)
    s = summary(m, torch.randn(5, 2, 32), torch.randn(7, 2, 16), torch.randn(7, 2, 24),
                torchinfo=True)
    too_wide = [line for line in str(s).splitlines() if len(line) > 100]
    assert not too_wide, too_wide
    s = summary(SmallCNN(), input_size=(1, 3, 32, 32), torchinfo=True)
    assert "Mult-Adds" in s.torchinfo and "Param #" in s.torchinfo
    assert max(len(line) for line in str(s).splitlines()) <= 100


def test_long_module_paths_stay_distinguishable_in_text() -> None:
    """Long qualified names are cut in the middle (both ends kept), so sibling rows still differ
    when the table has to shrink to 100 columns."""
    inner = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    m = nn.ModuleDict({"an_extremely_long_attribute_name_for_a_block":
                       nn.ModuleDict({"another_quite_long_key_name": inner})})

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = m

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return inner(x)

    s = summary(Wrap(), input_size=(2, 4), columns=list(torchmagic.core.summary.COLUMNS), depth=5)
    lines = str(s).splitlines()
    assert max(len(line) for line in lines) <= 100
    names = [line.split("  ")[0] for line in lines if line.startswith("blo")]
    assert len(names) == 5 and len(set(names)) == 5, names
    assert names[-1].endswith(".1") and names[-2].endswith(".0")
    p = torchmagic.params(Wrap(), depth=5)
    names = [line.split("  ")[0] for line in str(p).splitlines() if line.startswith("blo")]
    assert len(set(names)) == len(names) == 5, names


# -- the snapshot helper itself: every invariant test relies on it noticing a change ----------
def _mutations() -> dict:
    """name -> (mutate(m), undo(m), words expected in the difference)."""
    import torch.nn.modules.module as mm

    def set_grad(m: BNNet, g: torch.Tensor | None) -> None:
        m.head.weight.grad = g

    saved: dict = {}

    def to_meta(m: BNNet) -> None:
        saved["bias"] = m.head.bias
        m.head.bias = nn.Parameter(torch.empty_like(m.head.bias, device="meta"))

    def hook_on(m: BNNet) -> None:
        saved["h"] = m.head.register_forward_hook(lambda *a: None)

    def global_hook_on(m: BNNet) -> None:
        saved["g"] = mm.register_module_forward_hook(lambda *a: None)

    def dtype_on(m: BNNet) -> None:
        saved["dtype"] = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)

    def param_on(m: BNNet) -> None:
        saved["w"] = m.conv.weight.detach().clone()
        m.conv.weight.data.view(-1)[0].add_(1)

    def grad_off(m: BNNet) -> None:
        saved["grad"] = m.head.weight.grad
        m.head.weight.grad = None

    def device_on(m: BNNet) -> None:
        from torchmagic.core.state import GlobalState

        saved["state"] = GlobalState.capture()
        torch.set_default_device("meta")

    def rng_on(m: BNNet) -> None:
        saved["rng"] = torch.get_rng_state()
        torch.rand(1)

    return {
        "param value": (param_on, lambda m: m.conv.weight.data.copy_(saved["w"]),
                        "conv.weight: values changed"),
        "running stats": (lambda m: m.bn.running_mean.add_(1), lambda m: m.bn.running_mean.sub_(1),
                          "bn.running_mean: values changed"),
        "num_batches_tracked": (lambda m: m.bn.num_batches_tracked.add_(1),
                                lambda m: m.bn.num_batches_tracked.sub_(1), "num_batches_tracked"),
        "training flag": (lambda m: m.frozen_bn.train(), lambda m: m.frozen_bn.eval(),
                          "frozen_bn: training False -> True"),
        "hook": (hook_on, lambda m: saved["h"].remove(), "head: _forward_hooks changed"),
        "requires_grad": (lambda m: m.head.bias.requires_grad_(False),
                          lambda m: m.head.bias.requires_grad_(True), "requires_grad"),
        "grad": (grad_off, lambda m: set_grad(m, saved["grad"]), ".grad set -> None"),
        "grad value": (lambda m: m.head.weight.grad.add_(1), lambda m: m.head.weight.grad.sub_(1),
                       ".grad changed"),
        "device": (to_meta, lambda m: setattr(m.head, "bias", saved["bias"]), "device"),
        "global hook": (global_hook_on, lambda m: saved["g"].remove(), "global module hooks"),
        "default dtype": (dtype_on, lambda m: torch.set_default_dtype(saved["dtype"]),
                          "default_dtype"),
        "grad mode": (lambda m: torch.set_grad_enabled(False),
                      lambda m: torch.set_grad_enabled(True), "grad_enabled"),
        "rng": (rng_on, lambda m: torch.set_rng_state(saved["rng"]), "rng"),
        "default device": (device_on, lambda m: saved["state"].restore(), "device"),
    }


@pytest.mark.parametrize("kind", list(_mutations()))
def test_snapshot_helper_notices_each_change(kind: str) -> None:
    """Snapshot must report each kind of change the invariant tests rely on (else those tests
    could not fail), and report nothing once the change is undone."""
    m = bn_net()
    mutate, undo, words = _mutations()[kind]
    snap = Snapshot.take(m)
    snap.assert_unchanged()
    try:
        mutate(m)
        diffs = snap.differences()
    finally:
        undo(m)
    assert any(words in d for d in diffs), (kind, diffs)
    snap.assert_unchanged()


def test_snapshot_is_bitwise_and_assert_released_notices_a_cache() -> None:
    m = nn.Linear(2, 2)
    with torch.no_grad():
        m.weight[0, 0] = float("nan")
        m.weight[0, 1] = 0.0
    snap = Snapshot.take(m)
    snap.assert_unchanged()  # the same NaN bits are equal (torch.equal would say NaN != NaN)
    with torch.no_grad():
        m.weight[0, 1] = -0.0  # equal by value, different bits
    assert snap.differences() == ["m0:param:weight: values changed"]
    cache: list = []
    with pytest.raises(AssertionError, match="kept a reference"):
        assert_released(SmallCNN, cache.append)


class _Select(nn.Module):
    """Keeps the rows a boolean mask selects: the output size comes from the mask's values."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.lin(x[mask])


class _Branch(_Select):
    """Branches on a value: no symbolic value decides an ``if``."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.lin(x) if mask.all() else self.lin(x) * 2


def test_meta_forward_that_reads_values_runs_on_fake_tensors() -> None:
    """meta tensors have no values: a forward that selects rows by a mask is run again on fake
    tensors, where the row count is a symbol (u0) and the Linear's FLOPs are marked as
    depending on the data, never a silent 0; the user's model and inputs are untouched."""
    torch.manual_seed(0)
    model, x = _Select(), torch.randn(5, 4)
    mask = torch.tensor([True, False, True, True, False])
    snap = Snapshot.take(model)
    s = summary(model, x, mask, meta=True)
    snap.assert_unchanged()
    assert s.error is None and str(s.output_shapes[0]) == "(u0, 3)"
    assert any("fake twin" in n for n in s.notes)
    assert [(u.op, u.module) for u in s.uncounted] == [("aten.addmm (size from data)", "lin")]
    real = summary(model, x, mask)  # the real forward: 3 rows selected
    assert real.total_flops == 2 * 3 * 4 * 3 and real.output_shapes[0] == (3, 3)


def test_value_branch_on_meta_says_fake_tensors_failed_too(ip) -> None:
    ip.user_ns.update(model=_Branch(), x=torch.randn(5, 4), mask=torch.ones(5, dtype=torch.bool))
    with pytest.raises(UsageError) as info:
        run(ip, "summary model x mask --meta")
    msg = str(info.value)
    assert "fake tensors, which carry symbolic values, did not get past it either" in msg
    assert "%%meta_shape --fake" not in msg and "\n" not in msg
    assert "run on real weights without --meta" in msg
