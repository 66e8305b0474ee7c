"""The report of a chaos run: its results as JSON, a timeline as PNG, and a page that links both.

`write_report` takes the results dict of a run (seed, command, faults, supplies, the real CPs'
state transitions, invariants, totals; all times in seconds from the start of the run) and
writes results.json, timeline.png and report.html side by side, so the folder can be opened,
copied or attached as it is. The page needs nothing else: inline CSS, no scripts, the image by
a relative link. Everything taken from the results is escaped on the page.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from shared.messages import STATE_COLOURS
from tools.chaos.schedule import NET_KINDS

JSON_NAME = "results.json"
PNG_NAME = "timeline.png"
HTML_NAME = "report.html"

# The project's state colours, keyed by plain strings: the results carry states as text.
STATE_COLOUR: dict[str, str] = {str(state): colour for state, colour in STATE_COLOURS.items()}
UNKNOWN_STATE_COLOUR = "tab:purple"
# Fault kinds in colours that stand apart from the state bands (green, orange, red, grey) and
# from the real supplies (navy): one each for the eleven kinds of a --net run.
KIND_PALETTE: tuple[str, ...] = (
    "tab:blue",
    "tab:purple",
    "tab:brown",
    "tab:pink",
    "tab:olive",
    "tab:cyan",
    "magenta",
    "goldenrod",
    "teal",
    "black",
    "darkkhaki",
    "indigo",
)
# Driver ids are written beside real supplies only when there are this few: beyond, they overlap.
MAX_LABELLED_SUPPLIES = 40
# Violation texts shown per invariant on the page; results.json keeps them all.
MAX_VIOLATIONS_SHOWN = 10
FIGURE_INCHES = (14.0, 7.0)
FIGURE_DPI = 100


@dataclass(frozen=True)
class KindSummary:
    """How often one kind of fault was injected, and when first and last."""

    kind: str
    count: int
    first_at: float | None
    last_at: float | None


def write_report(results: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write results.json, timeline.png and report.html into out_dir; return their paths by
    name ("json", "png", "html")."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / JSON_NAME, "png": out_dir / PNG_NAME, "html": out_dir / HTML_NAME}
    # The JSON first: if drawing fails, the run's results are kept all the same.
    paths["json"].write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", "utf-8")
    draw_timeline(results, paths["png"])
    paths["html"].write_text(render_html(results, PNG_NAME), "utf-8")
    return paths


# --- figures from the results (pure) --------------------------------------------------------


def violation_count(results: Mapping[str, Any]) -> int:
    """The run's violations: the totals' figure, else those the invariants list."""
    total = results.get("totals", {}).get("violations")
    if total is not None:
        return int(total)
    return sum(len(inv.get("violations", [])) for inv in results.get("invariants", []))


def run_end(results: Mapping[str, Any]) -> float:
    """The last moment anything in the results happened, and no earlier than the run's end."""
    times = [float(results.get("duration_s") or 0.0)]
    for fault in results.get("faults", []):
        times.append(float(fault["at"]) + float(fault.get("duration") or 0.0))
    for supply in results.get("supplies", []):
        times.append(float(supply["start"]))
        if supply.get("end") is not None:
            times.append(float(supply["end"]))
    times.extend(float(change["at"]) for change in results.get("cp_states", []))
    end = max(times)
    return end if end > 0 else 1.0


def faults_by_kind(
    faults: Iterable[Mapping[str, Any]], kinds: Sequence[str] = ()
) -> list[KindSummary]:
    """A summary per kind: the enabled ones in order, even if never injected, then any other."""
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for fault in faults:
        times.setdefault(str(fault["kind"]), []).append(float(fault["at"]))
    return [
        KindSummary(kind, len(ats), min(ats, default=None), max(ats, default=None))
        for kind, ats in times.items()
    ]


def in_progress(
    supplies: Iterable[Mapping[str, Any]], until: float
) -> tuple[list[float], list[int]]:
    """How many supplies ran at each change, as a step function: times and counts after each.

    A supply that never ended counts as running until `until`. The first point is (0, 0).
    """
    changes: list[tuple[float, int]] = []
    for supply in supplies:
        end = supply.get("end")
        changes.append((float(supply["start"]), 1))
        changes.append((float(end) if end is not None else until, -1))
    # At one instant, ends before starts: a supply that follows another is not counted twice.
    changes.sort()
    times = [0.0]
    counts = [0]
    running = 0
    for at, step in changes:
        running += step
        times.append(at)
        counts.append(running)
    return times, counts


