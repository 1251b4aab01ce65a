"""Routers (gates): score every token against every expert and pick its top-k experts.

Shape legend: T = routed tokens (padding already removed), D = model dim, R = routing dim,
E = number of experts, K = experts per token (top-k).

Every router returns a `Routing`: the chosen experts, their gate values, the fp32 router
logits (for the z-loss) and the probabilities the balance loss averages (P_i of Eq. 8).
Routers run in fp32 whatever dtype the rest of the model is in: their math (whatever autocast
says, and with the inputs cast up) and their parameters. Tiny score differences decide the
assignment, and bf16 has only 8 bits of mantissa. Casting a model to half precision
(`model.half()`, `.to(torch.bfloat16)`, as fairseq's --fp16 / --bf16 trainers do) leaves the
router's parameters in fp32 (Router._apply); weights that arrive in half precision anyway (a
router built under a half default dtype) are cast up inside forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

GATES = ("xmoe", "xmoe_torchscale", "switch", "switch_sigmoid", "gshard")
GATE_FNS = ("softmax", "sigmoid")
SECOND_EXPERT_POLICIES = ("all", "sampling", "random")

# The paper's fixed balance-loss temperatures tau0 for X-MoE ("0.3 and 0.07 for the softmax gate
# and sigmoid gate"); the learnable gate temperature starts at 0.07 and is clamped at 1e-4.
DEFAULT_BALANCE_TEMPERATURE = {"softmax": 0.3, "sigmoid": 0.07}
TAU_INIT = 0.07
TAU_MIN = 1e-4
EXPERT_EMBEDDING_GAIN = 0.32


@dataclass
class Routing:
    experts_TK: torch.Tensor  # long: chosen experts, best first
    gates_TK: torch.Tensor  # fp32: weight of each chosen expert's output
    logits_TE: torch.Tensor  # fp32: pre-activation scores (s / tau for X-MoE), for the z-loss
    balance_probs_TE: torch.Tensor  # fp32: the distribution P_i of the balance loss averages
    gate_probs_TE: torch.Tensor  # fp32: the router's distribution over experts, for the entropy
    tau: torch.Tensor | float  # the (clamped) gate temperature in use; nan for gates without one


def make_finite(scores: torch.Tensor) -> torch.Tensor:
    """Replace NaN/inf scores by the smallest finite score (0 if none), so top-k stays defined."""
    if scores.numel() == 0:
        return scores
    # Pure tensor ops: no host sync on GPU.
    finite = torch.isfinite(scores)
    floor = torch.where(finite, scores, torch.inf).amin().detach()
    floor = torch.where(torch.isfinite(floor), floor, torch.zeros_like(floor))
    return torch.where(finite, scores, floor)


def project(x_TD: torch.Tensor, projection: nn.Module) -> torch.Tensor:
    """x_TD (fp32) through a bias-free nn.Linear (or nn.Identity) with its weight in fp32."""
    if isinstance(projection, nn.Identity):
        return x_TD
    return F.linear(x_TD, projection.weight.float())


def _top_k(scores_TE: torch.Tensor, k: int) -> torch.Tensor:
    # NOTE: torch.topk breaks ties towards the lower index on CPU and CUDA, which keeps the
    # assignment deterministic and equal to an argmax-based reference.
    return torch.topk(scores_TE, k, dim=-1).indices


class Router(nn.Module):
    """Base class; subclasses implement `scores` and the gate activation."""

    def __init__(self, num_experts: int, top_k: int):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.num_experts = num_experts
        self.top_k = top_k

    def forward(self, x_TD: torch.Tensor) -> Routing:
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return self.route(x_TD.float())

    def _apply(self, fn, recurse: bool = True):
        # NOTE: keeps fp32 parameters in fp32 when the model is cast to fp16/bf16 (device moves
        # still apply). Stored in bf16, a router weight of ~0.1 can only move in steps of ~5e-4,
        # a whole Adam update at lr 5e-4, so most updates of W, the expert embeddings and tau
        # would round away. fairseq's optimizers (Adam under the memory-efficient fp16/bf16
        # wrappers, the fp32 copies of plain --fp16) and checkpoints handle mixed dtypes.
        def keep_fp32(tensor: torch.Tensor) -> torch.Tensor:
            converted = fn(tensor)
            if tensor.dtype == torch.float32 and converted.dtype in (torch.float16, torch.bfloat16):
                return tensor.to(converted.device)
            return converted

        return super()._apply(keep_fp32, recurse)

    def route(self, x_TD: torch.Tensor) -> Routing:  # pragma: no cover - abstract
        raise NotImplementedError


class XMoERouter(Router):
    """X-MoE: cosine between the projected token and expert embeddings on a hypersphere.

    s_k = cos(W h, e_k); gate = softmax(s / tau) or sigmoid(s / tau), tau learnable.
    routing_dim=None skips the projection (the paper's "no dimension reduction" ablation,
    expert embeddings then live in R^D); normalize=False drops the L2 normalization
    (the "no L2 norm" ablation: s_k = (W h) . e_k).
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 1,
        routing_dim: int | None = 16,
        gate_fn: str = "softmax",
        normalize: bool = True,
        balance_temperature: float | None = None,
    ):
        super().__init__(num_experts, top_k)
        if gate_fn not in GATE_FNS:
            raise ValueError(f"gate_fn must be one of {GATE_FNS}, got {gate_fn!r}")
        if gate_fn == "sigmoid" and top_k != 1:
            raise ValueError("the sigmoid gate is defined for top_k=1 only")
        self.gate_fn = gate_fn
        self.normalize = normalize
        self.balance_temperature = (
            DEFAULT_BALANCE_TEMPERATURE[gate_fn] if balance_temperature is None else balance_temperature
        )
        if self.balance_temperature <= 0:
            raise ValueError(f"balance_temperature must be > 0, got {self.balance_temperature}")
        embed_dim = d_model if not routing_dim else routing_dim
        self.projection = nn.Linear(d_model, embed_dim, bias=False) if routing_dim else nn.Identity()
        self.expert_embeddings = nn.Parameter(torch.empty(num_experts, embed_dim))  # (E, R)
        nn.init.orthogonal_(self.expert_embeddings, gain=EXPERT_EMBEDDING_GAIN)
        self.tau = nn.Parameter(torch.tensor(TAU_INIT))

    def scores(self, x_TD: torch.Tensor) -> torch.Tensor:
        token_TR = project(x_TD, self.projection)
        expert_ER = self.expert_embeddings.float()
        if self.normalize:
            token_TR = F.normalize(token_TR, dim=-1)
            expert_ER = F.normalize(expert_ER, dim=-1)
        return make_finite(token_TR @ expert_ER.t())  # (T, E), a cosine when normalized

    def route(self, x_TD: torch.Tensor) -> Routing:
        tau = self.tau.float().clamp(min=TAU_MIN)
        scores_TE = self.scores(x_TD)
        logits_TE = scores_TE / tau
        experts_TK = _top_k(logits_TE, self.top_k)
        gate_probs_TE = logits_TE.softmax(dim=-1)
        if self.gate_fn == "softmax":
            gates_TK = gate_probs_TE.gather(-1, experts_TK)
        else:
            gates_TK = logits_TE.gather(-1, experts_TK).sigmoid()
        # P_i uses a FIXED temperature tau0 (Eq. 8), so the balance loss cannot be lowered by
        # moving the learnable tau.
        balance_probs_TE = (scores_TE / self.balance_temperature).softmax(dim=-1)
        return Routing(experts_TK, gates_TK, logits_TE, balance_probs_TE, gate_probs_TE, tau.detach())


