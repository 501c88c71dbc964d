"""Core: configuration, the quantization grid, dtypes, errors, files, progress. No model knowledge; imports nothing else from awqnb."""
