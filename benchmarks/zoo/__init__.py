"""Training data and script for the shipped adapter zoo (``python -m benchmarks.zoo.train``)."""
