"""
Pictures of fine-tuning runs as SVG files, written by hand with the standard library alone.

    svg = plot.run_report(metrics, "out/linear")      # one run: losses, total rank, heat map of ranks
    svg = plot.comparison({"linear": [m0, m1], "lora": [m2, m3]})   # methods side by side, over seeds

Both take plain dicts as metrics.json holds them (train.py's report() writes it) and return the
text of a standalone SVG 1.1 file, which the caller writes to disk; any browser opens it. This
module imports nothing of this project (nor torch), so it can draw any saved metrics.json.

It reads from the smallest piece up: element() writes one SVG element as a string, and line(),
rect(), text(), polyline() are element() with the usual arguments; nice_ticks() picks round tick
values; Axes maps data to pixels and draws its box, grid, ticks and labels; the two pictures
compose these. Coordinates are rounded to 1 decimal, so the default run's picture (600 steps, 24
matrices) stays under 200 KB even with an allocation round every 10 steps (55 heat-map columns).

Hooks for tests and scripts: every series is a <polyline> with an id (train, val, rank in a run's
picture; val-<i>-<label> with class curve in a comparison), tick labels are <text> of class xtick
or ytick inside the <g class="axes"> they belong to, heat-map cells are <rect class="cell"> whose
<title> holds the rank, bars are <rect class="bar"> with a <g class="errorbar"> where there are seeds.
"""
import math
import re
import statistics
from xml.sax.saxutils import escape, quoteattr

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf"]  # matplotlib's tab10: distinct, and readable by most colour-blind eyes
VIRIDIS = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]  # low -> high
EMA_BETA = 0.95  # the train loss's smoothing: a memory of about 20 steps
WIDTH = 760      # pixels, every picture
GRID = "#e5e5e5"

# ----------------------------------------------------------------------------- SVG elements


def num(v):
    """A coordinate as short text: one decimal, without a trailing '.0'."""
    s = f"{v:.1f}"
    s = s[:-2] if s.endswith(".0") else s
    return "0" if s == "-0" else s


def element(tag, text=None, children=(), **attrs):
    """One element as text. Attribute names take '-' for '_' (stroke_width), class_ is class;
    floats are rounded by num(), None values are left out, text is escaped."""
    parts = [tag]
    for key, value in attrs.items():
        if value is not None:
            value = num(value) if isinstance(value, float) else str(value)
            parts.append(f"{key.rstrip('_').replace('_', '-')}={quoteattr(value)}")
    inner = (escape(text) if text is not None else "") + "".join(children)
    return f"<{' '.join(parts)}>{inner}</{tag}>" if inner else f"<{' '.join(parts)}/>"


def tooltip(s):
    """A <title> child: browsers show it when the pointer rests on its parent."""
    return element("title", s)


def line(x1, y1, x2, y2, stroke="#000", **attrs):
    return element("line", x1=float(x1), y1=float(y1), x2=float(x2), y2=float(y2), stroke=stroke, **attrs)


def rect(x, y, w, h, fill, tip=None, **attrs):
    return element("rect", children=[tooltip(tip)] if tip else (), x=float(x), y=float(y),
                   width=float(w), height=float(h), fill=fill, **attrs)


def circle(x, y, fill, tip=None, r=3):
    return element("circle", children=[tooltip(tip)] if tip else (), cx=float(x), cy=float(y), r=r, fill=fill)


def text(x, y, s, size=11, anchor="start", **attrs):
    return element("text", s, x=float(x), y=float(y), font_size=size, text_anchor=anchor, **attrs)


def path_points(points):
    return " ".join(f"{num(x)},{num(y)}" for x, y in points)


def polyline(points, stroke, **attrs):
    return element("polyline", points=path_points(points), fill="none", stroke=stroke, **attrs)


def polygon(points, fill, **attrs):
    return element("polygon", points=path_points(points), fill=fill, **attrs)


def group(children, **attrs):
    return element("g", children=children, **attrs)


