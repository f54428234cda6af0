"""BPF C sources, shipped as package data (see nfsreset.tracker)."""
