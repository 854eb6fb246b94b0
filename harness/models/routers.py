"""A MoE layer's router, found in the model's own MoE block and callable on any hidden state.

Strategies that predict experts (next-layer gate, look-ahead before attention, DAOP's pre-calculation)
apply a layer's router to a hidden state the layer has not seen. The prediction must be the selection
the block itself would make, so the router is the block's own module, called as the block calls it:
- the router is the block's child holding a [num_experts, hidden] weight (named `gate` in most
  architectures, `router` in gpt-oss, Phi-3.5-MoE, Granite, Jamba; nested in AFMoE's and Hunyuan's);
- the block's own tensors it passes beside the hidden states (LFM2's and AFMoE's `expert_bias`,
  MiniMax-M2's and Hunyuan-V3's `e_score_correction_bias`) are taken from the block by the router's
  parameter names, at call time;
- a router that returns logits only (DBRX) is completed by the block's `route_tokens_to_experts`;
- a router that routes by token id (DeepSeek-V4's hash layers: a frozen `tid2eid[input_ids]` table picks the
  experts, the gate only weights them) gets the ids of the model's current forward pass (`StepTokens`), so its
  prediction is exact from the first layer on.
Everything else (biases, sigmoid or softmax scores, group-limited routing, routed scaling, top-k before
or after the softmax) is the router's own code, so it is exact by construction. Anything else is refused
with one line naming what is missing.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from harness.errors import HarnessError

_PREFERRED = ("gate", "router")
"""Attribute names of the router, when more than one child could be one."""
_PROBE_TOKENS = 2


TOKEN_IDS = "input_ids"
"""The argument of a router that routes by token id."""


class StepTokens:
    """The token ids of the model's current forward pass, recorded by a forward pre-hook on the model before any
    layer runs, for routers that route by token id."""

    def __init__(self, model: nn.Module) -> None:
        self.ids: torch.Tensor | None = None
        self.handle = model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, _: nn.Module, args: tuple, kwargs: dict) -> None:
        self.ids = kwargs.get(TOKEN_IDS, args[0] if args else None)

    def of(self, tokens: int) -> torch.Tensor:
        """The current pass's ids, flat; they must be the `tokens` tokens whose hidden states are being routed."""
        if self.ids is None or self.ids.numel() != tokens:
            shape = None if self.ids is None else tuple(self.ids.shape)
            raise HarnessError(f"a token-id router was applied to {tokens} token(s) in a forward pass of ids {shape}")
        return self.ids.reshape(-1)


