"""One module per kernel interface (rtnetlink, sock_diag, raw sockets, nftables,
namespaces): thin adapters over what the kernel offers, no policy."""
