"""How the report writes a number: an estimate with its 95 % interval, a paired difference (bold when significant),
a gap closed."""

from __future__ import annotations

import numpy as np

from manyicl.reporting.analysis import GapClosed
from manyicl.uncertainty import Comparison, Estimate


def fmt(e: Estimate | None) -> str:
    if e is None:
        return "–"
    return f"{e.value:.3f}" if np.isnan(e.low) else f"{e.value:.3f} [{e.low:.3f}, {e.high:.3f}]"


def fmt_difference(c: Comparison | None, bold: bool = False, p_value: bool = False) -> str:
    """A paired difference with its interval (and p), **bold** when significant; "–" without one."""
    if c is None:
        return "–"
    text = f"{c.difference:+.3f} [{c.low:+.3f}, {c.high:+.3f}]" + (f" p={c.p_value:.3f}" if p_value else "")
    return f"**{text}**" if bold else text


def fmt_gap(gap: GapClosed) -> str:
    if gap.ratio is None:
        return "n/a (task_level ≤ base)"
    if gap.interval is None:
        return f"{gap.ratio:.2f}"
    low, high = gap.interval
    return f"{gap.ratio:.2f} [{low:.2f}, {high:.2f}]"
