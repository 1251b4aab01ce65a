"""fairseq tasks of xmoe (registered on import)."""

from xmoe.tasks import mlm_tlm  # noqa: F401
