"""%checkpoint save / load: atomic writes, safe loads, key diffs, state invariants."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import requires_cuda, run
from IPython.core.error import UsageError
from statecheck import Snapshot

from torchmagic.core.checkpoint import (
    CheckpointMismatch,
    LoadReport,
    SaveReport,
    load_checkpoint,
    save_checkpoint,
)
from torchmagic.core.errors import TorchMagicError
from torchmagic.models import GPT


def small() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def other() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def same_values(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def usage_error(ip, line: str) -> str:
    with pytest.raises(UsageError) as info:
        run(ip, line)
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert msg.startswith("%checkpoint: "), msg
    return msg


class Evil:
    """A pickle payload: unpickling it calls ``open(marker, "w")``, creating the marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


# -- save ----------------------------------------------------------------------------------------
def test_save_load_roundtrip_magic(ip, tmp_path):
    path = tmp_path / "ckpt.pt"
    src, dst = small(), other()
    opt_src = torch.optim.Adam(src.parameters(), lr=1e-3)
    src(torch.randn(5, 4)).sum().backward()
    opt_src.step()
    opt_dst = torch.optim.Adam(dst.parameters(), lr=1e-3)
    ip.user_ns.update(src=src, dst=dst, opt_src=opt_src, opt_dst=opt_dst, step=123)
    _, shown = run(ip, f"checkpoint save src {path} --optimizer opt_src --extra epoch=3 "
                       "step=step note='warm' -o rep")
    rep = ip.user_ns["rep"]
    assert isinstance(rep, SaveReport)
    # Independent references: the file on disk, the model's own state dict and optimizer state.
    assert rep.file_bytes == os.path.getsize(path)
    opt_tensors = sum(isinstance(v, torch.Tensor) for s in opt_src.state.values()
                      for v in s.values())
    assert rep.tensors == len(src.state_dict()) + opt_tensors
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"model", "optimizer", "epoch", "step", "note"}
    assert raw["epoch"] == 3 and raw["step"] == 123 and raw["note"] == "warm"
    assert "Saved src (Sequential)" in shown and f"{rep.tensors} tensors" in shown
    assert not [p for p in tmp_path.iterdir() if p.name != "ckpt.pt"]  # no temp file left

    _, shown = run(ip, f"checkpoint load dst {path} --optimizer opt_dst -o lrep")
    lrep = ip.user_ns["lrep"]
    assert lrep.status == "loaded" and lrep.loaded == len(dst.state_dict())
    assert same_values(src, dst)
    for p_src, p_dst in zip(src.parameters(), dst.parameters()):
        for k, v in opt_src.state[p_src].items():
            assert torch.equal(v, opt_dst.state[p_dst][k])
    assert lrep.extras == {"epoch": 3, "step": 123, "note": "warm"}
    assert "model is on  cpu" in shown and "optimizer    state loaded into Adam" in shown
    assert all(len(line) <= 100 for line in shown.splitlines())
    json.dumps(lrep.to_dict())
    json.dumps(rep.to_dict())


def test_bare_state_dict_and_plain_python(tmp_path):
    """No IPython: the core functions; a file without extras is a bare state dict."""
    path = tmp_path / "m.pt"
    src, dst = small(), other()
    rep = save_checkpoint(src, path)
    assert rep.keys == [] and rep.tensors == len(src.state_dict())
    fresh = other()
    fresh.load_state_dict(torch.load(path, weights_only=True))  # the standard torch idiom
    assert same_values(src, fresh)
    lrep = load_checkpoint(dst, str(path))
    assert isinstance(lrep, LoadReport) and lrep.state_dict_key is None
    assert same_values(src, dst)
    assert "Loaded" in str(lrep) and "<table" in lrep._repr_html_()


def test_save_counts_tied_storage_once(tmp_path):
    gpt = GPT()
    rep = save_checkpoint(gpt, tmp_path / "g.pt", name="gpt")
    sd = gpt.state_dict()
    ptrs = {t.untyped_storage().data_ptr() for t in sd.values()}
    assert rep.tensors == len(sd) and rep.storages == len(ptrs) < len(sd)
    assert rep.tensor_bytes == sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                                    for t in sd.values()}.values())


