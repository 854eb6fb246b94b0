"""MoE offload harness: real MoE inference with experts on an SSD, cache policies, sweeps, reports."""

__version__ = "0.1.0"
