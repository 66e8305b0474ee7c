"""Developer tools run from the repository root with `python -m tools.<name>` (not installed)."""
