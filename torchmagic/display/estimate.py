"""Rendering of :class:`torchmagic.core.estimate.MemoryEstimate` (``%estimate`` / ``%%estimate``).

- text (fits :func:`~torchmagic.display.format.text_width`): the peak and where it happened, the
  bytes by kind with bars, a one-line sparkline of the timeline with a phase ruler under it, the
  modules holding the most activation memory, the verdict (or every accelerator's), the
  alternatives and the largest batch that fits;
- HTML (self-contained, no JavaScript): the same, with a stacked bar of the kinds and the timeline
  as an inline SVG stacked by kind, phases shaded, the usable memory as a dashed line; exact byte
  counts and the sources of the memory figures on hover. No widget: nothing here is live.
"""

from __future__ import annotations

from typing import Any

from torchmagic.display.format import (
    esc,
    exact,
    human_bytes,
    human_count,
    percent,
    text_width,
    wrap_line,
)
from torchmagic.display.table import Cell, Table, html_block

KIND_LABELS = {"parameters": "parameters", "buffers": "buffers", "gradients": "gradients",
               "optimizer_state": "optimizer state", "activations": "activations",
               "temporaries": "temporaries", "inputs": "inputs / other"}
KIND_COLORS = {"parameters": "#3b82f6", "buffers": "#64748b", "gradients": "#f59e0b",
               "optimizer_state": "#8b5cf6", "activations": "#10b981", "temporaries": "#ef4444",
               "inputs": "#06b6d4"}
PHASE_LETTER = {"start": "s", "forward": "f", "loss": "l", "backward": "b", "optimizer step": "o"}
SPARK = "▁▂▃▄▅▆▇█"


def _b(n: int | None) -> Cell:
    return Cell(human_bytes(n), f"{exact(n)} bytes" if n is not None else None)


# -- shared wording ------------------------------------------------------------------------------
def title(e: Any) -> str:
    if e.what == "cell":
        parts = [e.settings[k] for k in ("models", "optimizers") if k in e.settings]
        return "Memory estimate of the cell" + (f": {'; '.join(parts)}" if parts else "")
    parts = [f"{e.model} ({e.model_class}, {human_count(e.params)} params)" if e.model_class
             else e.model, e.what]
    s = e.settings
    for key in ("optimizer", "weights", "autocast", "checkpointing"):
        if key in s:
            parts.append(s[key] if key != "autocast" else f"autocast {s[key]}")
    if e.batch is not None:
        parts.append(f"batch {e.batch}")
    return "Memory estimate: " + ", ".join(parts)


def time_line(e: Any) -> str:
    """``8,545 ops, 2.71 s`` (the step reported), then the alternatives' and the batch search's
    traces, each with its own time, and the whole when there are more."""
    first = getattr(e, "trace_seconds", 0.0) or e.seconds
    parts = [f"{e.ops:,} ops, {first:.2f} s"]
    for n, secs, what in ((getattr(e, "whatif_traces", 0), getattr(e, "whatif_seconds", 0.0),
                           "what-if"),
                          (getattr(e, "batch_traces", 0), getattr(e, "batch_seconds", 0.0),
                           "batch search")):
        if n:
            parts.append(f"{what}: {n} more trace{'s' if n != 1 else ''}, {secs:.2f} s")
    if len(parts) > 1:
        parts.append(f"{e.seconds:.2f} s in all")
    return "; ".join(parts)


MARKS = {"step from base": "†", "optimizer swapped": "‡", "arithmetic": "*"}


def alternatives_legend(e: Any) -> str:
    """What the marks of the what-if table mean (only those used)."""
    used = {getattr(a, "how", "traced" if a.traced else "arithmetic") for a in e.alternatives}
    from torchmagic.core.estimate_whatif import HOW

    bits = ["traced on fake tensors"] if "traced" in used else []
    bits += [f"{MARKS[h]} {HOW[h]}" for h in MARKS if h in used]
    return "; ".join(bits)


