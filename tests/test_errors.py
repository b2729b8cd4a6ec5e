"""Issue 11, item 5: the one-line error a magic shows keeps nothing alive.

Run through a real ``InteractiveShell`` (``run_cell``), as a user would: IPython shows the error and
keeps it in ``sys.last_value`` / ``sys.last_traceback``. Where plain torch frees the model after
``del model; gc.collect()``, torchmagic must too: no ``__context__``/``__cause__`` chain to the
internal error, no traceback frame of torchmagic's holding the model, no partial result holding it.
"""

from __future__ import annotations

import gc
import sys
import weakref

import pytest
import torch
import torch.nn as nn
from IPython.core.error import UsageError

from torchmagic.models import SmallCNN

CASES = {
    "checkpoint load of a missing file": "%checkpoint load net /nonexistent/missing.pt",
    "params with a bad depth": "%params net --depth -5",
    "summary whose forward fails": "%summary net (1,3,32)",
    "summary with a bad input expression": "%summary net undefined_name",
    "meta_shape whose cell fails": "%%meta_shape\ny = net(torch.randn(1, 3, 32))",
    "checkpoint save to a missing directory": "%checkpoint save net /nonexistent/dir/c.pt",
    "device of an undefined name": "%device net2",
    "freeze of a missing submodule": "%freeze net.nothing",
    "tensor of a module": "%tensor net",
    "benchmark with a bad option": "%%benchmark --min-time inf\nnet(torch.randn(1, 3, 32, 32))",
    "amp with a bad dtype": "%%amp --dtype float32\nnet(torch.randn(1, 3, 32, 32))",
}


def _shown_error(ip, cell: str) -> BaseException:
    from IPython.utils.capture import capture_output

    with capture_output():
        result = ip.run_cell(cell)
    err = result.error_in_exec or result.error_before_exec
    assert isinstance(err, UsageError), (cell, err)
    return err


@pytest.mark.parametrize("case", list(CASES))
def test_failed_magic_keeps_no_reference_to_the_model(ip, case):
    net = SmallCNN()
    ref = weakref.ref(net)
    ip.user_ns["net"] = net
    del net
    err = _shown_error(ip, CASES[case])
    assert sys.last_value is err  # what IPython keeps after showing it
    assert err.__context__ is None and err.__cause__ is None, case
    assert "\n" not in str(err)
    frames = []
    tb = err.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    assert not [f for f in frames if "/torchmagic/core/" in f], frames
    del ip.user_ns["net"]
    err = None
    gc.collect()
    assert ref() is None, f"{case}: the model is still alive after del + gc.collect()"


def test_plain_torch_reference_frees_the_model(ip):
    """The reference the cases above are held to: a plain cell's error does not keep the model
    (bound to a name and deleted) alive when the failing code does not hold it."""
    net = SmallCNN()
    ref = weakref.ref(net)
    ip.user_ns["net"] = net
    del net
    result = ip.run_cell("torch.load('/nonexistent/missing.pt')")
    assert isinstance(result.error_in_exec, FileNotFoundError)
    del ip.user_ns["net"]
    result = None
    gc.collect()
    assert ref() is None


def test_user_exception_from_a_cell_magic_keeps_no_copy_of_the_namespace(ip):
    """The user's own exception comes back (unchanged type and message) without torchmagic's
    frames, whose locals held a copy of the namespace: deleting the model frees it, as after the
    same error in a plain cell."""
    net = nn.Linear(2, 2)
    ref = weakref.ref(net)
    ip.user_ns["net"] = net
    del net
    from IPython.utils.capture import capture_output

    with capture_output():
        result = ip.run_cell("%%benchmark -n 1\n1 / 0")
    assert isinstance(result.error_in_exec, ZeroDivisionError)
    assert str(result.error_in_exec) == "division by zero"
    del ip.user_ns["net"]
    result = None
    gc.collect()
    assert ref() is None


def test_internal_bug_keeps_its_traceback(ip, monkeypatch):
    """A bug inside torchmagic (its own frame raises) is not hidden: its traceback stays whole."""
    import torchmagic.core.tensor as core_tensor

    def broken(*a, **k):
        raise AttributeError("a bug")

    monkeypatch.setattr(core_tensor, "tensor_report", broken)
    ip.user_ns["x"] = torch.ones(2)
    with pytest.raises(AttributeError) as info:
        ip.run_line_magic("tensor", "x")
    files = []
    tb = info.value.__traceback__
    while tb is not None:
        files.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    assert any(f.endswith("test_errors.py") for f in files)


@pytest.mark.parametrize("line, want", [
    ("summary net --dpeth 2", "%summary: unknown option --dpeth (did you mean --depth?)"),
    ("summary net --dpeth 2 --metta",
     "%summary: unknown options --dpeth (did you mean --depth?), --metta (did you mean --meta?)"),
    ("summary net --zzzzzz", "%summary: unknown option --zzzzzz (usage: %summary"),
    ("summary net (3,10", "%summary: unclosed bracket in: net (3,10"),
    ("estimate net --memory -4GiB",
     "%estimate: --memory needs a value; '-4GiB' reads as an option: write --memory=-4GiB"),
    ("summary net (1,3,32,32) --depth", "%summary: --depth needs a value (usage:"),
])
def test_usage_errors_say_what_was_meant(ip, line: str, want: str) -> None:
    """One line naming the magic: the closest valid option for a typo (the suggestion is a real
    option of the magic), how to give a value that starts with '-', a bracket left open."""
    ip.user_ns["net"] = SmallCNN()
    err = _shown_error(ip, "%" + line)
    msg = str(err)
    assert msg.startswith(want) and "\n" not in msg, msg
    magic = ip.find_line_magic(line.split()[0])
    options = {o for a in magic.parser._actions for o in a.option_strings}
    for suggested in [w.rstrip("?),") for w in msg.split() if w.startswith("--") and "?" in w]:
        assert suggested in options, suggested


def test_the_dash_value_spelling_the_message_suggests_reaches_the_option(ip) -> None:
    """The hint for a value starting with '-' is advice: its spelling must get the value to the
    option, whose own check then answers (here: not a size)."""
    ip.user_ns["net"] = SmallCNN()
    hint = str(_shown_error(ip, "%estimate net (1,3,32,32) --memory -4GiB"))
    assert "write --memory=-4GiB" in hint
    msg = str(_shown_error(ip, "%estimate net (1,3,32,32) --memory=-4GiB"))
    assert "needs a value" not in msg and "'-4GiB'" in msg
    assert msg.startswith("%estimate: --memory must be a size"), msg
