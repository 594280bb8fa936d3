"""The report of a run: its statistics (analysis.py, curves.py, budget.py, training.py), gathered once into a
report context (context.py), written as markdown sections (sections.py, text.py) and figures (plots.py), and
put together as report.md (document.py)."""

from manyicl.reporting.document import method_summaries, summary_table, write_report

__all__ = ["method_summaries", "summary_table", "write_report"]
