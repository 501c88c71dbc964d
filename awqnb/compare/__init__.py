"""Comparison runs: method configurations, the reference tools and the runner. Imports the layers below (core … analysis)."""
