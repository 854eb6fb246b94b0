"""SSD characterisation: block devices, the O_DIRECT profiler, the fio cross-check and the read-time model."""

from harness.ssd.devices import block_device_for_path, describe_path, list_devices

__all__ = ["block_device_for_path", "describe_path", "list_devices"]
