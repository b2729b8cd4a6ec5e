"""Rendering of ``%freeze`` / ``%unfreeze`` (:class:`FreezeReport`): the exact change, trainable
before/after, the BatchNorm and optimizer reminders. Widget: the HTML plus a trainable-share bar."""

from __future__ import annotations

from typing import Any

from torchmagic.display.format import exact, human_count, percent, text_width, wrap_text
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
        notes.append(
            f"WARNING: {_n(len(r.batchnorm), 'BatchNorm layer')} in the frozen part ({shown}{more}; "
            f"{r.batchnorm_training} in train mode now) still "
            f"update{'s' * (len(r.batchnorm) == 1)} running_mean/running_var "
            "in train mode; requires_grad does not stop that. To keep them fixed, put exactly "
            "these in eval mode after every model.train() (momentum=0 would keep the stored "
            "statistics, but a train-mode forward still normalises with batch statistics):")
        notes += batchnorm_code(r)
    if r.stale_grads:
        notes.append(f"WARNING: {_n(r.stale_grads, 'frozen parameter')} still "
                     f"hold{'s' * (r.stale_grads == 1)} a .grad from an "
                     "earlier backward; an optimizer keeps applying it (and momentum/weight "
                     "decay) until it is None. Clear the frozen ones:")
        notes += [f"    for p in {r.model}.parameters():",
                  "        if not p.requires_grad:",
                  "            p.grad = None"]
    for o in r.optimizers:
        if r.action == "freeze":
            notes.append(
                f"NOTE: optimizer {o.name} ({o.type_name}) holds {o.count} of the parameters "
                "just frozen; it skips them only while their .grad is None. Drop them and "
                "their state (momentum, Adam moments) from it; its settings and the state of "
                "the others are kept, and state_dict() stays valid:")
            notes += [f"    for group in {o.name}.param_groups:",
                      '        group["params"][:] = [p for p in group["params"] '
                      "if p.requires_grad]",
                      f"    for p in [p for p in {o.name}.state if not p.requires_grad]:",
                      f"        del {o.name}.state[p]"]
        else:
            notes.append(
                f"NOTE: optimizer {o.name} ({o.type_name}) does not hold {o.count} of the "
                "parameters just unfrozen: they get gradients but are never updated. Add them "
                f"as a new parameter group (with {o.name}'s default settings):")
            notes += [f'    held = {{id(q) for g in {o.name}.param_groups for q in g["params"]}}',
                      f'    {o.name}.add_param_group({{"params": [',
                      f"        p for p in {r.model}.parameters() "
                      "if p.requires_grad and id(p) not in held]})"]
    return notes


def batchnorm_code(r: Any, width: int | None = None) -> list[str]:
    """The code (note lines indented by 4) that puts exactly the frozen BatchNorm layers in eval
    mode: a loop over their paths, never over ``model.modules()`` (that would also fix layers
    left trainable)."""
    width = width or text_width()
    paths = ['""' if b == "(root)" else f'"{b}"' for b in r.batchnorm]
    root = r.model.split(".")[0].split("[")[0]
    var = "bn_path" if root != "bn_path" else "frozen_bn"  # never rebind the model's name
    head = f"    for {var} in ["
    lines, cur = [], head
    for i, item in enumerate(paths):
        piece = item + (", " if i < len(paths) - 1 else "]:")
        if cur != head and len(cur) + len(piece.rstrip()) > width:
            lines.append(cur.rstrip())
            cur = " " * len(head)
        cur += piece
    lines.append(cur)
    return [*lines, f"        {r.model}.get_submodule({var}).eval()"]


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
    width = text_width()
    t = _table(r)
    t.title = None
    head = wrap_text(_headline(r), width, "  ")
    t.notes = [line for n in t.notes for line in
               ([n] if n.startswith("    ") else wrap_text(n, width, "  "))]
    return "\n".join([*head, t.text(width)])


def html(r: Any) -> str:
    """The table, then the notes: warnings in the warning box, code as preformatted text."""
    return _table(r).html()


def widget(r: Any) -> Any:
    import ipywidgets as w

    te = r.total_elements or 1
    bar = (f'<span class="tm-bar" style="width:{300 * r.trainable_after / te:.1f}px"></span>'
           f'<span class="tm-bar" style="width:{300 * (te - r.trainable_after) / te:.1f}px;'
           f'background:#9ca3af"></span> trainable {percent(r.trainable_after, te)} after')
    return w.VBox([w.HTML(html(r)), w.HTML(html_block(None, bar))])
