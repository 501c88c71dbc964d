"""Model: architectures as data, loading and saving models, calibration/evaluation data, checkpoint directories. Imports only awqnb.core."""