def document(height, title, children):
    """A standalone SVG 1.1 file, WIDTH x height: a <title>, a white page, the children one a line."""
    head = (f'<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<svg xmlns="http://www.w3.org/2000/svg" version="1.1" width="{WIDTH}" height="{num(height)}" '
            f'viewBox="0 0 {WIDTH} {num(height)}" font-family="sans-serif">')
    body = [tooltip(title), rect(0, 0, WIDTH, height, "#fff")] + list(children)
    return "\n".join([head] + body + ["</svg>\n"])


def colour(f):
    """The viridis colour of f in [0, 1], as #rrggbb (linear between five of its stops)."""
    f = min(max(f, 0.0), 1.0) * (len(VIRIDIS) - 1)
    i = min(int(f), len(VIRIDIS) - 2)
    return "#" + "".join(f"{round(u + (v - u) * (f - i)):02x}" for u, v in zip(VIRIDIS[i], VIRIDIS[i + 1]))


def slug(label):
    """A label as a fragment of an XML id: 'lora r=16' -> 'lora-r-16'."""
    return re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-") or "series"


def legend(x, y, entries, width=WIDTH - 90):
    """(label, colour, kind) swatches in a row from (x, y), wrapping at x + width; kind is 'line',
    'dashed' or 'dots' (a line with a marker). Returns (the group, the height it takes)."""
    out, cx, cy = [], x, y
    for label, col, kind in entries:
        w = 48 + 6 * len(label)  # the swatch, a gap, and the text at about 6 pixels a character
        if cx + w > x + width and cx > x:
            cx, cy = x, cy + 18
        out.append(line(cx, cy, cx + 24, cy, col, stroke_width=2,
                        stroke_dasharray="5,3" if kind == "dashed" else None))
        if kind == "dots":
            out.append(circle(cx + 12, cy, col))
        out.append(text(cx + 30, cy + 4, label, 11))
        cx += w
    return group(out, class_="legend"), cy - y + 18


# ----------------------------------------------------------------------------- axes


def nice_ticks(lo, hi, count=5, integer=False):
    """Round values from at or below lo to at or above hi: the finest spacing of 1, 2, 2.5 or 5 times a
    power of ten (whole numbers only when integer) that needs at most count + 2 intervals. A flat range
    gets a small window around its value."""
    if hi - lo <= 1e-12 * max(1.0, abs(lo), abs(hi)):
        pad = 1.0 if integer or lo == 0 else abs(lo) * 0.05
        lo, hi = lo - pad, hi + pad
    mag = 10.0 ** math.floor(math.log10((hi - lo) / (count + 2)))
    for step in (m * mag * 10 ** e for e in range(3) for m in (1, 2, 2.5, 5)):
        if integer and (step < 1 or step != round(step)):
            continue
        first = math.floor(lo / step + 1e-9) * step  # the tolerances keep float noise from adding a tick
        last = math.ceil(hi / step - 1e-9) * step
        if round((last - first) / step) <= count + 2:
            return [round(first + i * step, 10) for i in range(round((last - first) / step) + 1)]
    raise AssertionError("unreachable: a step of 10 x the magnitude needs fewer than count + 2 intervals")


def tick_label(v, ticks):
    """v with as many decimals as the tick spacing needs, and thousands separators."""
    step = ticks[1] - ticks[0]
    decimals = next((d for d in range(7) if abs(round(step, d) - step) < 1e-9 * step), 7)
    return f"{v + 0.0:,.{decimals}f}"  # + 0.0 turns -0.0 into 0.0


