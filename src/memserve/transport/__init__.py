"""Data and control plane between instances: pairwise torch.distributed channels created on
demand through a rendezvous store (``channels``), the instance registry with heartbeats
(``registry``), and the JSON control client (``control``)."""

from memserve.transport.channels import Channels, Endpoint, TransferError

__all__ = ["Channels", "Endpoint", "TransferError"]
