"""Imports done once in the rank launcher's forkserver, so forked ranks start without paying for them.

Nothing here initialises state: no process group, no CUDA, no platform patches (each rank applies those itself).
Only torch is required: where Megatron-Core, Megatron-Bridge or transformers are not installed (a bare GPU image
running the loss benchmark), the ranks simply import less.
"""

from topd_megatron.logs import quiet_third_party

quiet_third_party()

import torch  # noqa: E402, F401
import torch.distributed  # noqa: E402, F401

try:
    import transformers  # noqa: F401
    from megatron.core import dist_checkpointing, parallel_state, tensor_parallel  # noqa: F401
    from megatron.core.models.gpt import GPTModel  # noqa: F401
    from megatron.core.optimizer import get_megatron_optimizer  # noqa: F401
    from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: F401

    from topd_megatron.models.bridge_import import import_bridge

    import_bridge()
except ImportError:
    pass
