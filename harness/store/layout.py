"""Format of the packed expert store: `experts.bin` (each (layer, expert) one contiguous, 4 KiB-aligned
blob holding that expert's slice of every stacked parameter of the model's experts module, e.g.
gate_up_proj then down_proj, in the in-memory layout of transformers) and `index.json`.

Format 2: each entry carries the xxh3-64 of its blob's payload, seeded with its (layer, expert) so that
an index whose entries were relabelled fails too (`harness.store.checksum`); the index records where
the pack came from (checkpoint files, the config fields that shape experts, the non-expert weights'
hash). Format 1 (CRC32, never checked on read) is re-packed.

Quantized packs (`expert_dtype` int8 or int4) store each 2D weight as its integer values followed by a
`NAME@scale` tensor of float16 group scales (harness.models.quant); 1D tensors (biases) stay in `dtype`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import xxhash

from harness.errors import HarnessError

STORE_FORMAT_VERSION = 2
ALIGN_BYTES = 4096
"""Blob alignment and stride granularity: the largest logical block size of common SSDs, as O_DIRECT needs."""
PACK_DIR = "packed"
EXPERTS_FILE = "experts.bin"
INDEX_FILE = "index.json"
DENSE_FILE = "dense.safetensors"
SCALE_SUFFIX = "@scale"
"""Name suffix of a quantized tensor's group scales inside a blob."""


def align_up(n: int, to: int = ALIGN_BYTES) -> int:
    return (n + to - 1) // to * to


@dataclass
class TensorSlot:
    name: str
    shape: list[int]
    offset: int
    """Byte offset inside the blob."""
    nbytes: int
    dtype: str | None = None
    """torch dtype name of the stored values when it differs from the index's `dtype` (quantized packs)."""


@dataclass
class ExpertEntry:
    layer: int
    expert: int
    offset: int
    """Byte offset of the blob in experts.bin (a multiple of ALIGN_BYTES)."""
    xxh3: str
    """xxh3-64 of the blob's payload (padding excluded) seeded with (layer, expert), 16 hex digits."""


@dataclass
class PackIndex:
    model_type: str
    dtype: str
    """torch dtype name of the expert tensors, e.g. 'bfloat16'."""
    num_experts: int
    top_k: int
    moe_layers: list[int]
    expert_bytes: int
    """Payload bytes of one expert (unpadded)."""
    stride_bytes: int
    """Bytes between consecutive blobs (expert_bytes rounded up to ALIGN_BYTES)."""
    tensors: list[TensorSlot]
    entries: list[ExpertEntry]
    dense_bytes: int
    source_fingerprint: dict[str, list[int]]
    """checkpoint file name -> [size, mtime_ns]: a re-pack is needed when it changes."""
    source_config: dict[str, object]
    """The config.json fields that shape experts and weights, as packed: a run refuses a config changed since."""
    dense_xxh3: str
    """xxh3-128 of dense.safetensors (the non-expert weights), 32 hex digits."""
    format_version: int = STORE_FORMAT_VERSION
    extra: dict[str, object] = field(default_factory=dict)
    expert_dtype: str = ""
    """How expert weights are stored: `dtype` itself (or "" in packs older than quantization), int8 or int4."""
    group_size: int | None = None
    """Weights per float16 scale of a quantized pack."""
    bits_per_weight: float = 0.0
    """Stored bits per expert weight (scales included): 16 for bfloat16, 8.5 for int8 and 4.5 for int4 at group 32."""

    @property
    def expert_params(self) -> list[str]:
        """The experts module's parameter names, in blob order."""
        return [t.name for t in self.tensors if SCALE_SUFFIX not in t.name]

    def entry(self, layer: int, expert: int) -> ExpertEntry:
        return self._by_key[(layer, expert)]

    def __post_init__(self) -> None:
        self._by_key = {(e.layer, e.expert): e for e in self.entries}

    def experts_digest(self) -> str:
        """Content identity of all expert bytes: xxh3-128 over every entry's key and checksum, in key order
        (derived from the index, so cheap; the checksums were computed from the bytes when packing)."""
        ordered = sorted(self.entries, key=lambda e: (e.layer, e.expert))
        lines = "".join(f"{e.layer}:{e.expert}:{e.xxh3}\n" for e in ordered)
        return xxhash.xxh3_128_hexdigest(lines.encode())

    @property
    def total_expert_bytes(self) -> int:
        return self.expert_bytes * len(self.entries)

    def save(self, path: Path) -> None:
        data = asdict(self)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> PackIndex:
        try:
            data = json.loads(Path(path).read_text())
            version = data.get("format_version") if isinstance(data, dict) else None
            if version != STORE_FORMAT_VERSION:
                raise HarnessError(
                    f"{path} has store format {version}, this harness reads {STORE_FORMAT_VERSION} (per-read "
                    "xxh3 checksums and provenance); re-run `harness model pack` to re-pack it"
                )
            data["tensors"] = [TensorSlot(**t) for t in data["tensors"]]
            data["entries"] = [ExpertEntry(**e) for e in data["entries"]]
            index = cls(**data)
        except FileNotFoundError:
            raise HarnessError(f"{path} not found: run `harness model pack` on the model first") from None
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise HarnessError(f"{path} is not a valid expert index ({exc}); re-run `harness model pack`") from None
        return index