def peak_line(e: Any) -> str:
    where = f" in {e.peak_phase}" if e.peak_phase else ""
    at = []
    if e.peak_op:
        at.append(e.peak_op)
    if e.peak_module:
        at.append(f"module {e.peak_module}")
    return f"Peak: {human_bytes(e.peak_bytes)}{where}" + (f" ({', '.join(at)})" if at else "")


def verdict_text(v: Any) -> str:
    cap = v.capacity
    head = (f"{cap.name}: {human_bytes(cap.total)}, {human_bytes(cap.reserve)} reserved -> "
            f"{human_bytes(cap.usable)} usable")
    if v.fits:
        return f"FITS on {head}; {human_bytes(v.margin)} spare"
    return f"DOES NOT FIT on {head}; needs {human_bytes(v.margin)} more"


def _alt_verdict(a: Any, usable: int | None) -> str:
    if a.fits is None or usable is None:
        return "-"
    if a.fits:
        return f"fits, {human_bytes(usable - a.peak_bytes)} spare"
    return f"needs {human_bytes(a.peak_bytes - usable)} more"


def _usable(e: Any) -> int | None:
    return e.verdict.capacity.usable if e.verdict is not None else None


def fits_on_summary(e: Any) -> tuple[list[str], list[str]]:
    ok = [v.capacity.name.replace("NVIDIA ", "").replace("AMD ", "") for v in e.fits_on
          if v.fits]
    no = [f"{v.capacity.name.replace('NVIDIA ', '').replace('AMD ', '')} (needs "
          f"{human_bytes(v.margin)} more)" for v in e.fits_on if not v.fits]
    return ok, no


def sparkline(values: list[int], phases: list[str], width: int) -> tuple[str, str]:
    """A one-line sparkline of ``values`` resampled to ``width`` columns (each the largest value
    it covers) and the phase letter of each column."""
    if not values:
        return "", ""
    n = len(values)
    cols = max(1, min(width, n))
    top = max(values) or 1
    spark, ruler = [], []
    for c in range(cols):
        lo, hi = c * n // cols, max(c * n // cols + 1, (c + 1) * n // cols)
        i = max(range(lo, hi), key=lambda j: values[j])
        spark.append(SPARK[min(len(SPARK) - 1, int(values[i] / top * (len(SPARK) - 1) + 0.5))])
        ruler.append(PHASE_LETTER.get(phases[i], "?") if phases else " ")
    return "".join(spark), "".join(ruler)


def _kinds_table(e: Any, bar_width: int) -> Table:
    rows = []
    for k, label in KIND_LABELS.items():
        v = e.by_kind.get(k, 0)
        row: list[object] = [label, _b(v), percent(v, e.peak_bytes) if v else "-"]
        if bar_width:
            row.append("█" * int(round(bar_width * v / e.peak_bytes)) if e.peak_bytes else "")
        rows.append(row)
    headers = ["at the peak", "bytes", "%"] + ([""] if bar_width else [])
    return Table(headers, rows, align=["l", "r", "r", "l"],
                 footer=[("Total (peak)", _b(e.peak_bytes))])


def _top_table(e: Any) -> Table:
    rows = [[r.module, f"×{r.count}" if r.count > 1 else "", _b(r.bytes) if r.count > 1 else "",
             _b(r.total), percent(r.total, e.activation_peak)] for r in e.top_activations]
    return Table(["module", "blocks", "each", "activations", "%"], rows,
                 align=["l", "r", "r", "r", "r"], clip_middle=[0])


def _block_table(e: Any) -> Table:
    rows = [[r.module, _b(r.bytes), percent(r.bytes, e.block_bytes)]
            for r in e.block_activations]
    return Table([f"inside {e.block}", "activations", "%"], rows, align=["l", "r", "r"],
                 clip_middle=[0])


def _alt_table(e: Any) -> Table:
    usable = _usable(e)
    rows = []
    for a in e.alternatives:
        mark = MARKS.get(getattr(a, "how", "traced" if a.traced else "arithmetic"), "")
        change = a.change + (f" {mark}" if mark else "")
        css = None if a.fits is None else ("tm-good" if a.fits else "tm-bad")
        rows.append([change, a.option, _b(a.peak_bytes), Cell(_alt_verdict(a, usable), css=css)])
    return Table(["what if", "how", "peak", "verdict"], rows, align=["l", "l", "r", "l"])


