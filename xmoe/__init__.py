"""xmoe: cross-lingual sparse mixture-of-experts encoders with X-MoE routing.

The MoE core (`xmoe.moe`) is plain torch. The fairseq components (model, task,
criterion) register themselves only when fairseq is already loaded, which is the
case under `fairseq-train --user-dir xmoe`; importing `xmoe.moe` alone never
pulls fairseq in.
"""

import sys

__version__ = "0.1.0"

if "fairseq" in sys.modules:
    from xmoe import criterions, models, tasks  # noqa: F401  (registers with fairseq)
