"""Imports done once in the rank launcher's forkserver, so forked ranks start without paying for them.

Nothing here initialises state: no process group, no CUDA, no platform patches (each rank applies those itself).
"""

from topd_megatron.logs import quiet_third_party

quiet_third_party()

import torch  # noqa: E402, F401
import torch.distributed  # noqa: E402, F401
import transformers  # noqa: E402, F401
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel  # noqa: E402, F401
from megatron.core.models.gpt import GPTModel  # noqa: E402, F401
from megatron.core.optimizer import get_megatron_optimizer  # noqa: E402, F401
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402, F401

from topd_megatron.models.bridge_import import import_bridge  # noqa: E402

import_bridge()
