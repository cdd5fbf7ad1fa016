"""Lightning-free data plumbing: read a dataset once into tensors (:mod:`.materialize`), split it over the devices
(:mod:`.partition`) and draw one mini-batch per device per step (:mod:`.sampler`)."""

from .materialize import materialize_dataset
from .partition import IID, Dirichlet, EmptyPartitionError, Partitioner, Shards, make_partitioner
from .sampler import DeviceSampler

__all__ = ["materialize_dataset", "IID", "Dirichlet", "Shards", "Partitioner", "EmptyPartitionError",
           "make_partitioner", "DeviceSampler"]
