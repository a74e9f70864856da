"""Worked examples that use the collected features (not part of the installed distribution)."""
