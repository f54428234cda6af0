"""BPF C sources, shipped as package data (see nfsreset.flows.tracker)."""
