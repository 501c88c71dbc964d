"""Quantization: the pipeline, mixed-precision plans, method configs, importance vectors and the methods. Imports core, model, engine."""
