"""nfsreset: make TCP clients recover at once when a floating IP moves."""

__version__ = "0.1.0"
