"""The report's in-context learning curves: moved to manyicl.reporting.curves (statistics and markdown) and
manyicl.reporting.plots.learning_curves (the figure); kept so that the old import path still works."""

from manyicl.reporting.curves import (
                                      TABLE_KS,
                                      Curve,
                                      at_k,
                                      average_difference_at_last_k,
                                      curve_band,
                                      curve_sections,
                                      curve_table,
                                      difference_at_k,
                                      load_curve_table,
                                      paired,
)

__all__ = ["TABLE_KS", "Curve", "at_k", "average_difference_at_last_k", "curve_band", "curve_sections", "curve_table",
           "difference_at_k", "load_curve_table", "paired"]
