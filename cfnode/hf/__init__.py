"""Hugging Face Llama interop: export a run's weights as a transformers checkpoint, start a run from one.

No transformers import here (it is only a test dependency); the files are written and read with safetensors.
"""

from cfnode.hf.checkpoint import (
    dir_digests,
    load_part,
    part_digest,
    part_states,
    read_config,
    read_hf_dir,
    read_part,
    write_hf_dir,
)
from cfnode.hf.convert import from_hf_state, llama_config, spec_fields_from_llama_config, to_hf_state

__all__ = [
    "dir_digests",
    "from_hf_state",
    "llama_config",
    "load_part",
    "part_digest",
    "part_states",
    "read_config",
    "read_hf_dir",
    "read_part",
    "spec_fields_from_llama_config",
    "to_hf_state",
    "write_hf_dir",
]
