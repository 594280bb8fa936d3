"""The report of a compare run: moved to the package manyicl.reporting; kept so that ``manyicl.report`` (the
command line's import path) still works."""

from manyicl.reporting import method_summaries, summary_table, write_report

__all__ = ["method_summaries", "summary_table", "write_report"]
