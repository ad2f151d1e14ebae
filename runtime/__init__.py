"""invact — memory-efficient activations that save their output instead of their input."""
__version__ = "0.1.0"