def state_spans(
    changes: Iterable[Mapping[str, Any]], until: float
) -> dict[str, list[tuple[str, float, float]]]:
    """Each CP's states as (state, start, width); its last state lasts until `until`."""
    by_cp: dict[str, list[tuple[float, str]]] = {}
    for change in changes:
        by_cp.setdefault(str(change["cp_id"]), []).append(
            (float(change["at"]), str(change["state"]))
        )
    spans: dict[str, list[tuple[str, float, float]]] = {}
    for cp_id, transitions in by_cp.items():
        transitions.sort(key=lambda t: t[0])
        ends = [at for at, _ in transitions[1:]] + [max(until, transitions[-1][0])]
        spans[cp_id] = [
            (state, at, end - at) for (at, state), end in zip(transitions, ends, strict=True)
        ]
    return spans


def kind_colours(results: Mapping[str, Any]) -> dict[str, str]:
    """A colour per fault kind, the enabled kinds first, stable for the same kinds."""
    kinds = [s.kind for s in faults_by_kind(results.get("faults", []), results.get("kinds", []))]
    return {kind: KIND_PALETTE[i % len(KIND_PALETTE)] for i, kind in enumerate(kinds)}


def title(results: Mapping[str, Any]) -> str:
    totals = results.get("totals", {})
    faults = totals.get("faults", len(results.get("faults", [])))
    supplies = totals.get("supplies", len(results.get("supplies", [])))
    return (
        f"chaos run: seed {results.get('seed')}, {faults} faults, {supplies} supplies, "
        f"{violation_count(results)} violations"
    )


# --- the timeline ---------------------------------------------------------------------------


