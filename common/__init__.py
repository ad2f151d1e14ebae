"""invact.common — torch-free, numpy-free definitions that both the fitter and the runtime read.

The fitter (``invact.fitting``) and the runtime (``invact``) may not import each other
(docs/architecture.md); what both sides must agree on — the activation catalog, float32 constants
shared by generated kernels, the table hash, the version — lives here, in plain Python.
"""

VERSION = "0.1.0"   # the distribution's (pyproject.toml's): invact.__version__ and every table's invact_version
