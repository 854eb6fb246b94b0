"""The live engine: offloaded-experts modules, the expert cache mechanism, generation and its metrics."""
