"""Imports done once in the rank launcher's forkserver, so forked ranks start without paying for them.

Nothing here initialises state: no process group, no CUDA, no platform patches (each rank applies those itself).
"""

import torch  # noqa: F401
import torch.distributed  # noqa: F401
import transformers  # noqa: F401
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel  # noqa: F401
from megatron.core.models.gpt import GPTModel  # noqa: F401
from megatron.core.optimizer import get_megatron_optimizer  # noqa: F401
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: F401

from topd_megatron.models.bridge_import import import_bridge

import_bridge()