class Router:
    """One MoE layer's router: `router(hidden[T, H]) -> (logits [T, E], top-k weights [T, k], top-k ids [T, k])`,
    as the layer's MoE block computes them for the same hidden states (and, for a token-id router, the ids of the
    model's current forward pass, from `tokens`)."""

    def __init__(
        self, block: nn.Module, module: nn.Module, hidden: int, num_experts: int, tokens: StepTokens | None = None
    ) -> None:
        self.block, self.module, self.hidden, self.num_experts = block, module, hidden, num_experts
        self.tokens = tokens
        self.extras = self._extras()
        self.by_token_id = tokens is not None and any(name == TOKEN_IDS for name, _ in self.extras)
        """Whether the router routes by token id (the ids of the model's current forward pass, from `tokens`)."""
        self.batched = False
        """The router reads [batch, tokens, hidden] (AFMoE) rather than [tokens, hidden]."""
        self.batched = self._probe()

    def _extras(self) -> list[tuple[str, object]]:
        """(name, default) of each argument after the hidden states: taken from the block by name."""
        params = list(inspect.signature(type(self.module).forward).parameters.values())[2:]
        extras = []
        for p in params:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            if p.name == TOKEN_IDS and self.tokens is not None:
                extras.append((p.name, p.default))
                continue
            if not hasattr(self.block, p.name) and p.default is p.empty:
                raise HarnessError(
                    f"{type(self.module).__name__}.forward needs {p.name!r}, which its MoE block "
                    f"{type(self.block).__name__} does not hold: its router cannot be applied to a hidden state"
                )
            extras.append((p.name, p.default))
        return extras

    def _call(
        self, x: torch.Tensor, batched: bool, token_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`token_ids` [T]: the ids of the tokens whose hidden states `x` [T, H] are, for a token-id router."""
        args = [
            token_ids if name == TOKEN_IDS and self.by_token_id else getattr(self.block, name, default)
            for name, default in self.extras
        ]
        out = self.module(x[None] if batched else x, *args)
        if isinstance(out, torch.Tensor):
            # Logits only: the block turns them into its top-k (DBRX's route_tokens_to_experts).
            routed = self.block.route_tokens_to_experts(out)  # type: ignore[operator]
            weights, indices = routed if routed[0].dtype.is_floating_point else routed[::-1]
            out = (out, weights, indices)
        logits, weights, indices = out[:3]
        tokens = x.shape[0]
        return logits.reshape(tokens, -1), weights.reshape(tokens, -1), indices.reshape(tokens, -1)

    def _probe(self) -> bool:
        """Whether the router takes [1, T, H] rather than [T, H] (tried once, on zeros)."""
        weight = next(self.module.parameters())
        x = torch.zeros(_PROBE_TOKENS, self.hidden, dtype=weight.dtype, device=weight.device)
        ids = torch.zeros(_PROBE_TOKENS, dtype=torch.long, device=weight.device)
        errors = []
        for batched in (False, True):
            try:
                with torch.no_grad():
                    logits, _, indices = self._call(x, batched, ids)
            except (ValueError, RuntimeError, TypeError, AttributeError) as exc:
                errors.append(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                continue
            if logits.shape == (_PROBE_TOKENS, self.num_experts) and not indices.dtype.is_floating_point:
                return batched
            errors.append(f"it returned logits of shape {tuple(logits.shape)}")
        raise HarnessError(
            f"the router {type(self.module).__name__} of {type(self.block).__name__} cannot be applied to a hidden "
            f"state ({errors[-1]})"
        )

    def __call__(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = hidden_states.reshape(-1, self.hidden)
        ids = self.tokens.of(x.shape[0]) if self.by_token_id and self.tokens is not None else None
        return self._call(x, self.batched, ids)


def router_of(block: nn.Module, experts: nn.Module, num_experts: int, tokens: StepTokens | None = None) -> Router:
    """The router of the MoE block `block` whose routed experts module is `experts` (E = `num_experts`); `tokens`
    gives a token-id router the ids it routes by (without it, such a router is refused)."""
    candidates: dict[str, tuple[nn.Module, int]] = {}
    for name, child in block.named_children():
        if child is experts or name.startswith("shared"):
            continue
        for param in child.parameters():
            if param.dim() == 2 and param.shape[0] == num_experts:
                candidates[name] = (child, int(param.shape[1]))
                break
    if len(candidates) > 1:
        candidates = {n: c for n, c in candidates.items() if n in _PREFERRED}
    if len(candidates) != 1:
        raise HarnessError(
            f"{type(block).__name__} holds {'no' if not candidates else 'more than one'} router "
            f"(a child with a [{num_experts}, hidden] weight): no gate prediction for this architecture"
        )
    module, hidden = next(iter(candidates.values()))
    return Router(block, module, hidden, num_experts, tokens)


def layer_routers(model: nn.Module, experts: dict[int, nn.Module], num_experts: int) -> dict[int, Router]:
    """Layer -> the router of the MoE block holding `experts[layer]` (the model's routed experts modules)."""
    layer_of = {id(module): layer for layer, module in experts.items()}
    tokens = StepTokens(model)
    routers = {}
    try:
        for block in model.modules():
            child = getattr(block, "experts", None)
            if isinstance(child, nn.Module) and id(child) in layer_of:
                routers[layer_of[id(child)]] = router_of(block, child, num_experts, tokens)
    except HarnessError:
        tokens.handle.remove()
        raise
    if not any(router.by_token_id for router in routers.values()):
        tokens.handle.remove()  # no router routes by token id: nothing to record
    return routers