# -- text ----------------------------------------------------------------------------------------
def text(e: Any) -> str:
    width = text_width()
    out: list[str] = []
    out.extend(wrap_line(title(e), width))
    s = e.settings
    info = [f"{k} {v}" for k, v in s.items() if k in ("inputs", "loss", "traced on")]
    info.append(time_line(e))
    out.extend(wrap_line("  " + "; ".join(info), width))
    out.extend(wrap_line(peak_line(e), width))
    out.append(_kinds_table(e, max(10, min(30, width - 45))).text(width))
    if e.timeline:
        spark, ruler = sparkline(e.timeline, e.timeline_phase, max(20, min(80, width - 12)))
        out.append(f"Timeline  {spark}")
        letters = [f"{PHASE_LETTER[p]} {p}" for p in PHASE_LETTER if p in e.timeline_phase]
        out.append(f"          {ruler}")
        phases = ", ".join(f"{p} {human_bytes(v)}" for p, v in e.phase_peaks.items())
        out.extend(wrap_line(f"  ({', '.join(letters)}); peak by phase: {phases}", width))
    if e.top_activations:
        out.extend(wrap_line(f"Activations at their peak ({human_bytes(e.activation_peak)}, "
                             f"in {e.activation_peak_phase}): top modules", width))
        out.append(_top_table(e).text(width))
        if e.block_activations:
            out.append(_block_table(e).text(width))
    out.extend(_verdict_lines(e, width))
    if e.alternatives:
        out.extend(wrap_line(f"What would change it ({alternatives_legend(e)}):", width))
        out.append(_alt_table(e).text(width))
    out.extend(_batch_lines(e, width))
    for n in e.notes:
        out.extend(wrap_line(f"Note: {n}", width))
    return "\n".join(out)


def _verdict_lines(e: Any, width: int) -> list[str]:
    out: list[str] = []
    if e.verdict is not None:
        out.extend(wrap_line(verdict_text(e.verdict), width))
        out.extend(wrap_line(f"  memory: {e.verdict.capacity.source}; reserve: "
                             f"{e.verdict.capacity.reserve_source}", width))
    elif e.fits_on:
        reserve = human_bytes(e.fits_on[0].capacity.reserve)
        ok, no = fits_on_summary(e)
        out.extend(wrap_line(f"Fits on (peak + {reserve} reserve): "
                             f"{', '.join(ok) if ok else 'none of the accelerators known'}",
                             width))
        if no:
            out.extend(wrap_line(f"Does not fit on: {', '.join(no)}", width))
        out.extend(wrap_line("  (no CUDA device here: give --device NAME or --memory SIZE for one "
                             "verdict; memory of one PyTorch device, as "
                             "torch.cuda.get_device_properties reports it)", width))
    return out


def _batch_lines(e: Any, width: int) -> list[str]:
    if e.max_batch is None:
        return []
    tried = ", ".join(f"{b}: {human_bytes(p)}" for b, p in e.batch_trials)
    if e.max_batch == 0:
        head = "Largest batch that fits: none (batch 1 does not fit)"
    else:
        peak = dict(e.batch_trials).get(e.max_batch)
        head = f"Largest batch that fits: {e.max_batch}" + (
            f" (peak {human_bytes(peak)})" if peak is not None else "")
    return wrap_line(f"{head}; traced batches {tried}", width)


# -- html ----------------------------------------------------------------------------------------
def _stacked_bar(e: Any, width: int = 420) -> str:
    if not e.peak_bytes:
        return ""
    parts = []
    for k, label in KIND_LABELS.items():
        v = e.by_kind.get(k, 0)
        if not v:
            continue
        w = width * v / e.peak_bytes
        parts.append(f'<span title="{esc(label)}: {esc(human_bytes(v))} ({exact(v)} bytes)" '
                     f'style="display:inline-block;height:14px;width:{w:.1f}px;'
                     f'background:{KIND_COLORS[k]}"></span>')
    return (f'<div style="display:flex;width:{width}px;border-radius:3px;overflow:hidden;'
            f'margin:4px 0 6px 0">{"".join(parts)}</div>')


