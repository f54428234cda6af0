"""`nfsreset watch`: the long-running daemon, its config, log, metrics and live table."""