class Axes:
    """A plot area: box = (left, top, width, height) in pixels, showing the data ranges xs and ys.
    The limits are the outer nice ticks, so the axes always cover the data they were made for.
    x() and y() map data to pixels; frame() draws the box, grid, ticks and labels as one <g>. A
    twin() shares the box and the x axis, and draws its own y axis on the right."""

    def __init__(self, box, xs, ys, xlabel="", ylabel="", name="axes", integer_x=False, integer_y=False,
                 xticks=None, right=False):
        self.left, self.top, self.width, self.height = box
        self.xticks = xticks or nice_ticks(min(xs), max(xs), integer=integer_x)
        self.yticks = nice_ticks(min(ys), max(ys), integer=integer_y)
        self.xlabel, self.ylabel, self.name, self.right = xlabel, ylabel, name, right

    def twin(self, ys, ylabel, name, integer_y=False):
        box = (self.left, self.top, self.width, self.height)
        return Axes(box, None, ys, ylabel=ylabel, name=name, integer_y=integer_y, xticks=self.xticks,
                    right=True)

    def x(self, v):
        lo, hi = self.xticks[0], self.xticks[-1]
        return self.left + (v - lo) / (hi - lo) * self.width

    def y(self, v):
        lo, hi = self.yticks[0], self.yticks[-1]
        return self.top + self.height - (v - lo) / (hi - lo) * self.height

    def points(self, xy):
        return [(self.x(a), self.y(b)) for a, b in xy]

    def frame(self):
        """Grid lines, the box, the x axis (not on a twin), the y axis on its side, the axis labels."""
        out, bottom = [], self.top + self.height
        if not self.right:
            for v in self.xticks:
                x = self.x(v)
                out += [line(x, self.top, x, bottom, GRID), line(x, bottom, x, bottom + 4),
                        text(x, bottom + 16, tick_label(v, self.xticks), 10, "middle", class_="xtick")]
            out += [line(self.left, self.y(v), self.left + self.width, self.y(v), GRID) for v in self.yticks]
            out += [rect(self.left, self.top, self.width, self.height, "none", stroke="#000"),
                    text(self.left + self.width / 2, bottom + 32, self.xlabel, 11, "middle")]
        edge, sign = (self.left + self.width, 1) if self.right else (self.left, -1)
        for v in self.yticks:
            out += [line(edge, self.y(v), edge + 4 * sign, self.y(v)),
                    text(edge + 7 * sign, self.y(v) + 3.5, tick_label(v, self.yticks), 10,
                         "start" if self.right else "end", class_="ytick")]
        label_x, middle = edge + 48 * sign, self.top + self.height / 2
        out.append(text(label_x, middle, self.ylabel, 11, "middle",
                        transform=f"rotate({90 * sign} {num(label_x)} {num(middle)})"))
        return group(out, id=self.name, class_="axes")


# ----------------------------------------------------------------------------- reading metrics


def finite(v):
    return v is not None and math.isfinite(v)


def ema(values, beta=EMA_BETA):
    """Exponential moving average, bias-corrected (so the first values are not pulled towards 0)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** i))
    return out


def train_curve(m):
    """(step, EMA of the train loss) at every step whose loss was logged."""
    pts = [(h["step"], h["train_loss"]) for h in m["history"] if finite(h.get("train_loss"))]
    return list(zip([s for s, _ in pts], ema([v for _, v in pts])))


def val_points(m):
    """(step, val loss) at every evaluation, with the loss before fine-tuning at step 0."""
    before = [(0, m["val_loss_before"])] if finite(m.get("val_loss_before")) else []
    return before + [(h["step"], h["val_loss"]) for h in m["history"] if finite(h.get("val_loss"))]


def grows(m):
    """A run whose ranks grew: a triangular schedule that reached an allocation round that grew."""
    return bool(m.get("growth_events")) and bool(m.get("block_sizes"))


def rank_curve(m):
    """The total rank as a step function: (0, initial), then a jump at every step that changed it."""
    pts = [(0, sum(b[0] for b in m["block_sizes"].values()))]
    for h in m["history"]:
        if h["total_rank"] != pts[-1][1]:
            pts += [(h["step"], pts[-1][1]), (h["step"], h["total_rank"])]
    last = m["history"][-1]["step"] if m["history"] else 0
    return pts + ([(last, pts[-1][1])] if last != pts[-1][0] else [])


def rank_grid(m):
    """(columns, {matrix: [its rank in each column]}): the columns are the initial state (step 0) and
    the distinct steps of growth_events, each with the ranks after that step's growth."""
    events = m["growth_events"]
    ranks = {n: b[0] for n, b in m["block_sizes"].items()}
    grid = {n: [r] for n, r in ranks.items()}
    steps = sorted({e[0] for e in events})
    for t in steps:
        for _, name, k in (e for e in events if e[0] == t):
            ranks[name] += k
        for n in grid:
            grid[n].append(ranks[n])
    return [0] + steps, grid


