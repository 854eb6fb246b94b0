"""The typed, versioned result.json: one pydantic model that every writer fills and every reader checks.

Writers: a run, a failed run, a peer, a skipped peer, a failed sweep cell. Readers: the report loader,
sweep resume, rerun. A reader refuses a schema version it does not know with a one-line HarnessError.
Field names are the ones report code reads; new fields are added, never renamed. Sections whose
contents grow with the code (resolved, strategy, environment, ...) are open mappings; `metrics` names
the figures readers rely on and allows any other key.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from harness.errors import ExitCode, HarnessError
from harness.results import read_json, write_json_atomic

if TYPE_CHECKING:
    from harness.identity import RunIdentity
    from harness.spec import RunSpec

RESULT_SCHEMA_VERSION = 2
"""2: adds `content` and `machine` (the run's content-addressed identity); 1 files stay readable."""
READABLE_SCHEMA_VERSIONS = (1, 2)
RESULT_FILE = "result.json"
Status = Literal["ok", "failed", "skipped"]


class ValidityVerdict(BaseModel):
    """Whether the numbers mean what they say, with reasons and what to do about them."""

    model_config = ConfigDict(extra="forbid")

    valid: bool
    reasons: list[str] = Field(default_factory=list)
    suggestions: list[str] = Field(default_factory=list)


class Generated(BaseModel):
    """The token ids one prompt produced (what a rerun compares)."""

    model_config = ConfigDict(extra="allow")

    prompt_index: int
    id: str | None = None
    token_ids: list[int]


class Metrics(BaseModel):
    """The figures sweep tables and reports read; any further metric is kept as an extra key."""

    model_config = ConfigDict(extra="allow")

    decode_tokens_per_s: float | None = None
    prefill_tokens_per_s: float | None = None
    hit_rate_decode: float | None = None
    hit_rate_prefill: float | None = None
    ssd_read_bytes: int | None = None
    ssd_read_bytes_per_token: float | None = None


class RunResult(BaseModel):
    """One result.json."""

    model_config = ConfigDict(extra="allow")

    schema_version: int
    run_id: str
    status: Status
    error: str | None = None
    spec: dict[str, Any]
    content: dict[str, str | None] | None = Field(None, description="Checksums the run_id was derived from.")
    machine: dict[str, Any] | None = Field(None, description="Hostname and hardware fingerprint.")
    resolved: dict[str, Any] | None = None
    metrics: Metrics | None = None
    strategy: dict[str, Any] | None = None
    generated: list[Generated] | None = None
    environment: dict[str, Any] | None = None
    storage: dict[str, Any] | None = None
    hardware_profile: str | None = None
    telemetry: dict[str, Any] | None = None
    validity: ValidityVerdict | None = None
    files: dict[str, str] = Field(default_factory=dict)
    traceback: str | None = None
    failure: dict[str, Any] | None = Field(None, description="How the sweep saw a failed cell end.")

    @classmethod
    def envelope(
        cls, spec: RunSpec, identity: RunIdentity, status: Status = "ok", error: str | None = None, **fields: Any
    ) -> RunResult:
        """A result with the head every writer shares (version, id, status, error, spec, identity)."""
        return cls(
            schema_version=RESULT_SCHEMA_VERSION,
            run_id=identity.run_id,
            status=status,
            error=error,
            spec=spec.canonical(),
            content=identity.content,
            machine=identity.machine,
            **fields,
        )

    @property
    def valid(self) -> bool | None:
        return None if self.validity is None else self.validity.valid

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="python")

    def save(self, run_dir: Path) -> Path:
        return write_json_atomic(Path(run_dir) / RESULT_FILE, self.to_dict())


def parse_result(data: Any, where: str | Path) -> RunResult:
    """Check a parsed result.json: a known schema version, then the model; one-line error otherwise."""
    if not isinstance(data, dict) or "schema_version" not in data or "run_id" not in data:
        raise HarnessError(f"{where} is not a harness result (no schema_version / run_id)")
    version = data["schema_version"]
    if version not in READABLE_SCHEMA_VERSIONS:
        known = ", ".join(map(str, READABLE_SCHEMA_VERSIONS))
        raise HarnessError(
            f"{where} has result schema version {version!r}; this harness reads versions {known} "
            "(use the harness version that wrote it)"
        )
    try:
        return RunResult.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "result"
        raise HarnessError(f"{where}: invalid result: {field}: {first['msg']}") from None


def load_result(path: str | Path) -> RunResult:
    """Read and check one result.json (a folder means the result.json inside it)."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULT_FILE
    try:
        data = read_json(path)
    except OSError as exc:
        raise HarnessError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise HarnessError(f"{path} is not JSON ({exc})") from None
    return parse_result(data, path)


def exit_code(result: RunResult) -> ExitCode:
    """The exit status a command reports for one result: ok and valid 0, INVALID 3, failed 4; a skipped peer
    (not installed here) was refused before measuring, 2."""
    if result.status == "failed":
        return ExitCode.FAILED
    if result.status == "skipped":
        return ExitCode.BAD_INPUT
    return ExitCode.OK if result.valid is not False else ExitCode.INVALID


def summary_row(result: RunResult) -> dict[str, Any]:
    """The key figures of one result, as `harness run --json` and the sweep's table and `--json` show them."""
    m = result.metrics or Metrics()
    return {
        "run_id": result.run_id,
        "status": result.status,
        "valid": result.valid,
        "error": result.error,
        "decode_tokens_per_s": m.decode_tokens_per_s,
        "hit_rate_decode": m.hit_rate_decode,
        "ssd_read_bytes_per_token": m.ssd_read_bytes_per_token,
        "machine": (result.machine or {}).get("fingerprint"),
    }
