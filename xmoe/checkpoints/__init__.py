"""Checkpoint conversion: start an X-MoE run from a dense encoder ("sparse upcycling").

- `xmoe.checkpoints.roberta`: a fairseq RoBERTa / XLM-R checkpoint as a dense xmoe_encoder.
- `xmoe.checkpoints.upcycle`: the `xmoe-upcycle` command: every expert of an MoE layer starts
  as a copy of the dense FFN of its layer, routers start as in a fresh model, the rest is copied.

Reading checkpoint files safely (weights_only + allow-list) stays in `xmoe.checkpoint`.
"""