def short_name(name):
    """blocks.0.attn.q_proj -> 0.q_proj: the layer and the module, all a row of the heat map needs."""
    parts = name.split(".")
    return f"{parts[1]}.{parts[-1]}" if len(parts) > 2 and parts[0] == "blocks" else name


KINDS = {"linear": "TriAdaptLoRA, linear schedule", "exponential": "TriAdaptLoRA, exponential schedule",
         "topk": "TriAdaptLoRA, top-k schedule", "lora": "plain LoRA", "full": "full fine-tuning",
         "adalora": "AdaLoRA (prunes to the budget)", "increlora": "IncreLoRA (diagonal core, sensitivity)"}


def settings(m):
    """The run's settings in one line, from metrics["config"] (settings.Settings.public(): resolved)."""
    c, schedule = m.get("config", {}), m.get("schedule")
    lr = m.get("peak_lr") or c.get("lr")  # peak_lr: the learning rate the run used, default or not
    parts = [f"{c.get('arch')} {c.get('task')}", f"{c.get('iters')} steps",
             f"lr {lr:g}" if lr else "lr default", f"batch {c.get('batch_size')} x {c.get('block_size')}",
             f"seed {c.get('seed')}"]
    if schedule == "lora":
        parts.append(f"r {c.get('ref_rank')}, alpha {c.get('alpha')}")
    elif schedule in ("linear", "exponential", "topk", "increlora"):
        parts += [f"r_ref {c.get('ref_rank')}", f"budget {c.get('budget')}", f"k0 {c.get('init_rank')}",
                  f"k {c.get('rank_step')}", f"t_w {c.get('warmup')}", f"dt {c.get('interval')}"]
        parts += [f"K {c.get('top_k')}"] if schedule == "topk" else []
        variant = [f"{c.get(key)}" for key, default in (("core", "triangular"), ("importance", "frobenius"))
                   if c.get(key, default) != default] + (["advance"] if c.get("advance") else [])
        parts += variant + ([f"block warmup {c.get('block_warmup')}"] if c.get("block_warmup") else [])
        parts.append(f"orth {c.get('orth_reg')}")
    elif schedule == "adalora":
        parts += [f"r_ref {c.get('ref_rank')}", f"from {c.get('adalora_init_rank')} a matrix to budget "
                  f"{c.get('budget')}", f"t_i {c.get('warmup')}", f"t_f {c.get('final_warmup')}",
                  f"dt {c.get('interval')}", f"orth {c.get('orth_reg')}"]
    return ", ".join(parts)


# ----------------------------------------------------------------------------- one run


def run_report(m, where=""):
    """The picture of one fine-tuning run (a metrics.json dict): train and val loss against step,
    the total rank on a second axis if the run grew, and then the heat map of every matrix's rank.
    `where` (the run's folder) goes into the title."""
    schedule = m.get("schedule", "run")
    title = f"{m.get('run', schedule)}: {KINDS.get(schedule, schedule)}" + (f"  ({where})" if where else "")
    result = f"val loss {m['val_loss_before']:.4f} -> {m['val_loss']:.4f}, test {m['test_loss']:.4f}"
    if "val_acc" in m:
        result += f"; val acc {m['val_acc_before']:.3f} -> {m['val_acc']:.3f}, test {m['test_acc']:.3f}"
    result += f"; {m['trainable_params']:,} trainable parameters"
    result += f"; total rank {m['total_rank']}" if m.get("rank_pattern") else ""
    out = [text(20, 24, title, 15, font_weight="bold"), text(20, 42, settings(m), 11, fill="#444"),
           text(20, 58, result, 11, fill="#444")]
    curves, bottom = loss_panel(m, top=80)
    out += curves
    if grows(m):  # a run without growth gets no heat map rather than an empty one
        cells, bottom = heat_map(m, top=bottom + 20)
        out += cells
    return document(bottom + 10, title, out)


