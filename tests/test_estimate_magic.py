"""%estimate / %%estimate in IPython, and the estimate's text and HTML."""

from __future__ import annotations

import pytest
import torch
from conftest import outputs, run
from estimate_helpers import free_reference_cycles
from IPython.core.error import UsageError
from statecheck import Snapshot

import torchmagic
from torchmagic.models import GPT, GPTConfig


@pytest.fixture(autouse=True)
def _collect_garbage():
    """Leave no tensor of this file alive for later tests (``%gpumem --top`` counts them)."""
    yield
    free_reference_cycles()



def small_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=100, block_size=32, n_layer=2, n_head=2, d_model=32))


@pytest.fixture
def ns(ip):
    gpt = small_gpt()
    ip.user_ns.update(gpt=gpt, ids=torch.randint(0, 100, (4, 32)),
                      opt=torch.optim.AdamW(gpt.parameters()), F=torch.nn.functional)
    return ip.user_ns


def test_line_magic_shows_peak_kinds_verdict_and_stores(ip, ns) -> None:
    snap = Snapshot.take(ns["gpt"], ids=ns["ids"])
    _, shown = run(ip, "estimate gpt (4,32) --dtypes long --train --device t4 -o est")
    est = ns["est"]
    assert isinstance(est, torchmagic.MemoryEstimate) and est.what == "training step"
    assert "Peak: " in shown and "optimizer state" in shown and "FITS on NVIDIA T4" in shown
    assert "Timeline" in shown and "gpt.blocks.0-1" in shown
    ref = torchmagic.estimate_memory(ns["gpt"], input_size=(4, 32), dtypes="long", train=True,
                                     device="t4", name="gpt")
    assert est.peak_bytes == ref.peak_bytes
    snap.assert_unchanged()


def test_line_magic_input_forms(ip, ns) -> None:
    a = ip.run_line_magic("estimate", "gpt ids -o a --no-what-if") or ns["a"]
    b = ns["a"]
    run(ip, "estimate gpt (ids,) -o b")
    run(ip, "estimate gpt dict(idx=ids) -o c")
    assert a is None or a is b
    assert ns["a"].peak_bytes == ns["b"].peak_bytes == ns["c"].peak_bytes
    run(ip, "estimate gpt ids --batch 8 -o d")
    assert ns["d"].batch == 8 and ns["d"].peak_bytes > ns["a"].peak_bytes


def test_line_magic_takes_inputs_as_summary_does(ip, ns) -> None:
    """The shared INPUTS options (magics/_base.py input_arguments): a Mapping that is not a
    dict (a tokenizer's BatchEncoding is a UserDict) is keyword arguments, name=EXPR, --args,
    --kwargs and --batch-dim."""
    from collections import UserDict

    ns["batch"] = UserDict(idx=ns["ids"])
    run(ip, "estimate gpt ids -o a")
    run(ip, "estimate gpt batch -o b")
    run(ip, "estimate gpt idx=ids -o c")
    run(ip, "estimate gpt --args (ids,) -o d")
    run(ip, "estimate gpt --kwargs dict(idx=ids) -o e")
    assert len({ns[k].peak_bytes for k in "abcde"}) == 1
    # shapes without their batch dimension: batch 1 inserted at dim 0, then --batch sets it
    run(ip, "estimate gpt (32,) --dtypes long --batch-dim 0 --batch 4 -o f")
    assert ns["f"].batch == 4 and ns["f"].peak_bytes == ns["a"].peak_bytes
    with pytest.raises(UsageError, match="--batch-dim applies to shape inputs"):
        ip.run_line_magic("estimate", "gpt ids --batch-dim 0")


def test_options_reach_the_core(ip, ns) -> None:
    run(ip, "estimate gpt ids --train --optimizer sgd --dtype bf16 --amp bf16 --checkpointing "
            "--memory 1GiB --reserve 0 --top 2 -o e")
    e = ns["e"]
    assert e.settings["optimizer"].startswith("SGD") and e.settings["weights"].startswith(
        "bfloat16") and e.settings["autocast"] == "bfloat16" and "checkpointing" in e.settings
    assert e.verdict.capacity.total == 2**30 and e.verdict.capacity.reserve == 0
    assert len(e.top_activations) <= 2
    assert e.by_kind["optimizer_state"] == 0


