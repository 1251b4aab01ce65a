"""fairseq models of xmoe. Importing this package registers them and prepares checkpointing."""

from xmoe import expert_checkpoint
from xmoe.checkpoint import allow_fairseq_checkpoint_globals
from xmoe.models.xmoe_encoder import ARCHITECTURES, XMoEEncoderConfig, XMoEEncoderModel

# fairseq loads checkpoints with torch.load's weights_only default (True since torch 2.6); resuming
# needs the few non-tensor types a fairseq checkpoint holds on the allow-list.
allow_fairseq_checkpoint_globals()
# Under expert parallelism, checkpoints gather every rank's experts (and their optimizer state).
expert_checkpoint.install()

__all__ = ["ARCHITECTURES", "XMoEEncoderConfig", "XMoEEncoderModel"]