def loss_panel(m, top):
    """Train loss (EMA) and val loss against step, and the total rank on a right-hand axis if it
    grew. Returns (elements, the bottom y)."""
    train, val = train_curve(m), val_points(m)
    steps, losses = [s for s, _ in train + val] or [0, 1], [v for _, v in train + val] or [0, 1]
    ax = Axes((70, top, 600, 250), steps, losses, "step", "loss", "loss-axes", integer_x=True)
    out = [ax.frame()]
    entries = [(f"train loss, EMA (beta {EMA_BETA}, bias-corrected)", PALETTE[0], "line"),
               ("val loss (step 0: before fine-tuning)", PALETTE[1], "dots")]
    if grows(m):
        ranks = rank_curve(m)
        rax = ax.twin([r for _, r in ranks], "total rank", "rank-axes", integer_y=True)
        out += [rax.frame(), polyline(rax.points(ranks), PALETTE[2], id="rank", class_="series",
                                      stroke_width=1.5, stroke_dasharray="5,3")]
        entries.append(("total rank (right axis)", PALETTE[2], "dashed"))
    if train:
        out.append(polyline(ax.points(train), PALETTE[0], id="train", class_="series", stroke_width=1.5))
    if val:
        out.append(polyline(ax.points(val), PALETTE[1], id="val", class_="series", stroke_width=1.5))
        dots = [circle(ax.x(s), ax.y(v), PALETTE[1], f"step {s}: val loss {v:.4f}") for s, v in val]
        out.append(group(dots, class_="markers"))
    bottom = top + 250 + 48
    leg, h = legend(70, bottom, entries)
    out.append(leg)
    if not grows(m):
        note = ("the rank is fixed: no growth, so no rank curve and no heat map" if m.get("rank_pattern")
                else "every weight trains: no adapters, so no rank curve and no heat map")
        out.append(text(70, bottom + h + 6, note, 11, fill="#444", class_="note"))
        h += 18
    return out, bottom + h


def heat_map(m, top):
    """Rows: the adapted matrices (layer.module); columns: the initial state and each allocation round
    that grew; a cell's colour is the matrix's rank after that round (its tooltip says the number),
    with the colour scale on the right. Returns (elements, the bottom y)."""
    columns, grid = rank_grid(m)
    lo, hi = min(min(r) for r in grid.values()), max(max(r) for r in grid.values())
    row_h = max(14, 54 / len(grid))  # at least 54 pixels in all: room for the colour scale
    left, cell_w, y0 = 90, min(24.0, 560 / len(columns)), top + 26
    bottom = y0 + len(grid) * row_h
    out = [text(20, top + 14, "rank of every adapted matrix after each allocation round (a cell's tooltip "
                "says its rank)", 13, font_weight="bold")]
    cells = []
    for i, (name, row) in enumerate(grid.items()):
        y = y0 + i * row_h
        out.append(text(left - 6, y + row_h / 2 + 3.5, short_name(name), 10, "end"))
        for j, r in enumerate(row):
            when = "at injection" if j == 0 else f"after step {columns[j]}"
            cells.append(rect(left + j * cell_w, y, cell_w, row_h, colour((r - lo) / max(1, hi - lo)),
                              f"{short_name(name)}, {when}: rank {r}", class_="cell"))
    out.append(group(cells, id="heatmap", shape_rendering="crispEdges"))
    every = max(1, math.ceil(34 / cell_w))  # a step label every few columns, so that labels never touch
    for j in range(0, len(columns), every):
        x = left + (j + 0.5) * cell_w
        out += [line(x, bottom, x, bottom + 3),
                text(x, bottom + 14, str(columns[j]), 9, "middle", class_="coltick")]
    out.append(text(left, bottom + 30, "allocation round (the step it followed; 0: at injection)", 11))
    out.append(colour_bar(left + len(columns) * cell_w + 24, y0 + 14, min(200, bottom - y0 - 14), lo, hi))
    return out, bottom + 38


