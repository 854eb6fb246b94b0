"""The one cache loop: find, else evict until it fits, then insert. Shared by the engine and the simulator.

`ExpertCacheBook` owns which (layer, expert) sits in which slot and the hit/miss counters; the policy
only names victims. The live engine moves bytes according to the plans it returns, and the simulator
replays traces through the very same object, so simulated and live counts agree exactly. For compiled
policies (`harness.cache.compiled`) the simulator's steps run
in a compiled copy of `account` (without prefetch, which replay never uses) that calls the policy's own
compiled functions, the ones its hooks call live.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from harness.cache.base import CachePolicy
from harness.cache.compiled import CompiledPolicy, GroupReplay
from harness.errors import HarnessError
from harness.keys import PHASES, ExpertKey, Phase, Scope


@dataclass
class StepPlan:
    """What one layer's token step must do with its experts; slots index the whole slot pool."""

    hits: list[tuple[ExpertKey, int]] = field(default_factory=list)
    loads: list[tuple[ExpertKey, int]] = field(default_factory=list)
    streamed: list[ExpertKey] = field(default_factory=list)
    """Misses that get no slot (more experts needed than slots, or not admitted): load, use, release."""
    evicted: list[ExpertKey] = field(default_factory=list)
    dropped: list[ExpertKey] = field(default_factory=list)
    """Prefetched (staged) keys of the layer that this step did not need: their slots were freed."""


