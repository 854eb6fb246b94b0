"""Storage bytes this process made the device read, attributed to prefill and decode.

Samples /proc/self/io `read_bytes` (O_DIRECT reads, page-cache misses and read-ahead caused by this
process; page-cache hits and other processes' reads on the same disk do not count) at every phase
boundary. Used where expert bytes are not read by the harness's own reader: memory-mapped experts
(Fiddler-, DAOP-style) and peers (accelerate, llama.cpp).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.telemetry.probes import process_io_bytes


@dataclass
class PhaseReadBytes:
    by_phase: dict[str, int] = field(default_factory=lambda: {"prefill": 0, "decode": 0})
    _phase: str | None = None
    _last: int = 0
    _excluded: int = 0

    def mark(self, phase: str | None) -> None:
        """Close the running phase's interval and open `phase`'s (None: the measured run ended)."""
        if phase == self._phase:
            return
        now = process_io_bytes()[0]
        if self._phase is not None:
            self.by_phase[self._phase] += max(0, now - self._last - self._excluded)
        self._phase, self._last, self._excluded = phase, now, 0

    def exclude(self, nbytes: int) -> None:
        """Bytes of the running interval that are counted elsewhere (the harness's own O_DIRECT reads)."""
        self._excluded += nbytes

    @property
    def total(self) -> int:
        return sum(self.by_phase.values())