def draw_timeline(results: Mapping[str, Any], path: Path) -> None:
    """The run on one picture: the sim fleet's load on top, a row per real CP, faults across."""
    # A Figure on an Agg canvas of its own, not pyplot: no global backend or figure registry
    # touched, so a caller that also plots is not disturbed and nothing has to be closed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    until = run_end(results)
    faults = list(results.get("faults", []))
    supplies = list(results.get("supplies", []))
    real = [s for s in supplies if s.get("source") != "sim"]
    sim = [s for s in supplies if s.get("source") == "sim"]
    spans = state_spans(results.get("cp_states", []), until)
    colours = kind_colours(results)
    cp_rows = sorted(set(spans) | {str(s["cp_id"]) for s in real})
    rows = [*cp_rows, "faults"]
    row_of = {name: i for i, name in enumerate(rows)}

    fig = Figure(figsize=FIGURE_INCHES, dpi=FIGURE_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    top, main = fig.subplots(2, 1, sharex=True, height_ratios=[1, 4])
    fig.suptitle(title(results))

    # The simulated fleet: how many of its supplies were running.
    times, counts = in_progress(sim, until)
    if sim:
        times.append(until)
        counts.append(counts[-1])
        top.step(times, counts, where="post", color="tab:green", linewidth=1)
        top.fill_between(times, counts, step="post", color="tab:green", alpha=0.25)
        top.set_ylim(0, max(counts) * 1.15 + 1)
    else:
        top.text(
            0.5,
            0.5,
            "no simulated supplies",
            transform=top.transAxes,
            ha="center",
            va="center",
            color="grey",
        )
        top.set_yticks([])
    top.set_ylabel("sim\nsupplying", rotation=0, ha="right", va="center")

    # State bands, one row per real CP.
    for cp_id, cp_spans in spans.items():
        by_colour: dict[str, list[tuple[float, float]]] = {}
        for state, start, width in cp_spans:
            by_colour.setdefault(STATE_COLOUR.get(state, UNKNOWN_STATE_COLOUR), []).append(
                (start, width)
            )
        y = row_of[cp_id]
        for colour, xranges in by_colour.items():
            main.broken_barh(xranges, (y - 0.35, 0.7), facecolors=colour, alpha=0.45)

    # Real supplies as thin bars over their CP's row; one that never ended runs to the end.
    ended: dict[int, list[tuple[float, float]]] = {}
    open_: dict[int, list[tuple[float, float]]] = {}
    for supply in real:
        start = float(supply["start"])
        end = supply.get("end")
        target = ended if end is not None else open_
        width = (float(end) if end is not None else until) - start
        target.setdefault(row_of[str(supply["cp_id"])], []).append((start, width))
    for bars, hatch in ((ended, ""), (open_, "////")):
        for y, xranges in bars.items():
            main.broken_barh(
                xranges,
                (y - 0.12, 0.24),
                facecolors="navy",
                edgecolors="white",
                linewidth=0.5,
                hatch=hatch,
            )
    if len(real) <= MAX_LABELLED_SUPPLIES:
        for supply in real:
            main.text(
                float(supply["start"]),
                row_of[str(supply["cp_id"])] - 0.16,
                str(supply.get("driver_id", "")),
                fontsize=7,
                color="navy",
                alpha=0.7,
                va="bottom",
                clip_on=True,
            )

    # Faults: a line where each began across every row, and a bar for its length in the
    # bottom row, one lane per kind so that overlapping faults stay apart.
    fault_row = row_of["faults"]
    lane = 0.8 / max(len(colours), 1)
    # Hundreds of lines would hide the rows behind them: the more faults, the fainter each.
    line_alpha = 0.6 if len(faults) <= 50 else 0.3
    by_kind: dict[str, list[Mapping[str, Any]]] = {}
    for fault in faults:
        by_kind.setdefault(str(fault["kind"]), []).append(fault)
    for i, (kind, colour) in enumerate(colours.items()):
        of_kind = by_kind.get(kind, [])
        if not of_kind:
            continue
        starts = [float(f["at"]) for f in of_kind]
        for ax in (top, main):
            ax.vlines(
                starts,
                0,
                1,
                transform=ax.get_xaxis_transform(),
                colors=colour,
                linewidth=0.8,
                linestyles=_linestyle(kind),
                alpha=line_alpha,
            )
        # An instant fault still gets a sliver, or it would not show in its lane.
        sliver = until / 400
        main.broken_barh(
            [
                (at, max(float(f.get("duration") or 0.0), sliver))
                for at, f in zip(starts, of_kind, strict=True)
            ],
            (fault_row - 0.4 + i * lane, lane),
            facecolors=colour,
        )

    main.set_yticks(range(len(rows)), rows)
    main.set_ylim(len(rows) - 0.5, -0.5)
    main.set_xlim(0, until)
    main.set_xlabel("time since the start of the run (s)")
    main.grid(axis="x", alpha=0.3)

    same_colour: dict[str, list[str]] = {}
    for state, colour in STATE_COLOUR.items():
        same_colour.setdefault(colour, []).append(state)
    states = [
        Patch(facecolor=colour, alpha=0.45, label=", ".join(names))
        for colour, names in same_colour.items()
    ]
    marks = [Patch(facecolor="navy", label="real supply")] if real else []
    if open_:
        marks.append(
            Patch(facecolor="navy", hatch="////", edgecolor="white", label="supply never ended")
        )
    kinds = [Line2D([], [], color=c, linestyle=_linestyle(k), label=k) for k, c in colours.items()]
    main.legend(
        handles=states + marks + kinds,
        loc="upper left",
        bbox_to_anchor=(1.005, 1),
        fontsize=8,
        frameon=False,
    )
    fig.savefig(path, dpi=FIGURE_DPI)


def _linestyle(kind: str) -> Literal["dashed", "solid"]:
    """The network's faults dashed: they hit a link, not a process."""
    return "dashed" if kind in NET_KINDS else "solid"


# --- the page -------------------------------------------------------------------------------

CSS = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1450px;
       padding: 0 1em; color: #222; }
h1 { margin: 0 0 .3em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
.pass { color: #1b7f2a; } .fail { color: #c62828; }
pre { background: #f4f4f4; padding: .6em .8em; overflow-x: auto; }
table { border-collapse: collapse; margin: .5em 0; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.bad td { background: #fdecea; }
ul { margin: 0; padding-left: 1.2em; } li { font-family: monospace; font-size: 13px; }
img { max-width: 100%; border: 1px solid #ddd; }
.muted { color: #777; }
"""


def fmt(value: Any) -> str:
    """A value as page text (not yet escaped): floats short, nothing as a dash."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.1f}" if value >= 100 else f"{value:.3g}"
    return str(value)


def esc(value: Any) -> str:
    return html.escape(fmt(value))


def seconds(value: Any) -> str:
    return "–" if value is None else html.escape(f"{float(value):.1f} s")


def _table(head: Sequence[str], body: Iterable[str]) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render_html(results: Mapping[str, Any], image: str = PNG_NAME) -> str:
    """The report page: verdict, how to replay, totals, faults and invariants, the timeline."""
    violations = violation_count(results)
    if violations == 0:
        verdict = '<h1 class="pass">PASS</h1>'
        verdict_text = "PASS"
    else:
        verdict = f'<h1 class="fail">FAIL: {violations} violation{"s" * (violations != 1)}</h1>'
        verdict_text = "FAIL"
    faults = sorted(results.get("faults", []), key=lambda f: float(f["at"]))
    kinds = results.get("kinds", [])

    totals = "".join(
        f"<tr><th>{esc(name)}</th><td class='num'>{esc(value)}</td></tr>"
        for name, value in results.get("totals", {}).items()
    )
    by_kind = _table(
        ["kind", "count", "first at", "last at"],
        (
            f"<tr><td>{esc(s.kind)}</td><td class='num'>{s.count}</td>"
            f"<td class='num'>{seconds(s.first_at)}</td>"
            f"<td class='num'>{seconds(s.last_at)}</td></tr>"
            for s in faults_by_kind(faults, kinds)
        ),
    )
    invariants = _table(
        ["invariant", "checked", "violations", f"first {MAX_VIOLATIONS_SHOWN}"],
        (_invariant_row(inv) for inv in results.get("invariants", [])),
    )
    fault_list = _table(
        ["at", "kind", "target", "duration", "detail"],
        (
            f"<tr><td class='num'>{seconds(f['at'])}</td><td>{esc(f['kind'])}</td>"
            f"<td>{esc(f.get('target'))}</td><td class='num'>{seconds(f.get('duration'))}</td>"
            f"<td>{esc(f.get('detail'))}</td></tr>"
            for f in faults
        ),
    )
    enabled = ", ".join(html.escape(str(k)) for k in kinds) or "none"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{verdict_text}: {html.escape(title(results))}</title>
<style>{CSS}</style>
</head>
<body>
{verdict}
<p>{html.escape(title(results))}</p>
<p>Seed <b>{esc(results.get("seed"))}</b>, started {esc(results.get("started_at"))},
ran {seconds(results.get("duration_s"))}. Fault kinds enabled: {enabled}.</p>
<p>To replay this run (the same seed draws the same faults):</p>
<pre><code>{esc(results.get("command"))}</code></pre>

<h2>Totals</h2>
<table>{totals}</table>

<h2>Faults by kind</h2>
{by_kind}

<h2>Invariants</h2>
{invariants}

<h2>Timeline</h2>
<p class="muted">One row per real CP coloured by its state, its supplies as dark bars; the
simulated fleet's supplies in progress on top; faults as lines where they began and, in the
bottom row, bars as long as they lasted.</p>
<img src="{html.escape(image)}" alt="timeline of the run">

<h2>Every fault ({len(faults)})</h2>
{fault_list}
</body>
</html>
"""


def _invariant_row(invariant: Mapping[str, Any]) -> str:
    found = [str(v) for v in invariant.get("violations", [])]
    shown = "".join(f"<li>{html.escape(v)}</li>" for v in found[:MAX_VIOLATIONS_SHOWN])
    more = len(found) - MAX_VIOLATIONS_SHOWN
    if more > 0:
        shown += f"<li class='muted'>… and {more} more (results.json)</li>"
    listing = f"<ul>{shown}</ul>" if found else ""
    row_class = " class='bad'" if found else ""
    return (
        f"<tr{row_class}><td>{esc(invariant.get('name'))}</td>"
        f"<td class='num'>{esc(invariant.get('checked'))}</td>"
        f"<td class='num'>{len(found)}</td><td>{listing}</td></tr>"
    )
