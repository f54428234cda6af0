"""The flow table from BPF: the program (bpf/flowtrack.c), BTF offsets, the ring
readers, clock pairing and the tracker that keeps the table."""