def _legend() -> str:
    items = [f'<span style="display:inline-block;width:10px;height:10px;border-radius:2px;'
             f'background:{KIND_COLORS[k]};margin:0 3px 0 10px;vertical-align:middle"></span>'
             f'{esc(label)}' for k, label in KIND_LABELS.items()]
    return f'<div class="tm-muted" style="font-size:12px">{"".join(items)}</div>'


def timeline_svg(e: Any, width: int = 640, height: int = 170) -> str:
    """The timeline as an inline SVG: live bytes stacked by kind, phases shaded and labelled,
    the usable memory dashed (when there is a verdict), the peak marked."""
    n = len(e.timeline)
    if n == 0:
        return ""
    usable = _usable(e)
    peak = max(e.timeline) or 1
    shown_usable = usable if usable is not None and usable <= 1.6 * peak else None
    top = max(peak, shown_usable or 0)
    left, right, up, down = 58, 8, 18, 20
    pw, ph = width - left - right, height - up - down

    def x(i: float) -> float:
        return left + (pw * i / max(1, n - 1) if n > 1 else pw / 2)

    def y(v: float) -> float:
        return up + ph - ph * v / top

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="memory timeline" '
           'style="font-size:10px;fill:currentColor;margin:4px 0">']
    # phases
    start = 0
    for i in range(1, n + 1):
        if i == n or e.timeline_phase[i] != e.timeline_phase[start]:
            phase = e.timeline_phase[start]
            x0, x1 = x(start) - (pw / max(1, n - 1)) / 2, x(i - 1) + (pw / max(1, n - 1)) / 2
            x0, x1 = max(left, x0), min(left + pw, x1)
            if phase in ("backward", "loss"):
                out.append(f'<rect x="{x0:.1f}" y="{up}" width="{max(0.0, x1 - x0):.1f}" '
                           f'height="{ph}" fill="rgba(127,127,127,.10)"/>')
            if x1 - x0 > 40:
                out.append(f'<text x="{(x0 + x1) / 2:.1f}" y="{up - 5}" text-anchor="middle" '
                           f'opacity=".7">{esc(phase)}</text>')
            start = i
    # stacked areas
    base = [0] * n
    for k in KIND_LABELS:
        series = e.timeline_kinds.get(k) or [0] * n
        if not any(series):
            continue
        upper = [b + v for b, v in zip(base, series)]
        pts = [f"{x(i):.1f},{y(upper[i]):.1f}" for i in range(n)]
        pts += [f"{x(i):.1f},{y(base[i]):.1f}" for i in reversed(range(n))]
        out.append(f'<polygon points="{" ".join(pts)}" fill="{KIND_COLORS[k]}" '
                   f'fill-opacity=".8" stroke="none"><title>{esc(KIND_LABELS[k])}</title>'
                   '</polygon>')
        base = upper
    # axes, capacity, peak
    out.append(f'<line x1="{left}" y1="{up + ph}" x2="{left + pw}" y2="{up + ph}" '
               'stroke="currentColor" stroke-opacity=".4"/>')
    for frac in (0.0, 0.5, 1.0):
        v = top * frac
        out.append(f'<text x="{left - 4}" y="{y(v) + 3:.1f}" text-anchor="end" opacity=".7">'
                   f'{esc(human_bytes(v))}</text>')
    if shown_usable is not None:
        out.append(f'<line x1="{left}" y1="{y(shown_usable):.1f}" x2="{left + pw}" '
                   f'y2="{y(shown_usable):.1f}" stroke="#dc2626" stroke-dasharray="4 3"><title>'
                   f'usable memory {esc(human_bytes(shown_usable))}</title></line>')
    elif usable is not None:
        out.append(f'<text x="{left + pw}" y="{height - 5}" text-anchor="end" opacity=".7">'
                   f'usable memory {esc(human_bytes(usable))} (above the scale)</text>')
    ip = max(range(n), key=lambda i: e.timeline[i])
    out.append(f'<circle cx="{x(ip):.1f}" cy="{y(e.timeline[ip]):.1f}" r="3" fill="currentColor">'
               f'<title>peak {esc(human_bytes(e.peak_bytes))} in {esc(e.peak_phase)}</title>'
               '</circle>')
    out.append(f'<text x="{left}" y="{height - 5}" opacity=".7">{e.ops:,} ops traced</text>')
    out.append("</svg>")
    return "".join(out)


