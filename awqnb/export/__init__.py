"""Export: deployable checkpoints (compressed-tensors pack-quantized). Imports core, model, engine, quant."""
