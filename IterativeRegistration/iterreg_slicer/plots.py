"""Convergence plot: one table row per step, one plot series per metric, one chart, updated live."""
from __future__ import annotations

import math

import vtk

__all__ = ["MetricsPlot", "STANDARD_SERIES"]

# (metric key, legend, colour): every method reports these (iterreg.methods.base.standard_step_metrics)
STANDARD_SERIES = (
    ("similarity", "similarity loss", (0.12, 0.47, 0.71)),
    ("regularizer", "regularizer", (1.0, 0.5, 0.05)),
    ("update_norm", "update norm (voxels)", (0.17, 0.63, 0.17)),
    ("folding_percent", "folding %", (0.84, 0.15, 0.16)),
)
_EXTRA_COLOURS = ((0.58, 0.4, 0.74), (0.55, 0.34, 0.29), (0.89, 0.47, 0.76), (0.5, 0.5, 0.5))


class MetricsPlot:
    """Table ``<name> metrics`` (column ``step`` + one per metric) and chart ``<name> convergence``.

    Method-specific numeric metrics (e.g. DEQ residual, IIRP level) get their own column and series the
    first time they appear; rows before that hold NaN there.
    """

    def __init__(self, scene, name: str, tag: dict[str, str] | None = None):
        self.scene = scene
        self.tag = dict(tag or {})
        self.table = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{name} metrics")
        self.chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", f"{name} convergence")
        self.chart.SetTitle(f"{name}: convergence")
        self.chart.SetXAxisTitle("step")
        self.chart.SetYAxisTitle("value")
        self.series: dict[str, object] = {}
        self.nodes = [self.table, self.chart]
        steps = vtk.vtkIntArray()
        steps.SetName("step")
        self.table.GetTable().AddColumn(steps)
        for key, legend, colour in STANDARD_SERIES:
            self._add_series(key, legend, colour)
        for node in (self.table, self.chart):
            self._tag(node)

    def _tag(self, node) -> None:
        for k, v in self.tag.items():
            node.SetAttribute(k, v)

    def _add_series(self, key: str, legend: str, colour) -> None:
        column = vtk.vtkDoubleArray()
        column.SetName(key)
        rows = self.table.GetTable().GetNumberOfRows()
        for _ in range(rows):
            column.InsertNextValue(math.nan)
        self.table.GetTable().AddColumn(column)
        series = self.scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{self.chart.GetName()} {legend}")
        series.SetAndObserveTableNodeID(self.table.GetID())
        series.SetXColumnName("step")
        series.SetYColumnName(key)
        series.SetPlotType(series.PlotTypeScatter)
        series.SetMarkerStyle(series.MarkerStyleNone)
        series.SetColor(*colour)
        self._tag(series)
        self.chart.AddAndObservePlotSeriesNodeID(series.GetID())
        self.series[key] = series
        self.nodes.append(series)

    def add(self, index: int, metrics: dict[str, float]) -> None:
        table = self.table.GetTable()
        for key, value in metrics.items():
            if key not in self.series and isinstance(value, (int, float)):
                colour = _EXTRA_COLOURS[(len(self.series) - len(STANDARD_SERIES)) % len(_EXTRA_COLOURS)]
                self._add_series(key, key.replace("_", " "), colour)
        for c in range(table.GetNumberOfColumns()):
            column = table.GetColumn(c)
            name = column.GetName()
            if name == "step":
                column.InsertNextValue(int(index))
            else:
                value = metrics.get(name, math.nan)
                column.InsertNextValue(float(value) if isinstance(value, (int, float)) else math.nan)
        table.Modified()
        self.table.Modified()

    def column(self, key: str) -> list[float]:
        column = self.table.GetTable().GetColumnByName(key)
        return [column.GetValue(i) for i in range(column.GetNumberOfTuples())]
