"""What ``explain_compile`` / ``%%compile`` leave behind: nothing. The user's compiled code keeps
its caches, ours is gone, dynamo/inductor config, logging, counters and automatic-dynamic state
are as before, models and global torch state unchanged, on success, failure and Ctrl-C."""

from __future__ import annotations

import copy
import gc
import logging

import pytest
import torch
import torch.nn as nn
from conftest import run
from statecheck import Snapshot, assert_released

from torchmagic.core.compile import explain_compile
from torchmagic.core.errors import ForwardError


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        x = self.bn(self.fc(x))
        print("net forward")
        return self.drop(x).relu()


class CountingBackend:
    """A backend that counts the graphs it is asked to compile (the user's own compile)."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.fixture
def users_compile():
    """The test's own ``torch.compile`` (the "user's"), dropped at the end of the test the way
    the magic drops its own (``torch._dynamo.reset()`` would leave its objects alive, which later
    tests counting live tensors would see). Call it with each backend the test compiles with."""
    from torchmagic.core.compile_sandbox import DynamoSandbox

    sandbox = DynamoSandbox()
    sandbox.__enter__()
    yield sandbox.backends.append
    sandbox.__exit__(None, None, None)


def _dynamo_state():
    import torch._dynamo.pgo as pgo
    import torch._dynamo.utils as dutils
    from torch._inductor import config as inductor_config
    from torch._logging import _internal

    loggers = {n: (lg.level, lg.propagate, list(lg.handlers))
               for n, lg in logging.Logger.manager.loggerDict.items()
               if n.startswith("torch") and isinstance(lg, logging.Logger)}
    return {
        "dynamo_config": torch._dynamo.config.get_config_copy(),
        "inductor_config": inductor_config.get_config_copy(),
        "counters": {k: dict(v) for k, v in dutils.counters.items() if v},
        "guard_failures": {k: list(v) for k, v in dutils.guard_failures.items()},
        "code_state": copy.deepcopy(pgo._CODE_STATE),
        "log_state": (dict(_internal.log_state.log_qname_to_level),
                      set(_internal.log_state.artifact_names)),
        "loggers": loggers,
    }


def _same_dynamo_state(before, after):
    for key in before:
        if key == "code_state":
            assert (before[key] is None) == (after[key] is None) and \
                (before[key] is None or dict(before[key]) == dict(after[key])), key
        elif key == "loggers":
            for name, rec in before[key].items():
                assert after[key].get(name, rec) == rec, name
        else:
            assert before[key] == after[key], key


def test_user_compiled_model_keeps_its_cache_and_ours_is_gone(users_compile):
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(8, 4)
    backend = CountingBackend()
    users_compile(backend)
    compiled = torch.compile(model, backend=backend)
    compiled(x)
    compiled_before = backend.graphs
    assert compiled_before >= 2  # the print splits it
    other = torch.randn(5, 4)
    state = _dynamo_state()
    snap = Snapshot.take(model=model)
    report = explain_compile(model, x, backend="eager", check=True, bench=True, min_time=0.01,
                             logs="graph_breaks,recompiles", calls=[other])
    assert report.graph_count == compiled_before and report.recompiles
    snap.assert_unchanged()  # parameters, BatchNorm statistics, flags, hooks, RNG, grad mode ...
    _same_dynamo_state(state, _dynamo_state())
    compiled(x)  # the user's compiled model: no recompilation after the magic
    assert backend.graphs == compiled_before


def test_cell_leaves_no_compiled_code_and_no_state(ip, users_compile):
    from torch._dynamo.eval_frame import _get_total_cache_entry_count

    torch.manual_seed(0)
    ip.user_ns.update(model=Net(), x=torch.randn(8, 4))
    user_backend = CountingBackend()
    users_compile(user_backend)
    ip.user_ns["cm"] = torch.compile(ip.user_ns["model"], backend=user_backend)
    ip.run_cell("out = cm(x)")
    seen = user_backend.graphs
    keys = set(ip.user_ns)
    state = _dynamo_state()
    run(ip, "compile --backend eager --runs 2 --logs graph_breaks -o rep", "y = model(x)")
    _same_dynamo_state(state, _dynamo_state())
    new = set(ip.user_ns) - keys
    assert new - {"y", "rep"} <= {k for k in new if k.startswith("__import_")}
    # the forward: only the user's entries remain (ours are reset or invalidated)
    code = Net.forward.__code__
    assert _get_total_cache_entry_count(code) >= 1
    ip.run_cell("out = cm(x)")
    assert user_backend.graphs == seen
    # a function only the magic compiled keeps no cache entry at all
    ip.run_cell("def f(t):\n    return t.sin() + 1")
    run(ip, "compile f x --backend eager")
    assert _get_total_cache_entry_count(ip.user_ns["f"].__code__) == 0


def test_automatic_dynamic_state_does_not_leak_into_the_users_compile(users_compile):
    def g(t):
        return t * 2

    explain_compile(g, torch.randn(2), calls=[torch.randn(3)], backend="eager")
    backend = CountingBackend()
    users_compile(backend)
    fails = []
    user = torch._dynamo.optimize(backend, guard_fail_fn=fails.append)(g)
    user(torch.randn(2))
    user(torch.randn(3))
    # the user's second size recompiles with automatic dynamic shapes as on a fresh start
    # (had our run's observation leaked, the first compile would already be dynamic)
    assert backend.graphs == 2 and "size mismatch" in fails[0].reason


def test_failure_and_ctrl_c_restore_everything():
    class Boom(nn.Module):
        def __init__(self, exc: type[BaseException]) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.exc = exc

        def forward(self, x):
            y = self.fc(x)
            print("before the failure")  # a graph break: the raise happens in compiled code
            raise self.exc(f"boom {y.shape}")

    x = torch.randn(1, 2)
    for exc, expected in ((ValueError, ForwardError), (KeyboardInterrupt, KeyboardInterrupt)):
        model = Boom(exc)
        state = _dynamo_state()
        snap = Snapshot.take(model=model)
        with pytest.raises(expected):
            explain_compile(model, x, backend="eager", logs="graph_breaks")
        snap.assert_unchanged()
        _same_dynamo_state(state, _dynamo_state())


def test_nothing_keeps_the_model_alive():
    x = torch.randn(3, 4)

    def ok(model):
        return explain_compile(model, x, backend="eager", check=True)

    def failing(model):
        try:
            explain_compile(model, torch.randn(3, 5), backend="eager")
        except ForwardError:
            return None
        raise AssertionError("expected a ForwardError")

    assert_released(Net, ok)
    assert_released(Net, failing)
    gc.collect()


def test_global_torch_settings_are_restored_in_the_line_form(ip):
    torch.manual_seed(0)
    ip.user_ns.update(model=Net(), x=torch.randn(8, 4))
    snap = Snapshot.take(model=ip.user_ns["model"])
    grad = torch.is_grad_enabled()
    run(ip, "compile model x --backend eager --check --bench --min-time 0.01")
    snap.assert_unchanged()  # includes the RNG the check replayed and the dropout consumed
    assert torch.is_grad_enabled() == grad


def test_no_parameter_or_fake_tensor_outlives_the_run():
    """dynamo's guard managers live on through weakref callbacks on classes, and its fake
    tensors form autograd cycles the garbage collector cannot see: neither may keep our run's
    objects (the twin, hence the user's parameters; fake tensors) alive."""
    import weakref

    from torch._subclasses.fake_tensor import FakeTensor

    def fakes() -> int:
        gc.collect()
        return sum(issubclass(type(o), FakeTensor) for o in gc.get_objects())

    x = torch.randn(8, 4)
    explain_compile(Net(), x, backend="eager")  # warm-up: dynamo's own one-time objects
    before = fakes()
    for kwargs in ({}, {"check": True}, {"calls": [torch.randn(3, 4)]}):
        model = Net()
        weight = weakref.ref(model.fc.weight)
        explain_compile(model, x, backend="eager", **kwargs)
        del model
        gc.collect()
        assert weight() is None, kwargs
    ns = {"model": Net(), "x": x}
    explain_compile("y = model(x)\nz = y.sin()", namespace=ns, backend="eager")
    del ns
    assert fakes() == before


def test_fake_tensor_mode_class_is_put_back():
    """The sandbox notes the fake modes it makes by wrapping ``FakeTensorMode.__init__`` while it
    is open: afterwards torch's own method is back, after a success and after a failing forward."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    original = FakeTensorMode.__dict__["__init__"]
    explain_compile(Net(), torch.randn(3, 4), backend="eager")
    assert FakeTensorMode.__dict__["__init__"] is original
    with pytest.raises(ForwardError):
        explain_compile(Net(), torch.randn(3, 5), backend="eager")
    assert FakeTensorMode.__dict__["__init__"] is original
    with FakeTensorMode() as mode:  # still a working class
        assert mode.from_tensor(torch.ones(2)).shape == (2,)


_HOOK_SEEN: list[str] = []  # a global a user's hook appends to


def _recording_hook(module, args, output):
    _HOOK_SEEN.append(type(output).__name__)


@pytest.mark.parametrize("kwargs", [{"backend": "eager"}, {"explain": True},
                                    {"backend": "aot_eager", "check": True}])
def test_a_hook_compiled_on_the_private_copy_writes_nothing_of_the_users(kwargs):
    """dynamo resolves the globals of a hook it inlines by importing the function's module: the
    copy's hook must append to the copy's list, never to the user's (and the module made for it
    is gone afterwards)."""
    import sys

    model = Net()
    model.fc.register_forward_hook(_recording_hook)
    model(torch.randn(3, 4))
    assert _HOOK_SEEN == ["Tensor"]  # the hook works on the user's model
    _HOOK_SEEN.clear()
    before = set(sys.modules)
    explain_compile(model, torch.randn(3, 4), **kwargs)
    assert _HOOK_SEEN == [], _HOOK_SEEN
    assert not [m for m in set(sys.modules) - before if "torchmagic_twin" in m]
    assert len(model.fc._forward_hooks) == 1