def test_save_replaces_atomically_and_keeps_mode(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(small(), path)
    os.chmod(path, 0o640)
    rep = save_checkpoint(other(), path)
    assert rep.replaced and (os.stat(path).st_mode & 0o777) == 0o640
    assert same_values(other(), _loaded(path))


def _loaded(path) -> nn.Module:
    m = small()
    m.load_state_dict(torch.load(path, weights_only=True))
    return m


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_interrupted_save_keeps_old_file(tmp_path, monkeypatch, exc):
    path = tmp_path / "c.pt"
    save_checkpoint(small(), path)
    before = path.read_bytes()
    real_save = torch.save

    def partial_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 partial bytes of a checkpoint ...")
        raise exc("interrupted in the middle of the write")

    monkeypatch.setattr(torch, "save", partial_save)
    # Ctrl-C stays Ctrl-C; torch's own errors (a full disk, ...) are one line (issue 11)
    with pytest.raises(KeyboardInterrupt if exc is KeyboardInterrupt else TorchMagicError):
        save_checkpoint(other(), path)
    monkeypatch.setattr(torch, "save", real_save)
    assert path.read_bytes() == before  # the old checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left
    assert same_values(small(), _loaded(path))


def test_save_warns_about_extras_weights_only_refuses(tmp_path):
    rep = save_checkpoint(small(), tmp_path / "c.pt", extras={"cfg": Path("x")})
    assert any("--unsafe" in n and "'cfg'" in n for n in rep.notes)


def test_save_bad_inputs(ip, tmp_path):
    ip.user_ns.update(m=small(), t=torch.ones(2))
    with torch.device("meta"):
        ip.user_ns["meta_m"] = small()
    assert "meta device" in usage_error(ip, f"checkpoint save meta_m {tmp_path / 'x.pt'}")
    assert "does not exist" in usage_error(ip, f"checkpoint save m {tmp_path / 'no' / 'x.pt'}")
    assert "is a directory" in usage_error(ip, f"checkpoint save m {tmp_path}")
    assert "not an nn.Module" in usage_error(ip, f"checkpoint save t {tmp_path / 'x.pt'}")
    assert "--mmap applies to load" in usage_error(ip, f"checkpoint save m {tmp_path}/x.pt --mmap")
    assert "KEY=VALUE" in usage_error(ip, f"checkpoint save m {tmp_path}/x.pt --extra epoch")
    assert "clashes" in usage_error(ip, f"checkpoint save m {tmp_path}/x.pt --extra model=1")
    assert "nope" in usage_error(ip, f"checkpoint save m {tmp_path}/x.pt --extra e=nope")
    assert "nope" in usage_error(ip, f"checkpoint save nope {tmp_path}/x.pt")
    with pytest.raises(UsageError) as info:
        run(ip, f"checkpoint copy m {tmp_path}/x.pt")
    assert "\n" not in str(info.value) and "invalid choice" in str(info.value)
    assert not list(tmp_path.iterdir())


# -- load: safety --------------------------------------------------------------------------------
def test_malicious_pickle_is_refused(ip, tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    torch.save({"model": small().state_dict(), "payload": Evil(str(marker))}, path)
    model = other()
    ip.user_ns["model"] = model
    snap = Snapshot.take(model)
    msg = usage_error(ip, f"checkpoint load model {path}")
    assert "refused to load" in msg and "needs io.open" in msg and "--unsafe" in msg
    assert not marker.exists()
    snap.assert_unchanged()
    # The payload is real: with --unsafe, unpickling runs it (and the report says why that is bad).
    _, shown = run(ip, f"checkpoint load model {path} --unsafe")
    assert marker.exists()
    assert "arbitrary" in shown or "runs any code" in shown


def test_truncated_and_empty_files(ip, tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint(small(), good)
    data = good.read_bytes()
    model = other()
    ip.user_ns["model"] = model
    snap = Snapshot.take(model)
    for cut in (len(data) // 2, len(data) - 10, 100):
        (tmp_path / "cut.pt").write_bytes(data[:cut])
        msg = usage_error(ip, f"checkpoint load model {tmp_path / 'cut.pt'}")
        assert "truncated or corrupt" in msg, msg
    (tmp_path / "empty.pt").write_bytes(b"")
    assert "is empty" in usage_error(ip, f"checkpoint load model {tmp_path / 'empty.pt'}")
    (tmp_path / "text.pt").write_bytes(b"hello world, not a checkpoint")
    assert "not a torch.save checkpoint" in usage_error(
        ip, f"checkpoint load model {tmp_path / 'text.pt'}")
    snap.assert_unchanged()


def test_load_bad_inputs(ip, tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(small(), path)
    ip.user_ns.update(model=other(), opt=torch.optim.SGD(other().parameters(), lr=0.1))
    assert "does not exist" in usage_error(ip, f"checkpoint load model {tmp_path / 'no.pt'}")
    assert "is a directory" in usage_error(ip, f"checkpoint load model {tmp_path}")
    assert "not a device" in usage_error(ip, f"checkpoint load model {path} --map-location gpu0")
    assert "applies to save" in usage_error(ip, f"checkpoint load model {path} --extra a=1")
    assert "no key of the checkpoint starts" in usage_error(
        ip, f"checkpoint load model {path} --strip-prefix module.")
    assert "holds no optimizer state" in usage_error(
        ip, f"checkpoint load model {path} --optimizer opt")
    assert "--assign replaces" in usage_error(
        ip, f"checkpoint load model {path} --optimizer opt --assign")
    assert "no such entry" in usage_error(ip, f"checkpoint load model {path} --key weights")
    if not torch.cuda.is_available():
        assert "CUDA is not available" in usage_error(
            ip, f"checkpoint load model {path} --map-location cuda")


# -- load: key diff ------------------------------------------------------------------------------
def test_shape_mismatch_refused_with_diff(ip, tmp_path):
    path = tmp_path / "c.pt"
    src = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))  # 3 classes
    save_checkpoint(src, path)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))  # 2 classes
    ip.user_ns["model"] = model
    snap = Snapshot.take(model)
    with pytest.raises(UsageError) as info:
        _, shown = run(ip, f"checkpoint load model {path} -o rep")
    msg = str(info.value)
    assert "\n" not in msg and "2 shape mismatches" in msg and "unchanged" in msg
    snap.assert_unchanged()
    rep = ip.user_ns["rep"]
    assert rep.status == "refused"
    assert {(m.key, m.checkpoint_shape, m.model_shape) for m in rep.mismatched} == {
        ("2.weight", (3, 8), (2, 8)), ("2.bias", (3,), (2,))}
    text = str(rep)
    assert "shape" in text and "2.weight" in text and "(3, 8)" in text and "(2, 8)" in text
    # --no-strict loads what matches and reports what it skipped.
    _, shown = run(ip, f"checkpoint load model {path} --no-strict -o rep2")
    rep2 = ip.user_ns["rep2"]
    assert rep2.status == "loaded" and sorted(rep2.skipped) == ["2.bias", "2.weight"]
    assert torch.equal(model[0].weight, src[0].weight)
    assert not torch.equal(model[2].weight[:2], src[2].weight[:2])


def test_module_prefix_detected_and_fixed(ip, tmp_path):
    src = small()
    path = tmp_path / "dp.pt"
    torch.save(nn.DataParallel(src).state_dict(), path)
    model = other()
    ip.user_ns["model"] = model
    snap = Snapshot.take(model)
    with pytest.raises(UsageError) as info:
        run(ip, f"checkpoint load model {path}")
    assert "--strip-prefix module. makes every key match" in str(info.value)
    snap.assert_unchanged()
    run(ip, f"checkpoint load model {path} --strip-prefix module.")
    assert same_values(src, model)
    # torch.compile's _orig_mod. prefix, and the reverse case (the model is the wrapped one).
    torch.save({f"_orig_mod.{k}": v for k, v in src.state_dict().items()}, path)
    with pytest.raises(CheckpointMismatch) as err:
        load_checkpoint(other(), path)
    assert err.value.report.prefix_fix == "--strip-prefix _orig_mod."
    torch.save(src.state_dict(), path)
    wrapped = nn.DataParallel(other())
    with pytest.raises(CheckpointMismatch) as err:
        load_checkpoint(wrapped, path)
    assert err.value.report.prefix_fix == "--add-prefix module."
    load_checkpoint(wrapped, path, add_prefix="module.")
    assert same_values(src, wrapped.module)


def test_state_dict_found_under_common_keys(tmp_path):
    src = small()
    path = tmp_path / "l.pt"
    torch.save({"state_dict": src.state_dict(), "epoch": 7, "global_step": 70}, path)
    model = other()
    rep = load_checkpoint(model, path)
    assert rep.state_dict_key == "state_dict" and rep.extras == {"epoch": 7, "global_step": 70}
    assert same_values(src, model)


# -- load: meta, mmap, assign --------------------------------------------------------------------
def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and os.path.realpath(parts[5]) == os.path.realpath(path):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            out.append((lo, hi))
    return out


def test_mmap_assign_into_meta_model(ip, tmp_path):
    path = tmp_path / "gpt.pt"
    src = GPT()
    save_checkpoint(src, path)
    with torch.device("meta"):
        model = GPT()
    ip.user_ns["model"] = model
    assert "--assign" in usage_error(ip, f"checkpoint load model {path} --mmap")
    _, shown = run(ip, f"checkpoint load model {path} --mmap --assign -o rep")
    assert ip.user_ns["rep"].status == "loaded"
    params = dict(model.named_parameters(remove_duplicate=False))
    assert not any(p.is_meta for p in params.values())
    assert not any(b.is_meta for b in model.buffers())
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in params.values())
    assert same_values(src, model)
    # Tied weights stay tied (assign=True alone would split them).
    assert len(list(model.parameters())) == len(list(src.parameters()))
    assert "re-tied" in shown
    # The parameters are the file's pages, not copies.
    if sys.platform.startswith("linux"):
        ranges = _mapped_ranges(path)
        assert ranges, "the checkpoint file is not mapped"
        for p in params.values():
            ptr = p.untyped_storage().data_ptr()
            assert any(lo <= ptr < hi for lo, hi in ranges), "parameter not backed by the file"
    assert "model is on  cpu" in shown


