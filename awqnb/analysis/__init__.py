"""Analysis: evaluation, verdicts, diagnostics, sensitivity and their cache. Imports the layers below (core … export)."""
