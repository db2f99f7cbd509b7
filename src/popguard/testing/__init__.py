"""The harness that tests and benchmarks share: private servers, organizations, load.

The top layer: it may import anything in popguard, and nothing else in popguard
imports it.
"""