def test_map_location_reports_device(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(small(), path)
    rep = load_checkpoint(other(), path, map_location="cpu")
    assert rep.model_devices == {"cpu": len(list(other().parameters())) + 3}
    assert rep.checkpoint_devices == {"cpu": len(small().state_dict())}


@requires_cuda
def test_map_location_does_not_move_the_model(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(small(), path)
    model = other()
    rep = load_checkpoint(model, path, map_location="cuda")
    assert next(model.parameters()).device.type == "cpu"
    assert any("stays on cpu" in n for n in rep.notes)
    model2 = other()
    rep2 = load_checkpoint(model2, path, map_location="cuda", assign=True)
    assert next(model2.parameters()).device.type == "cuda"
    assert "cuda:0" in rep2.model_devices


# -- load: the model is unchanged when a load fails ---------------------------------------------
class Picky(nn.Linear):
    def _load_from_state_dict(self, *args, **kwargs):
        raise RuntimeError("Picky refuses every checkpoint")


def test_failure_inside_torch_load_state_dict_leaves_model_unchanged(tmp_path):
    path = tmp_path / "c.pt"
    src = nn.Sequential(nn.Linear(4, 4), Picky(4, 4))
    torch.manual_seed(3)
    save_checkpoint(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), path)
    snap = Snapshot.take(src)
    with pytest.raises(TorchMagicError) as err:
        load_checkpoint(src, path)
    assert "Picky refuses" in str(err.value) and "unchanged" in str(err.value)
    snap.assert_unchanged()  # the first Linear was not loaded either


def test_optimizer_group_mismatch_checked_before_model(tmp_path):
    path = tmp_path / "c.pt"
    src = small()
    save_checkpoint(src, path, optimizer=torch.optim.SGD(src.parameters(), lr=0.1))
    model = other()
    opt = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[3].parameters()}],
                          lr=0.1)
    snap = Snapshot.take(model)
    with pytest.raises(TorchMagicError, match="parameter groups"):
        load_checkpoint(model, path, optimizer=opt)
    snap.assert_unchanged()


