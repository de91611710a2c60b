"""Same-host transport for bnpass's collectives: an all_reduce through shared memory.

``native`` builds and loads the C half (``shm.c``: the protocol), ``channel`` sets up one
shared segment per process group, ``op`` holds ``torch.ops.bnpass.shm_issue`` / ``shm_wait`` (and
both in one, ``shm_all_reduce``), and ``rewrite`` (``apply_transport``) puts the pair into the
compiled graphs in place of the process group's all_reduce and its wait.
"""

from .op import SHM_ALL_REDUCE, SHM_ISSUE, SHM_WAIT, shm_all_reduce
from .rewrite import PROCESS_GROUP, SHM, apply_transport, mark_transports, takes_shm

__all__ = ["apply_transport", "mark_transports", "takes_shm", "shm_all_reduce", "SHM_ALL_REDUCE", "SHM_ISSUE", "SHM_WAIT", "SHM", "PROCESS_GROUP"]
