"""Built-in training schemes (stage planners)."""
