"""The benchmark's outputs: Markdown tables, the plot, ``decode.json`` / ``decode.md``, and merging earlier runs."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from .profile import KERNEL_CATEGORIES, PROFILED, Row
from .variants import VARIANTS


def _cell(value: Callable[[], object], spec: str = "") -> str:
    """``value()`` formatted with ``spec``, or "—" where the row lacks what it needs (a variant that did not run)."""
    try:
        return format(value(), spec)
    except (KeyError, TypeError, ZeroDivisionError):
        return "—"


def markdown(rows: Iterable[Row]) -> str:
    """The attention table as Markdown, one line per row that ran polar 0.5: ms per step back to back per variant
    of :data:`VARIANTS`, then ratios; "—" where a variant did not run."""
    head = ("| model | B | L | eager | inductor (2) | inductor GQA-native (3) | polar 1.0 | polar 0.5 | "
            "0.5 vs (3) | ideal | % of ideal | ideal, layer 0 dense | % of it | 0.5 vs (2) | 1.0 vs (3) | "
            "attn share of (3) | router share of 0.5 | compile 0.5 / (3) | 0.5 vs (3), host-synced |")
    lines = [_line(r, _attention_cells(r)) for r in rows if "polar-0.5" in r]
    return "\n".join([head, _rule(head), *lines]) if lines else ""


def _attention_cells(r: Row) -> list[str]:
    speed3 = r["inductor-gqa"] / r["polar-0.5"]
    return [
        *(_cell(lambda v=v: r[v] * 1e3, ".3f") for v in VARIANTS),
        f"{speed3:.2f}x", f"{r['ideal-0.5']:.2f}x", f"{100 * speed3 / r['ideal-0.5']:.1f}%",
        f"{r['ideal-0.5-layer0-dense']:.2f}x", f"{100 * speed3 / r['ideal-0.5-layer0-dense']:.1f}%",
        _cell(lambda: f"{r['inductor'] / r['polar-0.5']:.2f}x"),
        _cell(lambda: r["polar-1.0"] / r["inductor-gqa"], ".3f"),
        f"{r['attention-share']:.0%}", _cell(lambda: r["router-share"], ".1%"),
        f"{r['polar-0.5-first-call'] / r['inductor-gqa-first-call']:.2f}",
        # rows measured before host-synced timing was split out have none
        _cell(lambda: f"{r['inductor-gqa-synced'] / r['polar-0.5-synced']:.2f}x"),
    ]


def _line(r: Row, cells: Sequence[str]) -> str:
    return f"| {r['model']} ({r['layers']} layers) | {r['batch']} | {r['context']} | " + " | ".join(cells) + " |"


def _rule(head: str) -> str:
    return "|" + "---|" * (head.count("|") - 1)


MLP_COLUMNS = ("polar-attn", "polar-mlp", "polar-both")


def mlp_markdown(rows: Iterable[Row]) -> str:
    """The table of both halves as Markdown, one line per row that ran the MLP variants; empty if none did.

    Densities are means over all layers (layer 0 counts as 1): the nominal ones (attention density on every routed
    layer, the k table) and those the step runs (sites the pass's thresholds keep dense count as 1). Per variant:
    speedup over (3), its ideal (at the run densities) and the share of it reached; then polar-both against its
    ideal at the nominal densities, T_attn and T_mlp of (3) (T_mlp estimated: (3)'s GEMM time times the MLP's
    share of the GEMM weights), the MLP routers timed alone and their share of the polar-both step, and each
    variant's first call (compile + capture) in seconds.
    """
    head = ("| model | B | L | attn density (mean nominal / run) | MLP density (mean nominal / run) | MLP rank | "
            "(3) ms | attn ms | mlp ms | both ms | attn vs (3) / ideal / % | mlp vs (3) / ideal / % | "
            "both vs (3) / ideal / % | both: ideal at nominal / % | T_attn / T_mlp of (3) ms | "
            "MLP router ms (share of both) | compile s (3) / attn / mlp / both |")
    lines = [_line(r, _mlp_cells(r)) for r in rows if "mlp-rank" in r]
    return "\n".join([head, _rule(head), *lines]) if lines else ""


def _mlp_cells(r: Row) -> list[str]:
    base = r["inductor-gqa"]

    def versus(variant: str, ideal: str) -> str:
        speedup = base / r[variant]
        return f"{speedup:.2f}x / {r[ideal]:.2f}x / {100 * speedup / r[ideal]:.0f}%"

    return [
        f"{r['attn-density']:g} ({r['d-attn-table']:.3f} / {r['d-attn-run']:.3f})",
        f"{r['d-mlp-table']:.3f} / {r['d-mlp-run']:.3f}", str(r["mlp-rank"]), f"{base * 1e3:.3f}",
        *(_cell(lambda v=v: r[v] * 1e3, ".3f") for v in MLP_COLUMNS),
        *(_cell(lambda v=v: versus(v, f"ideal-{v}")) for v in MLP_COLUMNS),
        _cell(lambda: versus("polar-both", "ideal-polar-both-table")),
        f"{r['attention-seconds'] * 1e3:.3f} / {r['mlp-seconds'] * 1e3:.3f}",
        f"{r['mlp-router'] * 1e3:.3f}" + _cell(lambda: f" ({r['mlp-router'] / r['polar-both']:.1%})"),
        " / ".join(_cell(lambda v=v: r[f"{v}-first-call"], ".0f") for v in ("inductor-gqa", *MLP_COLUMNS)),
    ]


def breakdown_markdown(rows: Iterable[Row]) -> str:
    """Where each profiled step's GPU time goes, as Markdown: ms per step per :data:`KERNEL_CATEGORIES` and their
    total, one line per row and profiled variant (:data:`PROFILED`) that has a breakdown ("—" for a category a row
    measured before it existed lacks); empty when no row has one."""
    head = "| model | B | L | variant | " + " | ".join(KERNEL_CATEGORIES) + " | total |"
    lines = [_line(r, [variant, *_breakdown_cells(r[f"{variant}-gpu"])])
             for r in rows for variant in PROFILED if f"{variant}-gpu" in r]
    return "\n".join([head, _rule(head), *lines]) if lines else ""


def _breakdown_cells(gpu: dict[str, float]) -> list[str]:
    return [*(_cell(lambda c=c: gpu[c] * 1e3, ".3f") for c in KERNEL_CATEGORIES), f"{sum(gpu.values()) * 1e3:.3f}"]


def tables(rows: Sequence[Row]) -> str:
    """The report's Markdown: :func:`markdown`, :func:`mlp_markdown` and :func:`breakdown_markdown`, those that
    have rows."""
    return "\n\n".join(table for table in (markdown(rows), mlp_markdown(rows), breakdown_markdown(rows)) if table)


def write_results(rows: Sequence[Row], out: str | Path) -> tuple[Path, Path]:
    """Write ``out/decode.json`` (the raw rows) and ``out/decode.md`` (:func:`tables`); returns both paths."""
    out = Path(out)
    json_path, md_path = out / "decode.json", out / "decode.md"
    json_path.write_text(json.dumps(list(rows), indent=1))
    md_path.write_text(tables(rows) + "\n")
    return json_path, md_path


def plot(rows: Sequence[Row], path: str | Path) -> None:
    """Speedup against batch size, one panel a model: polar 0.5 over dense Inductor (2), solid, one line per
    context; polar-both over (3), dashed, where it ran. A point with fewer layers than the panel's most is
    labelled with its layer count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    colors = {context: f"C{i}" for i, context in enumerate(sorted({r["context"] for r in rows}))}  # same in all panels
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    lines = (("polar-0.5", "inductor", "-", "0.5 vs (2)"), ("polar-both", "inductor-gqa", "--", "both vs (3)"))
    for ax, name in zip(axes[0], models, strict=True):
        model_rows = [r for r in rows if r["model"] == name]
        most_layers = max(r["layers"] for r in model_rows)
        for context in sorted({r["context"] for r in model_rows}):
            for variant, base, style, label in lines:
                points = sorted((r["batch"], r[base] / r[variant], r["layers"]) for r in model_rows
                                if r["context"] == context and variant in r and base in r)
                if not points:
                    continue
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ls=style, color=colors[context],
                        label=f"L={context}, {label}")
                for batch, speedup, count in points:
                    if count < most_layers:
                        ax.annotate(f"{count} layers", (batch, speedup), textcoords="offset points", xytext=(4, -10),
                                    fontsize=7)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set(xscale="log", xlabel="batch size", ylabel="speedup over dense Inductor",
               title=f"{name} ({most_layers} layers unless marked)")
        ax.legend(fontsize=7)
    fig.suptitle("polar decode step vs dense Inductor, H200, bf16")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(rows: Sequence[Row], out: str | Path) -> None:
    """Write ``out/decode.json``, ``decode.md`` (:func:`write_results`) and ``decode.png`` (:func:`plot`), and print
    the Markdown tables."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_results(rows, out)
    plot(rows, out / "decode.png")
    print(tables(rows))


def merge_results(paths: Sequence[str | Path]) -> list[Row]:
    """The rows of several ``decode.json`` files as one table, one row per model, B and L, ordered by model, context
    and batch.

    Runs split over several processes (or machines) become one report. Of the rows for one model, B and L it keeps
    the one with the most layers (a run with all layers supersedes a shorter one); among rows with as many layers,
    the later file's. Raises ``ValueError`` naming a file that holds no list of rows.
    """
    merged: dict[tuple[str, int, int], Row] = {}
    for path in paths:
        rows = json.loads(Path(path).read_text())
        if not isinstance(rows, list) or not all(isinstance(r, dict) and "model" in r for r in rows):
            raise ValueError(f"{path}: expected a list of benchmark rows as written by `polar-compile bench`")
        for r in rows:
            key = (r["model"], r["context"], r["batch"])
            if key not in merged or r["layers"] >= merged[key]["layers"]:
                merged[key] = r
    return [merged[key] for key in sorted(merged)]
