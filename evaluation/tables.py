"""The paper's results tables from scores: one row per pruning configuration, the benchmarks as
columns in the paper's order, and its "Average" column.

The paper's Average (Table 1's caption; Tables 2 and 4 the same) is the mean, over the benchmark
columns, of each configuration's score divided by the unpruned model's, x 100 (MME as its raw
score). Pure functions on numbers, shared by evaluate.py (Tables 1 and 4) and the lmms-eval
results reader (Table 2).
"""

import math


def average(row: dict, full: dict) -> float | None:
    """100 x the mean over the columns both rows have (the full one non-zero) of row / full; None
    when there are none."""
    ratios = [row[c] / full[c] for c in row if row[c] is not None and full.get(c) not in (None, 0)]
    return 100 * sum(ratios) / len(ratios) if ratios else None


def build(
    scores: dict[str, dict], columns: list[str], seconds: dict[str, float] | None = None, partial: dict | None = None
) -> dict:
    """scores: {config: {column: score or None}} -> the table as JSON: its columns in order, and per
    configuration its cells, its Average against the `full` configuration (when one was run), its
    total time in seconds (Table 4's "Total Time", when given), and the cells scored on part of the
    questions (partial: {config: {column: "answered/total"}}, missing answers counted wrong)."""
    full = scores.get("full")
    rows = []
    for config, cells in scores.items():
        row = {"config": config, "cells": {c: cells.get(c) for c in columns}}
        row["partial"] = (partial or {}).get(config, {})
        row["average"] = average(row["cells"], full) if full is not None else None
        if seconds is not None:
            row["total_seconds"] = seconds.get(config)
        rows.append(row)
    return {"columns": columns, "rows": rows}


def minutes(seconds: float | None) -> str:
    """The paper's Min:Sec."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    whole = round(seconds)
    return f"{whole // 60}:{whole % 60:02d}"


def markdown(table: dict, digits: dict[str, int] | None = None) -> str:
    """The table as markdown: a cell the run could not score (a server-scored split) is "-", and
    the Average of a row covers the columns it has."""
    digits = digits or {}
    columns, timed = table["columns"], any("total_seconds" in r for r in table["rows"])
    header = ["config", *(["total time"] if timed else []), *columns, "Average"]
    out = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for r in table["rows"]:
        cells = ["-" if r["cells"][c] is None else f"{r['cells'][c]:.{digits.get(c, 1)}f}" for c in columns]
        cells = [
            f"{cell} ({r['partial'][c]} answered)" if c in r.get("partial", {}) else cell
            for cell, c in zip(cells, columns, strict=True)
        ]
        time = [minutes(r.get("total_seconds"))] if timed else []
        average = "-" if r["average"] is None else f"{r['average']:.1f}%"
        out.append("| " + " | ".join([r["config"], *time, *cells, average]) + " |")
    return "\n".join(out)
