"""%freeze / %unfreeze: exact counts against an independent walk of the model, only
requires_grad changes (Snapshot), all-or-nothing on interrupt, BatchNorm and optimizer reminders,
bad paths."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import run
from IPython.core.error import UsageError
from statecheck import Snapshot

import torchmagic
from torchmagic.core.errors import TorchMagicError
from torchmagic.core.freeze import freeze, resolve_root, unfreeze
from torchmagic.models import SmallCNN


def trainable(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


def requires_grad_diffs(snap: Snapshot) -> set[str]:
    """Differences from the snapshot; asserts every one of them is a requires_grad change."""
    diffs = snap.differences()
    assert all(d.endswith(("requires_grad True -> False", "requires_grad False -> True"))
               for d in diffs), diffs
    return {d.split(": requires_grad")[0] for d in diffs}


def busy_cnn() -> SmallCNN:
    """A model with grads, a hook, mixed training flags: everything freeze must leave alone."""
    m = SmallCNN()
    m.head.eval()
    m(torch.randn(2, 3, 32, 32)).sum().backward()
    m.features[0].register_forward_hook(lambda *a: None)
    m.features[0].weight.register_hook(lambda g: g)
    return m


def test_freeze_submodule_exact_and_only_requires_grad() -> None:
    m = busy_cnn()
    snap = Snapshot.take(cnn=m)
    before = trainable(m)
    r = freeze(m, ["features"], exclude=["features.4"], name="cnn")
    expected = [(n, p) for n, p in m.features.named_parameters() if not n.startswith("4.")]
    assert r.changed_params == len(expected) == 6
    assert r.changed_elements == sum(p.numel() for _, p in expected)
    assert r.changed_modules == ["features.0", "features.1", "features.5"]
    assert (r.trainable_before, r.trainable_after) == (before, trainable(m))
    assert r.trainable_after == before - r.changed_elements
    assert (r.trainable_params_before, r.trainable_params_after) == (12, 6)
    assert requires_grad_diffs(snap) == {f"cnn:param:features.{n}" for n, _ in expected}
    assert all(p.requires_grad for p in m.features[4].parameters())
    # unfreeze brings back exactly the snapshot
    r2 = unfreeze(m, name="cnn")
    assert r2.changed_params == 6 and r2.already == 6
    snap.assert_unchanged()


def test_whole_model_parameter_path_and_brackets() -> None:
    m = SmallCNN()
    r = freeze(m, name="cnn")
    assert r.changed_params == len(list(m.parameters())) and trainable(m) == 0
    assert r.trainable_after == 0 and r.trainable_before == r.total_elements
    r = unfreeze(m, ["head[3].bias", "features[0]"], name="cnn")
    assert r.changed_params == 3 and r.changed_modules == ["features.0", "head.3"]
    assert [n for n, p in m.named_parameters() if p.requires_grad] == [
        "features.0.weight", "features.0.bias", "head.3.bias"]
    r = freeze(m, ["head.3.bias", "head.3.bias"], name="cnn")  # named twice: counted once
    assert r.changed_params == 1


def test_tied_weights_counted_once() -> None:
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    m = nn.Sequential(emb, head)
    r = freeze(m, ["1"], name="lm")
    assert r.changed_params == 1 and r.changed_elements == 40 and r.total_elements == 40
    assert not emb.weight.requires_grad


def test_unfreeze_skips_integer_parameters() -> None:
    m = nn.Module()
    m.lin = nn.Linear(2, 2)
    m.idx = nn.Parameter(torch.arange(3), requires_grad=False)
    freeze(m)
    r = unfreeze(m)
    assert r.changed_params == 2 and r.skipped_non_float == 1
    assert "1 integer parameter left as it is" in str(r)


def test_batchnorm_warning() -> None:
    m = SmallCNN()
    r = freeze(m, ["features"], name="cnn")
    assert r.batchnorm == ["features.1", "features.5"] and r.batchnorm_training == 2
    text = str(r)
    assert "2 BatchNorm layers in the frozen part (cnn.features.1, cnn.features.5; 2 in " \
        "train mode now) still update" in " ".join(text.split())
    assert "momentum=0" in text
    # The suggested code runs as printed and does what it says, without rebinding the model's name
    # (tests/test_advice.py checks it puts exactly the frozen layers in eval mode).
    for name in ("cnn", "m", "mod", "bn_path"):
        rep = freeze(m, ["features"], name=name)
        code = "\n".join(ln[4:] for ln in str(rep).splitlines() if ln.startswith("    "))
        ns = {name: m}
        exec(code, ns)  # noqa: S102 - the snippet the report prints
        assert ns[name] is m and m.training
        assert [type(x).__name__ for x in m.modules() if not x.training] == ["BatchNorm2d"] * 2
        m.train()
    assert freeze(m, ["head"], name="cnn").batchnorm == []
    assert unfreeze(m, ["features"], name="cnn").batchnorm == []
    assert freeze(m, ["features"], exclude=["features.1", "features.5"]).batchnorm == []


def test_optimizer_reminders_and_stale_grads() -> None:
    m = SmallCNN()
    m(torch.randn(2, 3, 32, 32)).sum().backward()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    head_opt = torch.optim.SGD(m.head.parameters(), lr=0.1)
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    ns = {"cnn": m, "opt": opt, "head_opt": head_opt, "other": other}
    r = freeze(m, ["features"], name="cnn", namespace=ns)
    assert [(o.name, o.count) for o in r.optimizers] == [("opt", 4 + 4)]
    assert r.stale_grads == 8  # they still hold .grad from the backward above
    text = str(r)
    assert 'group["params"][:] = [p for p in group["params"] if p.requires_grad]' in text
    assert "p.grad = None" in text  # test_advice.py runs both and checks their effect
    r = unfreeze(m, ["features"], name="cnn", namespace=ns)
    # head_opt holds parameters of cnn but none of the unfrozen ones
    assert [(o.name, o.count) for o in r.optimizers] == [("head_opt", 8)]
    assert "add_param_group" in str(r)


def test_resolve_root_errors() -> None:
    m = SmallCNN()

    class Trainer:
        model = m

    ns = {"cnn": m, "trainer": Trainer(), "x": torch.randn(2)}
    assert resolve_root(ns, "trainer.model.head")[0] == "trainer.model"
    with pytest.raises(TorchMagicError, match="name 'nope' is not defined"):
        resolve_root(ns, "nope.head")
    with pytest.raises(TorchMagicError, match="x is a Tensor, not an nn.Module"):
        resolve_root(ns, "x")
    with pytest.raises(TorchMagicError) as exc:
        freeze(m, ["features.12"], name="cnn")
    assert str(exc.value) == ("cnn.features (Sequential) has no submodule or parameter '12'; "
                              "valid: 0..7")


# -- the magics ----------------------------------------------------------------------------------
def test_magic_freeze_text(ip) -> None:
    m = SmallCNN()
    ip.user_ns.update({"cnn": m, "opt": torch.optim.Adam(m.parameters())})
    _, shown = run(ip, "freeze cnn.features --except cnn.features.4 features.5")
    assert all(len(line) <= 100 for line in shown.splitlines())
    shown = " ".join(shown.split())
    assert shown.startswith("freeze cnn.features except cnn.features.4, cnn.features.5: froze 4 "
                            "parameters")
    assert "in 2 modules" in shown and "optimizer opt (Adam)" in shown
    assert "modules changed: cnn.features.0, cnn.features.1 " in shown  # paths as the user types
    assert [n for n, p in m.named_parameters() if not p.requires_grad] == [
        "features.0.weight", "features.0.bias", "features.1.weight", "features.1.bias"]
    _, shown = run(ip, "unfreeze cnn -o rep")
    assert "unfroze 4 parameters" in shown and ip.user_ns["rep"].trainable_after == trainable(m)
    assert "<table" in ip.user_ns["rep"]._repr_html_()
    from torchmagic.display.freeze import widget

    assert len(widget(ip.user_ns["rep"]).children) == 2


@pytest.mark.parametrize("line, message", [
    ("freeze cnn.feature", "%freeze: cnn (SmallCNN) has no submodule or parameter 'feature'; "
                           "valid: features, head"),
    ("freeze cnn.head.3.weight.x", "%freeze: cnn.head.3.weight is a parameter; it has no 'x'"),
    ("freeze x", "%freeze: x is a Tensor, not an nn.Module"),
    ("freeze nope", "%freeze: name 'nope' is not defined"),
    ("freeze cnn.head other", "%freeze: all paths must be in one model"),
    ("freeze cnn --except cnn.head.9", "%freeze: cnn.head (Sequential) has no submodule or "
                                       "parameter '9'; valid: 0..3"),
    ("unfreeze cnn --except other", "%unfreeze: cnn (SmallCNN) has no submodule or parameter "
                                    "'other'"),
    ("freeze", "the following arguments are required"),
])
def test_bad_input_one_line_and_nothing_changed(ip, line: str, message: str) -> None:
    m = busy_cnn()
    ip.user_ns.update({"cnn": m, "x": torch.randn(2), "other": nn.Linear(2, 2)})
    snap = Snapshot.take(m)
    with pytest.raises(UsageError) as exc:
        run(ip, line)
    assert message in str(exc.value) and "\n" not in str(exc.value)
    snap.assert_unchanged()


def test_keyboard_interrupt_while_resolving(ip) -> None:
    m = busy_cnn()

    class Trainer:
        @property
        def model(self):
            raise KeyboardInterrupt

    ip.user_ns.update({"cnn": m, "trainer": Trainer()})
    snap = Snapshot.take(m)
    with pytest.raises(KeyboardInterrupt):
        ip.run_line_magic("freeze", "trainer.model.head")
    snap.assert_unchanged()


def test_keyboard_interrupt_mid_change_rolls_back(ip) -> None:
    class Interrupting(nn.Parameter):
        def requires_grad_(self, requires_grad: bool = True):  # noqa: ANN201
            raise KeyboardInterrupt

    m = busy_cnn()
    m.head[3].bias = Interrupting(torch.zeros(10))  # the last parameter in model order
    ip.user_ns["cnn"] = m
    snap = Snapshot.take(m)
    with pytest.raises(KeyboardInterrupt):
        ip.run_line_magic("freeze", "cnn")
    snap.assert_unchanged()  # the 11 parameters frozen before the interrupt were put back


def test_exception_mid_change_rolls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    m = SmallCNN()
    bias = m.head[3].bias  # the last parameter in model order
    snap = Snapshot.take(m)
    original = nn.Parameter.requires_grad_

    def failing(self, flag=True):  # noqa: ANN001, ANN202
        if self is bias:
            raise RuntimeError("boom")
        return original(self, flag)

    monkeypatch.setattr(nn.Parameter, "requires_grad_", failing)
    with pytest.raises(RuntimeError, match="boom"):
        freeze(m)
    monkeypatch.undo()
    snap.assert_unchanged()


def test_plain_python() -> None:
    m = SmallCNN()
    r = torchmagic.freeze(m, ["head"], name="cnn")
    d = r.to_dict()
    assert d["changed_params"] == 4 and d["action"] == "freeze"
    assert torchmagic.unfreeze(m, name="cnn").changed_params == 4


def test_bad_output_name_changes_nothing(ip):
    """-o is checked before requires_grad changes: a refused magic leaves the model as it was."""
    m = SmallCNN()
    ip.user_ns["m"] = m
    r = ip.run_cell("%freeze m -o 1bad")
    assert type(r.error_in_exec) is UsageError
    assert "-o needs a variable name" in str(r.error_in_exec)
    assert all(p.requires_grad for p in m.parameters())


def test_tied_weights_are_named(ip):
    """lm_head.weight is wte.weight in GPT: freezing one name freezes both, and the report says
    so (and lists both modules); --except on one name keeps the tensor as it was."""
    from torchmagic.models import GPT

    gpt = GPT()
    ip.user_ns["gpt"] = gpt
    _, shown = run(ip, "freeze gpt.lm_head -o r")
    r = ip.user_ns["r"]
    assert not gpt.wte.weight.requires_grad and gpt.lm_head.weight is gpt.wte.weight
    assert r.changed_params == 1 and r.changed_modules == ["wte", "lm_head"]
    assert r.tied_changed == [["wte.weight", "lm_head.weight"]]
    assert "gpt.wte.weight = gpt.lm_head.weight is one tensor (frozen under every name)" in shown
    assert "modules changed: gpt.wte, gpt.lm_head" in shown
    assert "froze 1 parameter (" in shown and "in 2 modules" in shown
    run(ip, "unfreeze gpt")
    _, shown = run(ip, "freeze gpt --except lm_head -o r")
    assert gpt.wte.weight.requires_grad
    assert ip.user_ns["r"].tied_kept == [["wte.weight", "lm_head.weight"]]
    assert "left as it was: one of its names is under --except" in " ".join(shown.split())
    assert all(len(line) <= 100 for line in shown.splitlines())


def test_one_path_as_a_string_is_one_path() -> None:
    """``freeze(m, "features")`` freezes ``m.features`` (not the paths "f", "e", ...)."""
    import torchmagic
    from torchmagic.models import SmallCNN

    m = SmallCNN()
    r = torchmagic.freeze(m, "features", exclude="features.0")
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    want = {f"features.{n}" for n, _ in m.features.named_parameters()
            if not n.startswith("0.")}
    assert frozen == want and r is not None
    torchmagic.unfreeze(m, "features")
    assert all(p.requires_grad for p in m.parameters())
