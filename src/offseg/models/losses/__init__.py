"""Training losses that need more than per-pixel cross-entropy."""
