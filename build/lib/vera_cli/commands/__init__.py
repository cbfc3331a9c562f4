"""One module per command, each its own logic only, on top of lifecycle."""
