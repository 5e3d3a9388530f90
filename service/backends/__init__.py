"""Model backends behind one interface (`service.backends.base.Backend`)."""

from __future__ import annotations

from service.backends.base import Backend, BackendLoadError

__all__ = ["Backend", "BackendLoadError"]