def test_small_memory_keeps_most_of_itself_usable(ip, ns) -> None:
    """--memory without --reserve: the reserve is the smaller of 1 GiB and an eighth of the
    memory, and the report says so."""
    ns["mlp"] = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.ReLU(),
                                    torch.nn.Linear(4096, 1024))
    ns["x"] = torch.randn(64, 1024)
    _, shown = run(ip, "estimate mlp x --train --optimizer sgd --memory 1GiB -o s")
    flat = " ".join(shown.split())
    assert "FITS on 1GiB of memory: 1.0 GiB, 128.0 MiB reserved -> 896.0 MiB usable" in flat
    assert "the smaller of 1 GiB and an eighth of it" in flat
    assert "needs" not in flat and "sharding" not in flat
    assert ns["s"].verdict.capacity.reserve == 2**30 // 8


def test_max_batch_progress_line(ip, ns, monkeypatch) -> None:
    import torchmagic.display.live as live

    # a terminal: the live panel's status line (display/live.py) says what is traced
    monkeypatch.setattr(live, "_where", lambda: "terminal")
    real_live = live.live
    monkeypatch.setattr(live, "live", lambda title, delay=0.0, **kw: real_live(title, 0.0, **kw))
    _, shown = run(ip, "estimate gpt ids --train --memory 20MiB --reserve 0 --max-batch "
                       "--no-what-if -o m")
    assert "searching the largest batch that fits" in shown
    assert f"Largest batch that fits: {ns['m'].max_batch}" in shown
    # captured (not a terminal): no progress line
    monkeypatch.undo()
    _, shown = run(ip, "estimate gpt ids --train --memory 20MiB --reserve 0 --max-batch "
                       "--no-what-if")
    assert "searching" not in shown and "Largest batch that fits" in shown


def test_terminal_status_line_while_tracing(ip, ns, monkeypatch) -> None:
    """In a terminal, a long estimate shows one status line rewritten in place: the trace running
    (the step, then each what-if), its phase and ops so far; it is erased before the report, so
    the report that stays on the screen is the plain result."""
    import torchmagic.core.estimate_trace as estimate_trace
    import torchmagic.display.live as live

    monkeypatch.setattr(live, "_where", lambda: "terminal")
    real_live = live.live
    monkeypatch.setattr(live, "live", lambda title, delay=0.0, **kw: real_live(
        title, 0.0, interval=0.0))
    monkeypatch.setattr(estimate_trace, "HEARTBEAT_OPS", 64)   # a small model's few hundred ops
    _, shown = run(ip, "estimate gpt ids --train --memory 1MiB --reserve 0 -o w")
    status = [part for part in shown.split("\r") if part.startswith("%estimate: trace")]
    assert "%estimate: trace 1: the training step: forward, 64 ops" in status
    assert any(s.startswith("%estimate: trace 1: the training step: backward, ") for s in status)
    changes = [a.change for a in ns["w"].alternatives if a.how != "arithmetic"]
    for i, change in enumerate(changes):
        assert any(s.startswith(f"%estimate: trace {i + 2}: what if {change} ({i + 1} of "
                                f"{len(changes)})") for s in status), change
    # what stays: the status line overwritten by blanks, then the report alone
    last = shown.split("\r")[-1]
    assert shown.split("\r")[-2].strip() == "" and last.startswith("Memory estimate: gpt")
    assert "%estimate: trace" not in last
    assert f"what-if: {ns['w'].whatif_traces} more traces" in " ".join(last.split())


def test_cell_magic(ip, ns) -> None:
    snap = Snapshot.take(ns["gpt"], ids=ns["ids"])
    cell = ("opt.zero_grad()\nloss = F.cross_entropy(gpt(ids).flatten(0, 1), ids.flatten())\n"
            "loss.backward()\nopt.step()\n")
    _, shown = run(ip, "estimate --memory 2GiB -o c", cell)
    assert "Memory estimate of the cell" in shown and "opt: AdamW" in shown
    assert ns["c"].what == "cell" and ns["c"].fits
    assert "loss" not in ns   # the cell's names are not written back
    assert not ns["opt"].state
    snap.assert_unchanged()


