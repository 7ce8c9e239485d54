"""Models and plumbing: loading, architecture families, block walking, calibration capture, layer selection."""
