"""The command line: the entry point (main), the fast hook parser (hooks), the
full typer application (app), what both share (common), and doctor's checks."""