@pytest.mark.parametrize("line, cell, expected", [
    ("estimate", None, "give a model and its inputs"),
    ("estimate gpt --train", None, "give the model's inputs"),
    ("estimate gpt ids --optimizer adam", None, "--optimizer applies to a training step"),
    ("estimate gpt ids --train --optimizer adamz", None, "unknown optimizer 'adamz'"),
    ("estimate gpt ids --device tpu9", None, "unknown accelerator 'tpu9'"),
    ("estimate gpt ids --memory lots", None, "size like 80GiB"),
    ("estimate gpt ids --max-batch", None, "needs a memory to fit in"),
    ("estimate gpt ids --memory 1GiB --reserve 1GiB", None,
     "%estimate: --reserve 1GiB leaves nothing of --memory 1GiB: "),
    ("estimate gpt ids --device t4 --reserve 16GiB", None,
     "--reserve 16GiB leaves nothing of NVIDIA T4's 15,102 MiB"),
    ("estimate --memory 64MiB --reserve 64MiB", "x = gpt(ids)",
     "%%estimate: --reserve 64MiB leaves nothing of --memory 64MiB"),
    ("estimate gpt ids --first-step", None, "--first-step applies to %%estimate"),
    ("estimate gpt (4,32) --dtypes long --batch x", None, "argument --batch"),
    ("estimate gpt ids -o 1x", None, "-o needs a variable name"),
    ("estimate nothing ids", None, "name 'nothing' is not defined"),
    ("estimate gpt (4,32,) --top -1", None, "--top must be >= 0"),
    ("estimate --train", "x = gpt(ids)", "--train belongs to the line form"),
    ("estimate gpt ids", "x = gpt(ids)", "MODEL/INPUTS belongs to the line form"),
    ("estimate", "# nothing", "the cell has only comments"),
    ("estimate", "y = gpt.lm_head(gpt(ids))", "line 1"),
])
def test_bad_input_one_line(ip, ns, line: str, cell: str | None, expected: str) -> None:
    with pytest.raises(UsageError) as info:
        run(ip, line, cell)
    msg = str(info.value)
    assert expected in msg, msg
    assert "\n" not in msg


# ---------------------------------------------------------------------------------------------
# display
# ---------------------------------------------------------------------------------------------
def test_text_fits_the_width(monkeypatch) -> None:
    gpt = small_gpt()
    est = torchmagic.estimate_memory(gpt, input_size=(4, 32), dtypes="long", train=True,
                                     memory=1, reserve=0, name="a_rather_long_model_name")
    for cols in (60, 80, 120):
        monkeypatch.setenv("COLUMNS", str(cols))
        text = str(est)
        assert max(len(line) for line in text.splitlines()) <= cols
        assert "DOES NOT FIT" in text and "What would change it" in text


def test_html_is_self_contained(ip, ns) -> None:
    est = torchmagic.estimate_memory(ns["gpt"], ns["ids"], train=True, memory="64MiB", reserve=0)
    html = est._repr_html_()
    assert "<script" not in html and "http" not in html.replace("http://www.w3.org/2000/svg", "")
    assert "<svg" in html and "<polygon" in html and "tm-result" in html
    assert "usable memory" in html and "var(--jp-" in html
    bundles = outputs(ip, "estimate gpt ids --train --memory 64MiB --reserve 0")
    assert any("text/plain" in b for b in bundles)


def test_fits_on_every_accelerator_without_a_device(ip, ns) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device gives one verdict")
    _, shown = run(ip, "estimate gpt ids")
    assert "Fits on (peak + 1.0 GiB reserve): MI300X, H200" in shown.replace("\n    ", " ")
    est = torchmagic.estimate_memory(ns["gpt"], ns["ids"])
    html = est._repr_html_()
    assert "NVIDIA T4" in html and "datasheet" in html
