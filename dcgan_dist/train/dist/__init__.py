"""The one place that knows about Accelerate: ranks, devices, precision, process groups, shutdown.

Everything else gets an `Accelerator` from `build_accelerator` and asks it for rank/device; models and
losses never see it. Split by job: setup.py builds the Accelerator, collectives.py talks across ranks,
lifecycle.py handles signals, lost peers and shutdown. Callers use `dist.X` for all of them.
"""
from dcgan_dist.train.dist.collectives import (STARTUP_TIMEOUT_S, all_min, barrier, broadcast_from_main,
                                                check_replicas, gather_all, gather_batches, on_main,
                                                parameter_digests, startup_group)
from dcgan_dist.train.dist.lifecycle import StopRequest, peer_lost, shutdown
from dcgan_dist.train.dist.setup import (DDP_OPTIONS, autocast, bare, build_accelerator, build_eval_accelerator,
                                          cpu_threads, describe, fast_precision, graph_stream, loader_workers,
                                          prepare, process_group_backend, ranks_on_node, ranks_share_gpus,
                                          resolve_mixed_precision, use_cuda_graph)

__all__ = ["STARTUP_TIMEOUT_S", "all_min", "barrier", "broadcast_from_main", "check_replicas", "gather_all",
           "gather_batches", "on_main", "parameter_digests", "startup_group", "StopRequest", "peer_lost", "shutdown",
           "DDP_OPTIONS", "autocast", "bare", "build_accelerator", "build_eval_accelerator", "cpu_threads", "describe",
           "fast_precision", "graph_stream", "loader_workers", "prepare", "process_group_backend", "ranks_on_node",
           "ranks_share_gpus", "resolve_mixed_precision", "use_cuda_graph"]
