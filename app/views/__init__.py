"""Qt views of SegScope. Only modules in this package import Qt."""
