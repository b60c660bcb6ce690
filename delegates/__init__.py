"""Execution backends for SMTM models."""

from delegates.cpu import CpuBackend

BACKENDS = {"cpu": CpuBackend}


def make_backend(name: str = "cpu", **kwargs):
    """Returns a backend by name (`--backend` flag)."""
    if name not in BACKENDS:
        raise ValueError(f"Unknown backend {name!r}; available: {sorted(BACKENDS)}.")
    return BACKENDS[name](**kwargs)
