"""Rendering of ``%freeze`` / ``%unfreeze`` (:class:`FreezeReport`): the exact change, trainable
before/after, the BatchNorm and optimizer reminders. Widget: the HTML plus a trainable-share bar."""

from __future__ import annotations

from typing import Any

from torchmagic.display.device import wrap
from torchmagic.display.format import esc, exact, human_count, percent
from torchmagic.display.table import Cell, Table, html_block

_MAX_LISTED = 10


def _headline(r: Any) -> str:
    what = ", ".join(r.targets)
    if r.excepted:
        what += " except " + ", ".join(r.excepted)
    verb = "froze" if r.action == "freeze" else "unfroze"
    return (f"{r.action} {what}: {verb} {_n(r.changed_params, 'parameter')} "
            f"({human_count(r.changed_elements)} elements) in "
            f"{_n(len(r.changed_modules), 'module')}")


def _n(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def _cnt(n: int, whole: int) -> Cell:
    return Cell(f"{human_count(n)} ({percent(n, whole)})", title=exact(n))


def _full(r: Any, path: str) -> str:
    """A module path relative to the model as the user writes it: ``cnn.features.0``."""
    if path in ("", "(root)"):
        return r.model
    return f"{r.model}.{path}"


def _notes(r: Any) -> list[str]:
    notes: list[str] = []
    if r.changed_modules:
        shown = ", ".join(_full(r, m) for m in r.changed_modules[:_MAX_LISTED])
        more = f", ... ({len(r.changed_modules) - _MAX_LISTED} more)" \
            if len(r.changed_modules) > _MAX_LISTED else ""
        notes.append(f"modules changed: {shown}{more}")
    for names in getattr(r, "tied_changed", []):
        verb = "frozen" if r.action == "freeze" else "unfrozen"
        notes.append(f"tied weights: {' = '.join(_full(r, n) for n in names)} is one tensor "
                     f"({verb} under every name)")
    for names in getattr(r, "tied_kept", []):
        notes.append(f"tied weights: {' = '.join(_full(r, n) for n in names)} is one tensor, "
                     "left as it was: one of "
                     "its names is under --except")
    if getattr(r, "uninitialized", 0):  # lazy modules (issue 12): no element count yet
        notes.append(f"{_n(r.uninitialized, 'uninitialized parameter')} of lazy modules: no "
                     "elements until the first forward (counted as 0 here); the flag stays when "
                     "it materializes them")
    if r.already:
        state = "frozen" if r.action == "freeze" else "trainable"
        notes.append(f"{_n(r.already, 'parameter')} in scope "
                     f"{'was' if r.already == 1 else 'were'} already {state} (unchanged)")
    if r.skipped_non_float:
        notes.append(f"{_n(r.skipped_non_float, 'integer parameter')} left as "
                     f"{'it is' if r.skipped_non_float == 1 else 'they are'} (only floating "
                     "point tensors can require gradients)")
    if r.batchnorm:
        shown = ", ".join(_full(r, b) for b in r.batchnorm[:_MAX_LISTED])
        more = ", ..." if len(r.batchnorm) > _MAX_LISTED else ""
        where = r.targets[0] if len(r.targets) == 1 else r.model
        notes.append(
            f"WARNING: {_n(len(r.batchnorm), 'BatchNorm layer')} in the frozen part ({shown}{more}; "
            f"{r.batchnorm_training} in train mode now) still "
            f"update{'s' * (len(r.batchnorm) == 1)} running_mean/running_var "
            "in train mode; requires_grad does not stop that. To keep them fixed, put them in "
            "eval mode after every model.train() (momentum=0 would keep the stored statistics, "
            "but a train-mode forward still normalises with batch statistics):")
        # The loop variable must not shadow the user's model (a model named ``m`` is common).
        var = "layer" if where.split(".")[0] == "mod" else "mod"
        notes += [f"    for {var} in {where}.modules():",
                  f"        if isinstance({var}, nn.modules.batchnorm._BatchNorm):",
                  f"            {var}.eval()"]
    if r.stale_grads:
        notes.append(f"WARNING: {_n(r.stale_grads, 'frozen parameter')} still "
                     f"hold{'s' * (r.stale_grads == 1)} a .grad from an "
                     "earlier backward; an optimizer keeps applying it (and momentum/weight "
                     f"decay) until it is None: {r.model}.zero_grad(set_to_none=True)")
    for o in r.optimizers:
        if r.action == "freeze":
            notes.append(
                f"NOTE: optimizer {o.name} ({o.type_name}) was built with {o.count} of the "
                "parameters just frozen; it skips them only while their .grad is None. Build it "
                "from the trainable ones:")
        else:
            notes.append(
                f"NOTE: optimizer {o.name} ({o.type_name}) does not hold {o.count} of the "
                "parameters just unfrozen: they get gradients but are never updated. Rebuild it "
                f"(or use {o.name}.add_param_group):")
        notes.append(f"    {o.name} = torch.optim.{o.type_name}(filter(lambda p: p.requires_grad, "
                     f"{r.model}.parameters()), ...)")
    return notes


def _table(r: Any) -> Table:
    te = r.total_elements
    rows = [
        ["trainable elements", _cnt(r.trainable_before, te), _cnt(r.trainable_after, te)],
        ["frozen elements", _cnt(te - r.trainable_before, te), _cnt(te - r.trainable_after, te)],
        ["trainable tensors", f"{r.trainable_params_before} of {r.total_params}",
         f"{r.trainable_params_after} of {r.total_params}"],
    ]
    return Table(headers=[r.model, "before", "after"], rows=rows, align=["l", "r", "r"],
                 title=_headline(r), notes=_notes(r))


def text(r: Any) -> str:
    t = _table(r)
    t.title = None
    head = wrap(_headline(r))
    t.notes = [line for n in t.notes for line in wrap(n)]
    return "\n".join([*head, t.text()])


def html(r: Any) -> str:
    t = _table(r)
    notes, t.notes = t.notes, []
    parts: list[str] = []
    code: list[str] = []
    for n in [*notes, ""]:
        if n.startswith("    "):
            code.append(n[4:])
            continue
        if code:
            parts.append(f'<pre class="tm-mono">{esc(chr(10).join(code))}</pre>')
            code = []
        if n:
            warn = " tm-warn" if n.startswith(("WARNING", "NOTE")) else ""
            parts.append(f'<div class="tm-note{warn}">{esc(n)}</div>')
    extra = "".join(parts)
    return t.html(extra_html=extra)


def widget(r: Any) -> Any:
    import ipywidgets as w

    te = r.total_elements or 1
    bar = (f'<span class="tm-bar" style="width:{300 * r.trainable_after / te:.1f}px"></span>'
           f'<span class="tm-bar" style="width:{300 * (te - r.trainable_after) / te:.1f}px;'
           f'background:#9ca3af"></span> trainable {percent(r.trainable_after, te)} after')
    return w.VBox([w.HTML(html(r)), w.HTML(html_block(None, bar))])
