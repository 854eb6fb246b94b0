"""The held-out protocol: a trace cut into a training part and a scored (held-out) part.

- `seq:N`: the first N sequences by seq_id train, the rest are scored (N >= 1, at least one left over).
- `frac:F` (0 < F < 1): the first F share of the token steps (all sequences together, in step order)
  train, the rest are scored; a sequence may be cut, which is how a single-stream trace (an imported
  vLLM log) is split.
Traces carry no session field (README, "Routing traces"), so a session split is a sequence split.

Profile-based and learned policies profile or train on the training part only, and every policy is
scored on the held-out part only (README: on the data it has seen, a learned policy memorises).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from harness.errors import HarnessError
from harness.trace.schema import SequenceRouting, Trace


@dataclass(frozen=True)
class Split:
    kind: str  # "seq" or "frac"
    value: float

    def __str__(self) -> str:
        return f"seq:{int(self.value)}" if self.kind == "seq" else f"frac:{self.value:g}"


def parse_split(text: str) -> Split:
    kind, _, value = text.strip().partition(":")
    try:
        if kind == "seq":
            number = int(value)
            if number >= 1:
                return Split("seq", number)
        elif kind == "frac":
            share = float(value)
            if 0 < share < 1:
                return Split("frac", share)
    except ValueError:
        pass
    raise HarnessError(
        f"cannot read split {text!r}: use seq:N (the first N sequences train) or frac:F (the first F share of "
        "the token steps trains, 0 < F < 1)"
    )


def split_trace(trace: Trace, split: Split) -> tuple[Trace, Trace]:
    """(training part, held-out part), both with the trace's metadata; neither is empty."""
    seqs = sorted(trace.sequences, key=lambda s: s.seq_id)
    if split.kind == "seq":
        n = int(split.value)
        if n >= len(seqs):
            raise HarnessError(
                f"split {split} leaves nothing held out: the trace has {len(seqs)} sequence(s)"
                + ("; split a single stream with frac:F" if len(seqs) == 1 else "")
            )
        return Trace(trace.meta, seqs[:n]), Trace(trace.meta, seqs[n:])
    steps = np.unique(np.concatenate([s.step for s in seqs])) if seqs else np.array([], dtype=np.int64)
    cut_index = math.floor(split.value * len(steps))
    if cut_index < 1 or cut_index >= len(steps):
        raise HarnessError(f"split {split} leaves an empty part: the trace has {len(steps)} token step(s)")
    cut = steps[cut_index]  # the first held-out step
    train = [part for s in seqs if (part := _rows(s, s.step < cut)) is not None]
    heldout = [part for s in seqs if (part := _rows(s, s.step >= cut)) is not None]
    return Trace(trace.meta, train), Trace(trace.meta, heldout)


def _rows(seq: SequenceRouting, keep: np.ndarray) -> SequenceRouting | None:
    if not keep.any():
        return None
    return SequenceRouting(
        seq.seq_id,
        seq.step[keep],
        seq.pos[keep],
        seq.phase[keep],
        seq.experts[keep],
        None if seq.weights is None else seq.weights[keep],
    )
