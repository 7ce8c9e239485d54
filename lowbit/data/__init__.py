"""Datasets: local files (or hub names), calibration sampling."""
