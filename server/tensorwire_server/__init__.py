"""tensorwire server: runs models, gradients and allowlisted torch functions for remote clients."""

__version__ = "0.1.0"
