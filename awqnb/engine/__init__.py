"""Engine: the block walk over a decoder model and the forward hooks it uses. Imports awqnb.core and awqnb.model."""
