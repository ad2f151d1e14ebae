"""invact.common — torch-free, numpy-free definitions that both the fitter and the runtime read.

The fitter (``invact.fitting``) and the runtime (``invact``) may not import each other
(docs/architecture.md); what both sides must agree on — the activation catalog, float32 constants
shared by generated kernels, the table hash — lives here, in plain Python.
"""
