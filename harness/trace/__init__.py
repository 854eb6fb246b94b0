"""Routing traces: the Parquet schema, the recorder, importers of public formats, and the simulator."""
