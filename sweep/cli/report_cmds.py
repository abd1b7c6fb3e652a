"""Commands: placeholder until this area lands."""

from sweep.cli import app  # noqa: F401
