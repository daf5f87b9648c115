"""Plain, readable reference implementations that the fast paths are tested against."""
from . import classifier  # noqa: F401
