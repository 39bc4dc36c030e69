"""Speed and memory of every loss provider side by side, and of the metrics engine.

Run ``python -m benchmarks --help``; how to read the results is in benchmarks/README.md.
"""