class TorchscaleXMoERouter(Router):
    """The routing of the authors' public code (torchscale xmoe), kept for side-by-side studies.

    Differs from the paper: the projected token is NOT normalized, only the expert embeddings
    are; no temperature; softmax only. The balance loss uses the same softmax as the gate.
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int = 1, routing_dim: int = 16):
        super().__init__(num_experts, top_k)
        self.projection = nn.Linear(d_model, routing_dim, bias=False)
        self.expert_embeddings = nn.Parameter(torch.empty(num_experts, routing_dim))
        nn.init.orthogonal_(self.expert_embeddings, gain=EXPERT_EMBEDDING_GAIN)

    def route(self, x_TD: torch.Tensor) -> Routing:
        expert_ER = F.normalize(self.expert_embeddings.float(), dim=-1)
        logits_TE = make_finite(project(x_TD, self.projection) @ expert_ER.t())
        probs_TE = logits_TE.softmax(dim=-1)
        experts_TK = _top_k(logits_TE, self.top_k)
        return Routing(experts_TK, probs_TE.gather(-1, experts_TK), logits_TE, probs_TE, probs_TE, math.nan)


class LinearRouter(Router):
    """Switch / GShard baselines: logits = Linear(D -> E) in the full hidden space.

    gate_fn="softmax": gate = softmax(logits) of the chosen experts (top-2 renormalized);
    gate_fn="sigmoid": gate = sigmoid(logit) of the chosen expert (top-1 only).
    The balance loss uses softmax(logits / balance_temperature), temperature 1 by default.
    For top-2, the second expert follows `second_expert_policy`: "all" always keeps it,
    "sampling" picks it from softmax with Gumbel noise, "random" keeps it with probability
    2 * its gate value (as in GShard).
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int = 1,
        gate_fn: str = "softmax",
        balance_temperature: float | None = None,
        second_expert_policy: str = "all",
    ):
        super().__init__(num_experts, top_k)
        if gate_fn not in GATE_FNS:
            raise ValueError(f"gate_fn must be one of {GATE_FNS}, got {gate_fn!r}")
        if gate_fn == "sigmoid" and top_k != 1:
            raise ValueError("the sigmoid gate is defined for top_k=1 only")
        if second_expert_policy not in SECOND_EXPERT_POLICIES:
            raise ValueError(
                f"second_expert_policy must be one of {SECOND_EXPERT_POLICIES}, got {second_expert_policy!r}"
            )
        self.gate_fn = gate_fn
        self.balance_temperature = 1.0 if balance_temperature is None else balance_temperature
        self.second_expert_policy = second_expert_policy
        self.proj = nn.Linear(d_model, num_experts, bias=False)

    def route(self, x_TD: torch.Tensor) -> Routing:
        logits_TE = make_finite(project(x_TD, self.proj))  # (T, E)
        probs_TE = logits_TE.softmax(dim=-1)
        balance_probs_TE = (logits_TE / self.balance_temperature).softmax(dim=-1)
        if self.gate_fn == "sigmoid":
            experts_TK = _top_k(logits_TE, 1)
            gates_TK = logits_TE.gather(-1, experts_TK).sigmoid()
        elif self.top_k == 1:
            experts_TK = _top_k(logits_TE, 1)
            gates_TK = probs_TE.gather(-1, experts_TK)
        else:
            experts_TK, gates_TK = self._top_k_softmax(logits_TE, probs_TE)
        return Routing(experts_TK, gates_TK, logits_TE, balance_probs_TE, probs_TE, math.nan)

    def _top_k_softmax(self, logits_TE: torch.Tensor, probs_TE: torch.Tensor):
        first_T1 = _top_k(logits_TE, 1)
        rest_experts, rest_gates = [first_T1], [probs_TE.gather(-1, first_T1)]
        taken_TE = torch.zeros_like(logits_TE, dtype=torch.bool).scatter(-1, first_T1, True)
        for _ in range(1, self.top_k):
            candidates_TE = logits_TE.detach()
            if self.training and self.second_expert_policy == "sampling":
                gumbel = -torch.empty_like(candidates_TE).exponential_().log()
                candidates_TE = candidates_TE + gumbel
            candidates_TE = candidates_TE.masked_fill(taken_TE, float("-inf"))
            next_T1 = _top_k(candidates_TE, 1)
            taken_TE = taken_TE.scatter(-1, next_T1, True)
            rest_experts.append(next_T1)
            rest_gates.append(probs_TE.gather(-1, next_T1))
        experts_TK = torch.cat(rest_experts, dim=-1)
        gates_TK = torch.cat(rest_gates, dim=-1)
        gates_TK = gates_TK / gates_TK.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(gates_TK.dtype).eps)
        if self.training and self.second_expert_policy == "random":
            # Keep the lower-ranked experts with probability 2 * their (renormalized) gate value.
            keep_TK = torch.ones_like(gates_TK, dtype=torch.bool)
            keep_TK[:, 1:] = 2 * gates_TK[:, 1:].detach() > torch.rand_like(gates_TK[:, 1:])
            gates_TK = gates_TK * keep_TK
            experts_TK = experts_TK.masked_fill(~keep_TK, -1)  # -1 = not routed
        return experts_TK, gates_TK


def make_router(
    gate: str,
    d_model: int,
    num_experts: int,
    top_k: int = 1,
    routing_dim: int | None = 16,
    gate_fn: str = "softmax",
    normalize: bool = True,
    balance_temperature: float | None = None,
    second_expert_policy: str = "all",
) -> Router:
    """Build a router by name; `gate` is one of GATES."""
    if gate == "xmoe":
        return XMoERouter(d_model, num_experts, top_k, routing_dim, gate_fn, normalize, balance_temperature)
    if gate == "xmoe_torchscale":
        return TorchscaleXMoERouter(d_model, num_experts, top_k, routing_dim or 16)
    if gate == "switch":
        return LinearRouter(d_model, num_experts, top_k, gate_fn, balance_temperature)
    if gate == "switch_sigmoid":
        return LinearRouter(d_model, num_experts, top_k, "sigmoid", balance_temperature)
    if gate == "gshard":
        if top_k < 2:
            raise ValueError("gate 'gshard' is top-2 routing: set top_k=2 (or use gate 'switch' for top-1)")
        return LinearRouter(d_model, num_experts, top_k, gate_fn, balance_temperature, second_expert_policy)
    raise ValueError(f"unknown gate {gate!r}; choose one of {GATES}")
