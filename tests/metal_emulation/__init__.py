"""CPU emulation of the Metal kernels (see emulator.py)."""

from .emulator import EmulationError, Emulator, find_compiler  # noqa: F401
