"""Hugging Face `transformers` wrappers of XMoEEncoder (remote code of an exported folder).

`xmoe-export` copies these modules, the encoder and the MoE core into the exported folder,
with `xmoe.*` imports rewritten to relative ones, so that
`AutoModel.from_pretrained(folder, trust_remote_code=True)` runs this very code. Importing
them needs transformers; nothing else in xmoe does.
"""