def test_keyboard_interrupt_while_reading_leaves_model_unchanged(ip, tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    save_checkpoint(small(), path)
    model = other()
    ip.user_ns["model"] = model
    snap = Snapshot.take(model)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "load", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(ip, f"checkpoint load model {path}")
    snap.assert_unchanged()


@pytest.mark.skipif(not hasattr(signal, "SIGINT") or sys.platform == "win32", reason="POSIX")
def test_ctrl_c_during_the_copy_is_held_until_it_completes(tmp_path):
    path = tmp_path / "c.pt"
    src = small()
    save_checkpoint(src, path)
    model = other()
    fired = []

    def hook(module, state_dict, prefix, *args):
        # Ctrl-C arrives while the first submodule of the real model is being loaded (the hook
        # also runs on the meta twin used for validation: not there).
        if not fired and not module.weight.is_meta:
            fired.append(True)
            os.kill(os.getpid(), signal.SIGINT)

    handle = model[0]._register_load_state_dict_pre_hook(hook, with_module=True)
    try:
        with pytest.raises(KeyboardInterrupt):
            load_checkpoint(model, path)
    finally:
        handle.remove()
    assert fired
    assert same_values(src, model)  # all or nothing: the load completed, then Ctrl-C was raised
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_success_keeps_everything_but_values(ip, tmp_path):
    """A successful load changes values only: flags, hooks, requires_grad, grads, global state."""
    path = tmp_path / "c.pt"
    src = small()
    save_checkpoint(src, path)
    model = other()
    model.eval()
    model[0].weight.requires_grad_(False)
    ip.user_ns["model"] = model
    before = Snapshot.take(model)
    run(ip, f"checkpoint load model {path}")
    diffs = before.differences()
    assert diffs and all(d.endswith("values changed") for d in diffs), diffs
    assert not model.training and not model[0].weight.requires_grad
    assert same_values(src, model)


def test_widget_and_html(tmp_path):
    path = tmp_path / "c.pt"
    rep = save_checkpoint(small(), path)
    from torchmagic.display import checkpoint as view

    assert "atomically" in view.html(rep)
    assert view.widget(rep).value == view.html(rep)
    try:
        load_checkpoint(nn.Linear(4, 8), path)
    except CheckpointMismatch as exc:
        html = exc.report._repr_html_()
        assert "<table" in html and "unexpected" in html


def test_garbage_file_is_not_called_a_dangerous_pickle(ip, tmp_path):
    """A text file is 'not a checkpoint', not 'a pickle that could run code' (which would send the
    user to --unsafe for nothing)."""
    ip.user_ns["model"] = other()
    (tmp_path / "junk.pt").write_text("garbage")
    msg = usage_error(ip, f"checkpoint load model {tmp_path / 'junk.pt'}")
    assert "is not a torch.save checkpoint" in msg and "--unsafe" not in msg, msg


def test_bad_output_name_is_refused_before_writing_or_loading(ip, tmp_path):
    path = tmp_path / "c.pt"
    model = other()
    ip.user_ns["model"] = model
    r = ip.run_cell(f"%checkpoint save model {path} -o 1bad")
    assert type(r.error_in_exec) is UsageError and not path.exists()
    save_checkpoint(small(), path)
    snap = Snapshot.take(model)
    r = ip.run_cell(f"%checkpoint load model {path} -o 1bad")
    assert type(r.error_in_exec) is UsageError and "-o needs a variable name" in str(r.error_in_exec)
    snap.assert_unchanged()


def test_short_one_line_messages(ip, tmp_path):
    path = tmp_path / "c.pt"
    torch.save({f"entry{i}": i for i in range(30)}, path)
    ip.user_ns["model"] = other()
    msg = usage_error(ip, f"checkpoint load model {path} --key nope")
    assert "entry0, entry1" in msg and "(24 more)" in msg and len(msg.split(" its keys")[1]) < 80
    msg = usage_error(ip, f"checkpoint load model {path} --map-location nope")
    assert "privateuseone" not in msg and "such as cpu, cuda" in msg and len(msg) <= 100, msg


def test_checkpoint_of_a_submodule_is_recognised(ip, tmp_path):
    """A file saved from model.features does not match the whole model: the refusal says which
    part of the model it belongs to."""
    src, dst = nn.Sequential(small(), nn.Linear(2, 2)), nn.Sequential(other(), nn.Linear(2, 2))
    path = tmp_path / "part.pt"
    save_checkpoint(src[0], path)
    ip.user_ns["dst"] = dst
    msg = usage_error(ip, f"checkpoint load dst {path}")
    assert "the file holds dst[0] only, so load it into dst[0]" in msg, msg
    run(ip, f"checkpoint load dst[0] {path}")
    assert same_values(src[0], dst[0])


def test_extra_bare_word_suggests_quoting(ip, tmp_path) -> None:
    from IPython.core.error import UsageError

    ip.user_ns["m"] = torch.nn.Linear(2, 2)
    path = tmp_path / "m.pt"
    with pytest.raises(UsageError) as info:
        ip.run_line_magic("checkpoint", f"save m {path} --extra note=warmup")
    msg = str(info.value)
    assert "quote text: note='warmup'" in msg and "\n" not in msg
    assert not path.exists()
    ip.run_line_magic("checkpoint", f"save m {path} --extra note='warmup' epoch=3")
    assert torch.load(path, weights_only=True)["note"] == "warmup"


def test_unsafe_load_of_a_non_state_dict_still_says_code_ran(tmp_path) -> None:
    """--unsafe on a file that holds no state dict: the error also says the pickle's code ran."""
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(TorchMagicError) as info:
        load_checkpoint(torch.nn.Linear(2, 2), path, weights_only=False)
    msg = str(info.value)
    assert "not a state dict" in msg and "weights_only=False" in msg and "\n" not in msg
    with pytest.raises(TorchMagicError) as safe:
        load_checkpoint(torch.nn.Linear(2, 2), path)
    assert "weights_only=False" not in str(safe.value)


# -- issue 11: all-or-nothing loads -----------------------------------------------------------------
def _stepped(model: nn.Module, params=None, cls=torch.optim.Adam, **kw):  # noqa: ANN001
    """``model`` and an optimizer over ``params`` (default: its parameters) after one step."""
    opt = cls(model.parameters() if params is None else params, **{"lr": 0.01, **kw})
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    return model, opt


def _model_and_adam():
    return _stepped(other())


def _refused_unchanged(ip, tmp_path, model, opt, payload, words):
    path = tmp_path / "c.pt"
    torch.save(payload, path)
    ip.user_ns.update(model=model, opt=opt)
    snap = Snapshot.take(model, opt=opt)
    msg = usage_error(ip, f"checkpoint load model {path}" + (" --optimizer opt" if opt else ""))
    assert words in msg, msg
    assert "partly loaded" not in msg
    snap.assert_unchanged()
    return msg


def _sgd_momentum_state(adam):  # noqa: ANN001
    return _stepped(small(), cls=torch.optim.SGD, momentum=0.9)[1].state_dict()


def _state_as_list(adam):  # noqa: ANN001
    bad = adam.state_dict()
    bad["state"] = list(bad["state"].values())
    return bad


def _state_of_another_model(adam):  # noqa: ANN001
    """As many tensors, other shapes (reported as loaded before, then opt.step() failed)."""
    shuffled = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    # the same number of parameters (4 + 2 BN), in another order: shapes differ per index
    params = [shuffled[3].weight, shuffled[3].bias, shuffled[0].weight, shuffled[0].bias,
              shuffled[1].weight, shuffled[1].bias]
    return _stepped(shuffled, params)[1].state_dict()


def _groups_without_lr_and_betas(adam):  # noqa: ANN001
    bad = adam.state_dict()
    for g in bad["param_groups"]:
        del g["lr"], g["betas"]
    return bad


@pytest.mark.parametrize("payload,words", [
    (_sgd_momentum_state, "cannot take the checkpoint's optimizer state (KeyError"),
    (_state_as_list, "optimizer state is list, not a dict"),
    (_state_of_another_model, "state saved for another model"),
    (_groups_without_lr_and_betas, "lacks betas, lr, which opt (Adam) needs to step"),
], ids=["sgd-momentum-into-adam", "state-list", "another-model", "no-lr-betas"])
def test_bad_optimizer_state_is_refused_before_anything_changes(ip, tmp_path, payload, words):
    model, adam = _model_and_adam()
    _refused_unchanged(ip, tmp_path, model, adam,
                       {"model": small().state_dict(), "optimizer": payload(adam)}, words)
    model(torch.randn(5, 4)).sum().backward()
    adam.step()  # the real optimizer still steps


@pytest.mark.filterwarnings("ignore::UserWarning")  # quantized tensors are deprecated
@pytest.mark.parametrize("make,words", [
    (lambda t: t.to_sparse(), "sparse_coo layout"),
    (lambda t: torch.empty_like(t, device="meta"), "a meta tensor"),
    (lambda t: torch.quantize_per_tensor(t.float(), 0.1, 0, torch.quint8), "quantized tensor"),
], ids=["sparse", "meta", "quantized"])
def test_last_tensor_that_cannot_be_copied_is_refused_first(ip, tmp_path, make, words):
    state = small().state_dict()
    last = list(state)[-3]  # 3.weight: a float parameter near the end
    state[last] = make(state[last])
    model = other()
    _refused_unchanged(ip, tmp_path, model, None, state, words)


class FailsForReal(nn.Linear):
    """Loads fine on the meta twin, fails half-way on the real model (after other modules)."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001, ANN002
        if not self.weight.is_meta:
            raise RuntimeError("the disk went away")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def test_failure_half_way_puts_model_and_optimizer_back_bitwise(tmp_path):
    path = tmp_path / "c.pt"
    torch.manual_seed(4)
    save_checkpoint(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), path)
    model = nn.Sequential(nn.Linear(4, 4), FailsForReal(4, 4))
    snap = Snapshot.take(model)
    with pytest.raises(TorchMagicError) as err:
        load_checkpoint(model, path)
    assert "put back as they were" in str(err.value) and "the disk went away" in str(err.value)
    snap.assert_unchanged()  # model[0] had been loaded: it is back


def test_optimizer_failure_after_the_model_loaded_is_undone(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    src = small()
    src_opt = torch.optim.Adam(src.parameters())
    src(torch.randn(5, 4)).sum().backward()
    src_opt.step()
    save_checkpoint(src, path, optimizer=src_opt)
    model, adam = _model_and_adam()
    snap = Snapshot.take(model, adam=adam)

    def broken(state):
        adam.state.clear()  # half-way: the state is already gone when it fails
        raise RuntimeError("half-way")

    monkeypatch.setattr(adam, "load_state_dict", broken)
    with pytest.raises(TorchMagicError, match="put back as they were"):
        load_checkpoint(model, path, optimizer=adam)
    monkeypatch.undo()
    snap.assert_unchanged()


def test_good_optimizer_load_still_works(tmp_path):
    path = tmp_path / "c.pt"
    src = small()
    src_opt = torch.optim.AdamW(src.parameters(), lr=0.02)
    src(torch.randn(5, 4)).sum().backward()
    src_opt.step()
    save_checkpoint(src, path, optimizer=src_opt)
    model, adam = other(), torch.optim.AdamW(other().parameters())
    adam = torch.optim.AdamW(model.parameters())
    load_checkpoint(model, path, optimizer=adam)
    assert adam.param_groups[0]["lr"] == 0.02
    assert torch.equal(adam.state[model[0].weight]["exp_avg"], src_opt.state[src[0].weight]["exp_avg"])


# -- issue 11: what the file is ----------------------------------------------------------------------
def _files(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(small().state_dict(), good)
    legacy = tmp_path / "legacy.pt"
    torch.save(small().state_dict(), legacy, _use_new_zipfile_serialization=False)
    import zipfile

    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("notes.txt", "not a checkpoint")
    (tmp_path / "text.pt").write_text("epoch 3, loss 0.1\n")
    (tmp_path / "pk.pt").write_bytes(b"PK" + bytes(range(200)))
    (tmp_path / "rand.pt").write_bytes(b"\x80\x02" + bytes((i * 37 + 11) % 256 for i in range(300)))
    (tmp_path / "cut_legacy.pt").write_bytes(legacy.read_bytes()[: legacy.stat().st_size // 2])
    return {
        "text.pt": "is not a torch.save checkpoint (a text file",
        "pk.pt": "truncated or corrupt",
        "other.zip": "a zip archive but not a torch.save checkpoint (no data.pkl inside",
        "rand.pt": "is corrupt or truncated",
        "cut_legacy.pt": "ends too early (a truncated legacy",
    }


def test_files_that_are_not_checkpoints_say_what_they_are(ip, tmp_path):
    files = _files(tmp_path)
    ip.user_ns["model"] = other()
    snap = Snapshot.take(ip.user_ns["model"])
    for name, words in files.items():
        msg = usage_error(ip, f"checkpoint load model {tmp_path / name}")
        assert words in msg, (name, msg)
        assert "arbitrary code" not in msg and "Error: pop" not in msg, (name, msg)
    msg = usage_error(ip, "checkpoint load model /dev/zero")
    assert "not a regular file: it is a character device" in msg
    snap.assert_unchanged()


FIFO_CHILD = r"""
import os, sys, torch, torch.nn as nn
from torchmagic.core.checkpoint import load_checkpoint, save_checkpoint
path = sys.argv[1]
os.mkfifo(path)
for fn in (lambda: load_checkpoint(nn.Linear(2, 2), path),
           lambda: save_checkpoint(nn.Linear(2, 2), path)):
    try:
        fn()
    except Exception as exc:
        print(type(exc).__name__, exc)
"""


def test_fifo_is_refused_without_being_opened(tmp_path):
    import subprocess

    proc = subprocess.run([sys.executable, "-c", FIFO_CHILD, str(tmp_path / "pipe")],
                          capture_output=True, text=True, timeout=60)
    lines = proc.stdout.splitlines()
    assert len(lines) == 2, (proc.stdout, proc.stderr[-500:])
    assert "is not a regular file: it is a FIFO" in lines[0]
    assert "not a regular file" in lines[1] and "nothing was written" in lines[1]


# -- issue 11: saves that fail say so in one line; symlinks --------------------------------------------
def test_unpicklable_extras_and_buffers_are_one_line_and_keep_the_old_file(ip, tmp_path):
    path = tmp_path / "c.pt"
    model = small()
    save_checkpoint(model, path)
    before = path.read_bytes()
    ip.user_ns.update(model=model, gen=(i for i in range(3)), fn=lambda x: x)
    assert "--extra g is a generator, which pickle cannot write" in usage_error(
        ip, f"checkpoint save model {path} --extra g=gen")
    assert "--extra f is a function" in usage_error(ip, f"checkpoint save model {path} --extra f=fn")
    model.register_buffer("fast", torch.zeros(2, 3).to_mkldnn())
    assert "model.fast is _mkldnn layout, which torch.save cannot write" in usage_error(
        ip, f"checkpoint save model {path}")
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["c.pt"]


class _Failing:
    """A file object whose writes fail like a full disk (or send Ctrl-C to the process)."""

    def __init__(self, f, how):  # noqa: ANN001
        self.f, self.how, self.n = f, how, 0

    def write(self, data):  # noqa: ANN001
        self.n += 1
        if self.n > 2:
            if self.how == "sigint":
                os.kill(os.getpid(), signal.SIGINT)
            else:
                raise OSError(28, "No space left on device")
        return self.f.write(data)

    def __getattr__(self, name):  # noqa: ANN001
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):  # noqa: ANN002
        return self.f.__exit__(*exc)


@pytest.mark.parametrize("how", ["full", "sigint"])
def test_full_disk_and_ctrl_c_inside_torch_writer(tmp_path, monkeypatch, how):
    import torchmagic.core.checkpoint_io as cio

    path = tmp_path / "c.pt"
    save_checkpoint(small(), path)
    before = path.read_bytes()
    real = os.fdopen
    monkeypatch.setattr(cio.os, "fdopen", lambda fd, mode: _Failing(real(fd, mode), how))
    big = nn.Linear(256, 256)
    if how == "full":
        with pytest.raises(TorchMagicError, match="the write failed"):
            save_checkpoint(big, path)
    else:
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(big, path)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_extra_whose_repr_raises_is_shown(ip, tmp_path):
    class Shy:
        def __repr__(self):
            raise RuntimeError("no repr")

        def __reduce__(self):
            return (int, (3,))

    ip.user_ns.update(model=small(), w=Shy())
    _, shown = run(ip, f"checkpoint save model {tmp_path / 'c.pt'} --extra w=w")
    assert "w=<Shy>" in shown


def test_save_through_a_symlink_replaces_its_target_atomically(tmp_path):
    real = tmp_path / "store" / "real.pt"
    real.parent.mkdir()
    save_checkpoint(small(), real)
    link = tmp_path / "latest.pt"
    link.symlink_to(real)
    save_checkpoint(other(), link)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert same_values(other(), _loaded(real))
    assert sorted(p.name for p in real.parent.iterdir()) == ["real.pt"]  # no temp file left
    dangling = tmp_path / "new.pt"
    dangling.symlink_to(tmp_path / "store" / "fresh.pt")
    save_checkpoint(small(), dangling)
    assert dangling.is_symlink() and same_values(small(), _loaded(tmp_path / "store" / "fresh.pt"))


def test_device_node_and_fifo_targets_are_refused(tmp_path):
    """Never aimed at the real /dev/null: a broken save would replace it by a regular file (a
    rename over a device node works for root). The nodes here live in tmp_path."""
    import stat

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    targets = [fifo]
    try:
        os.mknod(tmp_path / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        targets.append(tmp_path / "null")
    except (PermissionError, OSError):  # not root: the FIFO and its link are checked
        pass
    for target in targets:
        link = tmp_path / f"{target.name}.pt"
        link.symlink_to(target)
        for path in (target, link):
            with pytest.raises(TorchMagicError, match="not a regular file"):
                save_checkpoint(small(), path)
        kind = stat.S_IFMT(os.stat(target).st_mode)
        assert kind in (stat.S_IFIFO, stat.S_IFCHR) and link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [t.name for t in targets] + [f"{t.name}.pt" for t in targets])


@pytest.mark.filterwarnings("ignore::UserWarning")  # nested tensors are a prototype
def test_file_holding_a_nested_tensor(ip, tmp_path):
    nt = torch.nested.nested_tensor([torch.zeros(2), torch.zeros(3)])
    model = nn.Linear(2, 3)
    state = model.state_dict()
    state["weight"] = nt
    torch.save(state, tmp_path / "in_state.pt")
    torch.save({"model": nn.Linear(2, 3).state_dict(), "nt": nt}, tmp_path / "in_extras.pt")
    ip.user_ns["model"] = model
    snap = Snapshot.take(model)
    with pytest.raises(UsageError, match="1 shape mismatch"):
        run(ip, f"checkpoint load model {tmp_path / 'in_state.pt'}")
    snap.assert_unchanged()
    _, shown = run(ip, f"checkpoint load model {tmp_path / 'in_extras.pt'}")
    assert "nt=tensor(2, 'ragged')" in shown


def test_failure_beyond_the_backup_budget_says_so(tmp_path, monkeypatch):
    import torchmagic.core.checkpoint_check as check

    monkeypatch.setattr(check, "BACKUP_BYTES", 16)
    path = tmp_path / "c.pt"
    save_checkpoint(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), path)
    with pytest.raises(TorchMagicError, match="may be partly loaded .too large to back up"):
        load_checkpoint(nn.Sequential(nn.Linear(4, 4), FailsForReal(4, 4)), path)


@pytest.mark.cuda
@requires_cuda
def test_cuda_half_way_failure_is_undone_bitwise(tmp_path):
    path = tmp_path / "c.pt"
    torch.manual_seed(5)
    save_checkpoint(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), path)
    model = nn.Sequential(nn.Linear(4, 4), FailsForReal(4, 4)).cuda()
    adam = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 4, device="cuda")).sum().backward()
    adam.step()
    snap = Snapshot.take(model, adam=adam)
    with pytest.raises(TorchMagicError, match="put back as they were"):
        load_checkpoint(model, path)
    snap.assert_unchanged()


def test_optimizer_with_state_of_a_removed_parameter_is_refused_in_one_line(ip, tmp_path):
    """Removing a parameter from an optimizer's groups but not its state makes torch's
    state_dict() raise KeyError: the save says why in one line and writes nothing."""
    from IPython.core.error import UsageError

    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(3, 4)).sum().backward()
    opt.step()
    first = net[0].weight
    for group in opt.param_groups:
        group["params"][:] = [p for p in group["params"] if p is not first]
    with pytest.raises(KeyError):
        opt.state_dict()  # torch's own failure, which the magic must not show as a traceback
    ip.user_ns.update(net=net, opt=opt)
    target = tmp_path / "c.pt"
    with pytest.raises(UsageError) as info:
        run(ip, f"checkpoint save net {target} --optimizer opt")
    msg = str(info.value)
    assert "keeps state for 1 parameter(s) that are in none of its param_groups" in msg
    assert "\n" not in msg and not target.exists()
