"""The sparse MoE layer with X-MoE routing, in plain torch (never imports fairseq).

    from xmoe.moe import MoELayer
    layer = MoELayer(d_model=512, d_ffn=2048, num_experts=32, gate="xmoe")
    y, aux = layer(x, padding_mask=None)
"""

from xmoe.moe.dispatch import DispatchPlan, capacity_for, dropless_capacity, plan_dispatch
from xmoe.moe.experts import ACTIVATIONS, StackedExperts, mark_expert_params
from xmoe.moe.layer import MoEAux, MoELayer, freeze_moe
from xmoe.moe.parallel import expert_parallel_groups
from xmoe.moe.routers import (
    GATE_FNS,
    GATES,
    SECOND_EXPERT_POLICIES,
    LinearRouter,
    Router,
    Routing,
    TorchscaleXMoERouter,
    XMoERouter,
    make_router,
)

__all__ = [
    "ACTIVATIONS",
    "GATES",
    "GATE_FNS",
    "SECOND_EXPERT_POLICIES",
    "DispatchPlan",
    "LinearRouter",
    "MoEAux",
    "MoELayer",
    "Router",
    "Routing",
    "StackedExperts",
    "TorchscaleXMoERouter",
    "XMoERouter",
    "capacity_for",
    "dropless_capacity",
    "expert_parallel_groups",
    "freeze_moe",
    "make_router",
    "mark_expert_params",
    "plan_dispatch",
]
