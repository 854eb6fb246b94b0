"""Peer engines run on the same workload, token budget and RAM budget as the offload engine, writing the
same result.json shape: Hugging Face accelerate disk offload and llama.cpp (llama-cpp-python)."""

from harness.peers.common import run_peer

__all__ = ["run_peer"]
