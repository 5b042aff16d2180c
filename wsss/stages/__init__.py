"""One module per pipeline command: Lightning systems, writers and thin CLIs."""