def colour_bar(x, top, height, lo, hi):
    """The heat map's legend: the colour scale from rank lo (bottom) to hi (top), with rank ticks."""
    n = int(hi - lo) + 1 if hi - lo < 40 else 40  # one slice per rank, or 40 slices for wide ranges
    h = height / n
    out = [rect(x, top + height - (i + 1) * h, 12, h, colour(i / max(1, n - 1)), class_="colourbar")
           for i in range(n)]
    gap = 12 * max(1, hi - lo) / height  # the ends, and the round ranks between that keep 12 pixels away
    for t in sorted({lo, hi, *(t for t in nice_ticks(lo, hi, integer=True) if lo + gap < t < hi - gap)}):
        y = top + height - ((t - lo) / max(1, hi - lo) * (n - 1) + 0.5) * h
        out += [line(x + 12, y, x + 16, y), text(x + 19, y + 3.5, f"{t:g}", 10, class_="colourtick")]
    out.append(text(x, top - 8, "rank", 10))
    return group(out, id="colour-scale")


# ----------------------------------------------------------------------------- several methods


def mean_std(xs):
    """(mean, sample standard deviation) of xs; the deviation of a single value is 0."""
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def val_band(runs):
    """(steps, mean, min, max) of the val loss over runs, at the steps that every run evaluated."""
    series = [dict(val_points(m)) for m in runs]
    steps = sorted(set.intersection(*(set(s) for s in series)))
    values = [[s[t] for s in series] for t in steps]
    return steps, [statistics.mean(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def comparison(methods, title=None, reference=None):
    """Methods side by side, methods = {label: [metrics of each seed]}: their val-loss curves on shared
    axes (the mean over seeds, with a min-max band where there are several), then one bar per method
    of the final test metric (test accuracy where the runs have one, else test loss) with +-1 std
    error bars over seeds and the trainable parameters beside it. reference = (label, value) draws a
    dashed line on the bars' axis (e.g. the base model's test loss)."""
    c = next(iter(methods.values()))[0].get("config", {})
    seeds = max(len(runs) for runs in methods.values())
    title = title or "methods compared: " + ", ".join(methods)
    spread = f"mean over {seeds} seeds, band min-max" if seeds > 1 else "one run per method"
    subtitle = (f"{c.get('arch')} {c.get('task')}, {c.get('iters')} steps each, "
                f"batch {c.get('batch_size')} x {c.get('block_size')}; val loss: {spread}")
    out = [text(20, 24, title, 15, font_weight="bold"), text(20, 42, subtitle, 11, fill="#444")]
    curves, bottom = curve_panel(methods, top=64)
    bars, bottom = bar_panel(methods, bottom + 16, reference)
    return document(bottom + 10, title, out + curves + bars)


def curve_panel(methods, top):
    """Every method's mean val loss against step, with its min-max band. Returns (elements, bottom y)."""
    bands = {label: val_band(runs) for label, runs in methods.items()}
    steps = [s for b in bands.values() for s in b[0]] or [0, 1]
    values = [v for b in bands.values() for v in b[2] + b[3]] or [0, 1]
    ax = Axes((70, top, 620, 250), steps, values, "step", "val loss", "val-axes", integer_x=True)
    out, entries = [ax.frame()], []
    for i, (label, (s, mean, lo, hi)) in enumerate(bands.items()):
        col = PALETTE[i % len(PALETTE)]
        if len(methods[label]) > 1 and s:
            out.append(polygon(ax.points(list(zip(s, hi)) + list(zip(s, lo))[::-1]), col, fill_opacity=0.2,
                               class_="band", id=f"band-{i}-{slug(label)}"))
        out.append(polyline(ax.points(list(zip(s, mean))), col, stroke_width=1.5, class_="curve",
                            id=f"val-{i}-{slug(label)}"))
        entries.append((label, col, "line"))
    leg, h = legend(70, top + 250 + 48, entries)
    return out + [leg], top + 250 + 48 + h


def bar_panel(methods, top, reference=None):
    """One horizontal bar per method: the mean final test metric, +-1 std error bars (over seeds), and
    the value and the trainable parameters written on its row. Returns (elements, bottom y)."""
    key = "test_acc" if all("test_acc" in m for runs in methods.values() for m in runs) else "test_loss"
    what = "test accuracy" if key == "test_acc" else "test loss"
    stats = {label: mean_std([m[key] for m in runs]) for label, runs in methods.items()}
    seeds = max(len(runs) for runs in methods.values())
    extra = [reference[1]] if reference else []
    lo = min([mu - sd for mu, sd in stats.values()] + extra)
    hi = max([mu + sd for mu, sd in stats.values()] + extra)
    # methods differ by a few percent of the value, which bars from 0 would hide: start below the lowest
    start = max(0.0, lo - 0.5 * ((hi - lo) or abs(hi) * 0.1 or 1.0)) if lo >= 0 else lo
    row_h = 24
    ax = Axes((130, top + 40, 380, row_h * len(methods)), [start, hi], [0, 1], name="bars-axes")
    spread = f", mean +- std over {seeds} seeds" if seeds > 1 else ", one run per method"
    cut = f" (the axis starts at {tick_label(ax.xticks[0], ax.xticks)}, not 0)" if ax.xticks[0] else ""
    ax.xlabel = what + spread + cut
    out = [text(20, top + 14, f"final {what} of each method", 13, font_weight="bold"), bar_frame(ax)]
    for i, (label, (mu, sd)) in enumerate(stats.items()):
        y, col, runs = ax.top + i * row_h, PALETTE[i % len(PALETTE)], methods[label]
        mid = y + row_h / 2
        params = round(statistics.mean(m["trainable_params"] for m in runs))
        tip = f"{label}: {what} {mu:.4f} +- {sd:.4f} over {len(runs)} run" + "s" * (len(runs) > 1)
        out += [text(ax.left - 8, mid + 4, label, 11, "end"),
                rect(ax.left, y + 4, ax.x(mu) - ax.left, row_h - 8, col, tip, class_="bar",
                     fill_opacity=0.85)]
        if len(runs) > 1:
            a, end = ax.x(mu - sd), ax.x(mu + sd)
            whisker = [line(a, mid, end, mid), line(a, mid - 5, a, mid + 5), line(end, mid - 5, end, mid + 5)]
            out.append(group(whisker, class_="errorbar"))
        value = f"{mu:.4f}" + (f" +- {sd:.4f}" if len(runs) > 1 else "")
        # in a column right of the bars, where no bar, error bar or reference line can run through it
        out.append(text(ax.left + ax.width + 10, mid + 4, f"{value} | {params:,} params", 10,
                        class_="params"))
    if reference:
        x = ax.x(reference[1])
        out += [line(x, ax.top - 4, x, ax.top + ax.height, "#444", stroke_dasharray="4,3",
                     class_="reference"),
                text(x, ax.top - 8, f"{reference[0]}: {reference[1]:.4f}", 10, "middle", fill="#444")]
    return out, ax.top + ax.height + 44


def bar_frame(ax):
    """A bar chart's axes: the x axis with its grid, ticks and labels; a bare y axis (rows carry labels)."""
    bottom, out = ax.top + ax.height, []
    for v in ax.xticks:
        out += [line(ax.x(v), ax.top, ax.x(v), bottom, GRID), line(ax.x(v), bottom, ax.x(v), bottom + 4),
                text(ax.x(v), bottom + 16, tick_label(v, ax.xticks), 10, "middle", class_="xtick")]
    out += [line(ax.left, ax.top, ax.left, bottom), line(ax.left, bottom, ax.left + ax.width, bottom),
            text(ax.left + ax.width / 2, bottom + 32, ax.xlabel, 11, "middle")]
    return group(out, id=ax.name, class_="axes")