@dataclass
class AccessCounts:
    hits: int = 0
    misses: int = 0

    @property
    def accesses(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0


class _Partition:
    """One eviction group: a policy over a contiguous range of slots, with its hooks bound once.

    The bound methods are looked up at construction because the replay loop calls them millions of
    times; optional hooks the policy does not override (`on_step`, `admit`, `on_access` for misses
    where `observes_misses` is False) are None and not called.
    """

    __slots__ = (
        "admit",
        "capacity",
        "first_slot",
        "free",
        "on_access",
        "on_insert",
        "on_miss",
        "on_step",
        "policy",
        "replace",
        "replay_step",
        "resident",
        "staged",
    )

    def __init__(self, policy: CachePolicy, first_slot: int, capacity: int) -> None:
        self.policy = policy
        self.first_slot, self.capacity = first_slot, capacity
        self.resident: dict[ExpertKey, int] = {}
        self.staged: dict[ExpertKey, int] = {}
        """Prefetched keys not yet used by a step: they hold slots but the policy does not see them."""
        self.free = list(range(first_slot + capacity - 1, first_slot - 1, -1))  # pop() gives lowest
        self.on_access = policy.on_access
        self.on_miss = policy.on_access if policy.observes_misses else None
        self.replace = policy.replace
        self.on_insert = policy.on_insert
        self.replay_step = policy.replay_step
        self.admit = None if type(policy).admit is CachePolicy.admit else policy.admit
        self.on_step = None if type(policy).on_step is CachePolicy.on_step else policy.on_step


class ExpertCacheBook:
    """Slot bookkeeping for all MoE layers, in `per-layer` scope (one group of `capacity` slots per
    layer) or `global` scope (one group of `capacity` slots shared by all layers)."""

    def __init__(
        self,
        layers: Iterable[int],
        capacity: int,
        scope: Scope,
        make_policy: Callable[[int], CachePolicy],
    ) -> None:
        self.layers = list(layers)
        if capacity < 1:
            raise HarnessError("the expert cache needs at least one slot")
        if scope not in ("per-layer", "global"):
            raise HarnessError(f"unknown cache scope {scope!r}: use per-layer or global")
        self.scope: Scope = scope
        self.capacity = capacity
        if scope == "global":
            shared = _Partition(make_policy(capacity), 0, capacity)
            self._groups = {layer: shared for layer in self.layers}
            self.total_slots = capacity
        else:
            self._groups = {
                layer: _Partition(make_policy(capacity), i * capacity, capacity) for i, layer in enumerate(self.layers)
            }
            self.total_slots = capacity * len(self.layers)
        self.counts: dict[Phase, dict[int, AccessCounts]] = {
            phase: {layer: AccessCounts() for layer in self.layers} for phase in PHASES
        }

    @property
    def policies(self) -> list[CachePolicy]:
        unique: dict[int, CachePolicy] = {}
        for group in self._groups.values():
            unique.setdefault(id(group.policy), group.policy)
        return list(unique.values())

    def slot_of(self, key: ExpertKey) -> int | None:
        return self._groups[key[0]].resident.get(key)

    def resident_keys(self) -> set[ExpertKey]:
        keys: set[ExpertKey] = set()
        for group in {id(g): g for g in self._groups.values()}.values():
            keys.update(group.resident)
        return keys

    def staged_keys(self) -> set[ExpertKey]:
        keys: set[ExpertKey] = set()
        for group in {id(g): g for g in self._groups.values()}.values():
            keys.update(group.staged)
        return keys

    def step(self, layer: int, experts: Iterable[int], now: int, phase: Phase = "decode") -> StepPlan:
        """Account one token step of one layer that needs `experts` (duplicates are counted once)."""
        plan = StepPlan()
        self._run(layer, tuple([(layer, e) for e in sorted(set(experts))]), now, phase, plan)
        return plan

    def account(self, layer: int, keys: tuple[ExpertKey, ...], now: int, phase: Phase = "decode") -> None:
        """`step` without a plan, for replay: `keys` are the step's distinct keys of `layer`, sorted by expert.

        The simulator prepares the keys once per trace. Once the group is full (no free slot, nothing
        staged, every miss admitted) and holds at least as many keys as the step needs, so that every miss
        finds a victim, the step is one call of the policy's `replay_step` (the same decisions as the
        per-key hooks, fewer calls); otherwise it goes through the per-key loop (`_run`), which streams the
        misses that find no candidate.
        """
        group = self._groups[layer]
        resident = group.resident
        if group.free or group.staged or group.admit is not None or len(resident) < len(keys):
            self._run(layer, keys, now, phase, None)
            return
        misses, victims = group.replay_step(layer, keys, resident, now)
        counts = self.counts[phase][layer]
        missed = len(misses)
        counts.hits += len(keys) - missed
        if missed:
            counts.misses += missed
            # Each miss takes a victim's slot. A plain loop (dict.update(zip(...)) is slower for a few pairs)
            # over a plain zip: the lengths match by contract, and zip(strict=) costs a keyword parse per call.
            for key, victim in zip(misses, victims):  # noqa: B905
                resident[key] = resident.pop(victim)

    def account_stream(self, calls: Sequence[tuple[int, tuple[ExpertKey, ...], int, Phase]]) -> None:
        """`account` for each (layer, keys, now, phase) call in order. Where the groups' policies are
        compiled (`_compiled`), the steps run in the policy's compiled `replay`, which makes the calls of the
        policy's own compiled hooks that `account` would; a step wider than its group (some misses
        streamed), a group holding prefetched keys and other policies go through `account`."""
        groups = {id(g): g for g in self._groups.values()}.values()
        if not calls or not all(_compiled(g) for g in groups):
            account = self.account
            for layer, keys, now, phase in calls:
                account(layer, keys, now, phase)
            return
        prepared = prepared_calls(calls)
        hits = np.zeros(len(calls), dtype=np.int64)
        misses = np.zeros(len(calls), dtype=np.int64)
        for group in groups:
            layers = [layer for layer in self.layers if self._groups[layer] is group]
            self._replay_group(group, layers, calls, prepared, hits, misses)
        # Per-call counts -> (phase, layer) totals.
        layer_pos = {layer: i for i, layer in enumerate(self.layers)}
        book_pos = np.array([layer_pos[layer] for layer in prepared.layer_list], dtype=np.int64)
        cell = prepared.phase * len(self.layers) + book_pos[prepared.call_layer]
        n_cells = len(PHASES) * len(self.layers)
        for name, per_call in (("hits", hits), ("misses", misses)):
            totals = np.bincount(cell, weights=per_call, minlength=n_cells).astype(np.int64).tolist()
            for p, phase in enumerate(PHASES):
                for i, layer in enumerate(self.layers):
                    counts = self.counts[phase][layer]
                    setattr(counts, name, getattr(counts, name) + totals[p * len(self.layers) + i])

    def _replay_group(
        self,
        group: _Partition,
        layers: list[int],
        calls: Sequence[tuple[int, tuple[ExpertKey, ...], int, Phase]],
        prepared: PreparedCalls,
        hits: np.ndarray,
        misses: np.ndarray,
    ) -> None:
        policy = group.policy
        assert isinstance(policy, CompiledPolicy)
        keys, mine = prepared.for_group(policy, layers)
        universe = policy.keys
        mark = np.zeros(policy.slots, dtype=np.int64)
        i = 0
        while i < len(mine):
            if not group.staged:
                r = _group_replay(group, policy, keys, prepared, mine, mark, hits, misses)
                i = policy.replay(r, i)
                first = group.first_slot
                group.resident = {universe[k]: first + s for s, k in enumerate(r.key_of_slot.tolist()) if k >= 0}
                group.free = r.free[: r.n_free[0]].tolist()
                if i == len(mine):
                    break
            layer, step_keys, now, phase = calls[int(mine[i])]
            self.account(layer, step_keys, now, phase)
            i += 1

    def _run(self, layer: int, needed: tuple[ExpertKey, ...], now: int, phase: Phase, plan: StepPlan | None) -> None:
        group = self._groups[layer]
        resident = group.resident
        on_access, on_miss = group.on_access, group.on_miss
        if group.on_step is not None:
            group.on_step(layer, now)
        misses: list[ExpertKey] = []
        hits = 0
        staged = group.staged
        # Every needed key is marked used before any miss is handled, so none of them is evicted.
        for key in needed:
            slot = resident.get(key)
            if slot is None and staged and key in staged:
                # Prefetched: a hit for the counts; the policy sees the demand load it replaced.
                slot = resident[key] = staged.pop(key)
                if on_miss is not None:
                    on_miss(key, now, False)
                group.on_insert(key, now)
                hits += 1
                if plan is not None:
                    plan.hits.append((key, slot))
            elif slot is None:
                misses.append(key)
                if on_miss is not None:
                    on_miss(key, now, False)
            else:
                hits += 1
                on_access(key, now, True)
                if plan is not None:
                    plan.hits.append((key, slot))
        if staged:
            for key in [k for k in staged if k[0] == layer]:
                group.free.append(staged.pop(key))
                if plan is not None:
                    plan.dropped.append(key)
        counts = self.counts[phase][layer]
        counts.hits += hits
        if misses:
            counts.misses += len(misses)
            self._insert(group, needed, misses, now, plan)

    @staticmethod
    def _insert(
        group: _Partition, needed: tuple[ExpertKey, ...], misses: list[ExpertKey], now: int, plan: StepPlan | None
    ) -> None:
        """Give each miss a free slot or a victim's, or stream it (no candidate left, or not admitted)."""
        resident, free = group.resident, group.free
        # Built on the first eviction and kept current (the victim leaves it; inserted keys are
        # needed, so never candidates): the same set the policy would see if rebuilt per miss.
        candidates: set[ExpertKey] | None = None
        for key in misses:
            if free:
                slot = free.pop()
                resident[key] = slot
                group.on_insert(key, now)
            else:
                if candidates is None:
                    candidates = resident.keys() - set(needed)
                if not candidates or (group.admit is not None and not group.admit(key, candidates, now)):
                    if plan is not None:
                        plan.streamed.append(key)
                    continue
                victim = group.replace(candidates, key, now)
                candidates.discard(victim)
                slot = resident.pop(victim)
                resident[key] = slot
                if plan is not None:
                    plan.evicted.append(victim)
            if plan is not None:
                plan.loads.append((key, slot))

    def prefetch(self, layer: int, experts: Iterable[int], now: int, protect: Collection[ExpertKey] = ()) -> StepPlan:
        """Stage `experts` of `layer` ahead of their use, without counting an access.

        Resident or already staged keys are listed as hits. Each other key takes a free slot or, when the
        group is full, the slot of the policy's victim among resident keys that are neither requested
        here nor in `protect` (the keys of the step in flight); a key that finds no candidate is left
        out. Staged keys are invisible to the policy until used: the next `step` of `layer` that needs
        one counts a hit and tells the policy what a demand load would have (a miss, then an insert);
        that step drops the layer's staged keys it does not need (`StepPlan.dropped`).
        """
        plan = StepPlan()
        group = self._groups[layer]
        resident, staged, policy = group.resident, group.staged, group.policy
        wanted = [(layer, e) for e in sorted(set(experts))]
        candidates: set[ExpertKey] | None = None
        for key in wanted:
            slot = resident.get(key, staged.get(key))
            if slot is not None:
                plan.hits.append((key, slot))
                continue
            if group.free:
                slot = group.free.pop()
            else:
                if candidates is None:
                    candidates = resident.keys() - set(wanted) - set(protect)
                if not candidates:
                    break
                victim = policy.victim(candidates, key, now)
                policy.on_evict(victim, now)
                candidates.discard(victim)
                slot = resident.pop(victim)
                plan.evicted.append(victim)
            staged[key] = slot
            plan.loads.append((key, slot))
        return plan

    def place(self, key: ExpertKey, now: int) -> int | None:
        """Make `key` resident in a free slot without counting an access (static placement); its slot,
        or None when its group has no free slot. The policy sees an insert."""
        group = self._groups[key[0]]
        if key in group.resident:
            return group.resident[key]
        if not group.free:
            return None
        slot = group.resident[key] = group.free.pop()
        group.on_insert(key, now)
        return slot

    def discard(self, key: ExpertKey, now: int) -> int | None:
        """Drop a resident or staged `key` (its slot becomes free); the freed slot, or None if absent."""
        group = self._groups[key[0]]
        slot = group.staged.pop(key, None)
        if slot is None:
            slot = group.resident.pop(key, None)
            if slot is None:
                return None
            group.policy.on_evict(key, now)
        group.free.append(slot)
        return slot

    def total(self, phase: Phase | None = None) -> AccessCounts:
        phases = PHASES if phase is None else (phase,)
        out = AccessCounts()
        for p in phases:
            for c in self.counts[p].values():
                out.hits += c.hits
                out.misses += c.misses
        return out


def _group_replay(
    group: _Partition,
    policy: CompiledPolicy,
    keys: np.ndarray,
    prepared: PreparedCalls,
    mine: np.ndarray,
    mark: np.ndarray,
    hits: np.ndarray,
    misses: np.ndarray,
) -> GroupReplay:
    """The compiled replay's view of `group` as it stands (its resident keys and free slots) and of its calls."""
    slot_of = np.full(policy.slots, -1, dtype=np.int64)
    key_of_slot = np.full(group.capacity, -1, dtype=np.int64)
    for key, slot in group.resident.items():
        at = policy.index[key]
        slot_of[at] = slot
        key_of_slot[slot - group.first_slot] = at
    free = np.array(group.free, dtype=np.int64)
    return GroupReplay(
        keys=keys,
        bounds=prepared.bounds,
        nows=prepared.now,
        calls=mine,
        slot_of=slot_of,
        key_of_slot=key_of_slot,
        first_slot=group.first_slot,
        free=free,
        n_free=np.array([len(free)], dtype=np.int64),
        mark=mark,
        hits=hits,
        misses=misses,
    )


def _compiled(group: _Partition) -> bool:
    """Whether the group's steps can run in its policy's compiled `replay`: a `CompiledPolicy`, whose hooks
    (admission included) are its kernel's."""
    return isinstance(group.policy, CompiledPolicy)


@dataclass
class PreparedCalls:
    """A replay's calls as arrays, built once per call list (the simulator replays one list many times)."""

    calls: Sequence[tuple[int, tuple[ExpertKey, ...], int, Phase]]
    layer_list: list[int]  # distinct layers, sorted
    call_layer: np.ndarray  # [calls] position in layer_list
    phase: np.ndarray  # [calls] index into PHASES
    now: np.ndarray  # [calls] the step's clock
    bounds: np.ndarray  # [calls + 1] each call's keys are key_code[bounds[c]:bounds[c+1]]
    key_code: np.ndarray  # [keys] index into `universe`
    universe: list[ExpertKey]  # distinct keys, sorted
    universe_layer: np.ndarray  # [universe] layer of each key
    by_group: dict[tuple[int, ...], tuple[list[ExpertKey], np.ndarray, np.ndarray, np.ndarray]] = field(
        default_factory=dict
    )
    """Per group's layers: its keys (of `universe`), their positions in the last policy seen, and `for_group`'s
    arrays for those."""

    def for_group(self, policy: CompiledPolicy, layers: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(key positions in `policy`'s arrays for every key of the calls, the group's call indices)."""
        cached = self.by_group.get(tuple(layers))
        group_keys = (
            cached[0] if cached else [self.universe[i] for i in np.flatnonzero(np.isin(self.universe_layer, layers))]
        )
        positions = policy.bind(group_keys)
        # Policies that number the group's keys alike (a fresh policy of a kind numbers them 0, 1, ...;
        # flashmoe binds its model's keys in order) share the arrays of an earlier replay.
        if cached is not None and np.array_equal(positions, cached[1]):
            return cached[2], cached[3]
        lut = np.full(len(self.universe), -1, dtype=np.int64)
        lut[np.isin(self.universe_layer, layers)] = positions
        layer_ids = np.flatnonzero(np.isin(np.array(self.layer_list), layers))
        keys, mine = lut[self.key_code], np.flatnonzero(np.isin(self.call_layer, layer_ids)).astype(np.int64)
        self.by_group[tuple(layers)] = (group_keys, positions, keys, mine)
        return keys, mine


_PREPARED: OrderedDict[int, PreparedCalls] = OrderedDict()
_PREPARED_KEPT = 4
"""Call lists whose arrays are kept (by identity; a list must not change between replays): the simulator
replays a few lists many times."""


def prepared_calls(calls: Sequence[tuple[int, tuple[ExpertKey, ...], int, Phase]]) -> PreparedCalls:
    entry = _PREPARED.get(id(calls))
    if entry is not None and entry.calls is calls and len(entry.bounds) == len(calls) + 1:
        _PREPARED.move_to_end(id(calls))
        return entry
    layer_list = sorted({layer for layer, _, _, _ in calls})
    layer_at = {layer: i for i, layer in enumerate(layer_list)}
    phase_at = {phase: i for i, phase in enumerate(PHASES)}
    flat = [key for _, keys, _, _ in calls for key in keys]
    universe = sorted(set(flat))
    code = {key: i for i, key in enumerate(universe)}
    entry = PreparedCalls(
        calls=calls,
        layer_list=layer_list,
        call_layer=np.array([layer_at[layer] for layer, _, _, _ in calls], dtype=np.int64),
        phase=np.array([phase_at[phase] for _, _, _, phase in calls], dtype=np.int64),
        now=np.array([now for _, _, now, _ in calls], dtype=np.int64),
        bounds=np.concatenate([[0], np.cumsum([len(keys) for _, keys, _, _ in calls])]).astype(np.int64),
        key_code=np.array([code[key] for key in flat], dtype=np.int64),
        universe=universe,
        universe_layer=np.array([layer for layer, _ in universe], dtype=np.int64),
    )
    _PREPARED[id(calls)] = entry
    while len(_PREPARED) > _PREPARED_KEPT:
        _PREPARED.popitem(last=False)
    return entry
