"""Lightning callbacks shared by several zoo models."""
