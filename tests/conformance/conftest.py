"""The kit's own pytest fixture, imported the way a downstream project would use it."""

from dopsd_ref.conformance.pytest_plugin import dopsd_conformance  # noqa: F401