def html(e: Any) -> str:
    s = e.settings
    info = "; ".join(f"{k} {v}" for k, v in s.items() if k in ("inputs", "loss", "traced on"))
    parts = [f'<div class="tm-muted">{esc(info)}; {esc(time_line(e))}</div>',
             f'<div class="tm-kv" style="margin-top:6px;font-size:14px"><b>'
             f'{esc(peak_line(e))}</b></div>', _stacked_bar(e), _legend(),
             _kinds_table(e, 0).html(), timeline_svg(e)]
    if e.phase_peaks:
        phases = ", ".join(f"{p} {human_bytes(v)}" for p, v in e.phase_peaks.items())
        parts.append(f'<div class="tm-muted">peak by phase: {esc(phases)}</div>')
    if e.top_activations:
        parts.append(f'<details open><summary>Activations at their peak '
                     f'({esc(human_bytes(e.activation_peak))}, in '
                     f'{esc(e.activation_peak_phase)}): top modules</summary>'
                     f'{_top_table(e).html()}'
                     f'{_block_table(e).html() if e.block_activations else ""}</details>')
    parts.append(_verdict_html(e))
    if e.alternatives:
        parts.append('<div class="tm-title" style="margin-top:8px">What would change it '
                     f'<span class="tm-muted">({esc(alternatives_legend(e))})</span></div>')
        parts.append(_alt_table(e).html())
        for a in e.alternatives:
            if a.note:
                mark = MARKS.get(getattr(a, "how", "arithmetic"), "*")
                parts.append(f'<div class="tm-note tm-muted">{mark} {esc(a.change)}: '
                             f'{esc(a.note)}</div>')
    for line in _batch_lines(e, 10_000):
        parts.append(f'<div class="tm-note"><b>{esc(line)}</b></div>')
    for n in e.notes:
        parts.append(f'<div class="tm-note tm-muted">Note: {esc(n)}</div>')
    return html_block(title(e), "".join(parts))


def _verdict_html(e: Any) -> str:
    if e.verdict is not None:
        v = e.verdict
        css = "tm-good" if v.fits else "tm-bad"
        tip = f"{v.capacity.source}; reserve: {v.capacity.reserve_source}"
        return (f'<div class="tm-kv" style="margin-top:8px" title="{esc(tip)}">'
                f'<span class="{css}">{esc(verdict_text(v))}</span></div>')
    if not e.fits_on:
        return ""
    rows = []
    for v in e.fits_on:
        css = "tm-good" if v.fits else "tm-bad"
        word = (f"fits, {human_bytes(v.margin)} spare" if v.fits else
                f"needs {human_bytes(v.margin)} more")
        rows.append([Cell(v.capacity.name, v.capacity.source), _b(v.capacity.total),
                     Cell(word, css=css)])
    reserve = human_bytes(e.fits_on[0].capacity.reserve)
    table = Table(["accelerator", "memory", f"verdict (peak + {reserve} reserve)"], rows,
                  align=["l", "r", "l"])
    return ('<details style="margin-top:8px"><summary>Fits on: '
            f'{esc(", ".join(fits_on_summary(e)[0]) or "none of the accelerators known")}'
            f'</summary>{table.html()}<div class="tm-note tm-muted">No CUDA device here: give '
            '--device NAME or --memory SIZE for one verdict. Memory of one PyTorch device, as '
            'torch.cuda.get_device_properties reports it (hover a name for its source).'
            '</div></details>')
