"""fairseq criterions of xmoe. Importing this package registers them."""

from xmoe.criterions.xmoe_masked_lm import XMoEMaskedLmConfig, XMoEMaskedLmLoss

__all__ = ["XMoEMaskedLmConfig", "XMoEMaskedLmLoss"]
