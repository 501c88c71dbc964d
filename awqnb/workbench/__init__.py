"""Workbench: report notebooks, sweeps, plots and widgets. Imports the layers below (core … compare)."""
