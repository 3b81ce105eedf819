"""Ray's fake_multinode node provider, with two changes that make its fake nodes behave like cloud
instances for the rehearsal (measured with Ray 2.58 on this machine):

- Each fake node keeps its runtime environments (the job's --working-dir among them) in a folder of
  its own. Fake nodes share the head's session folder, and a node that joins unpacks the job's
  working dir again with overwrite (ray/_private/runtime_env/working_dir.py): it deleted the folder
  that the driver and every running trial had as their current directory, and the driver failed with
  FileNotFoundError from os.getcwd() the moment the first spot node joined.
- A node whose raylet died (a spot reclaim: the rehearsal kills every process of it) is reported as
  terminated, as a cloud API reports a reclaimed instance. Ray's own provider keeps it forever: with
  node ids as ips the autoscaler fakes a heartbeat for a node it has no load metrics for, so the dead
  node was never replaced and held its type's max_workers slot.

Named by cluster configs as
    provider: {type: external, module: mmlg_ray.distributed.fake_provider.PerNodeRuntimeEnvFakeProvider, ...}
"""

from __future__ import annotations

import logging

import ray._private.ray_constants as ray_constants
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider

logger = logging.getLogger(__name__)


def _raylet_dead(entry: dict) -> bool:
    node = entry.get("node")
    if node is None:  # the head
        return False
    procs = node.all_processes.get(ray_constants.PROCESS_TYPE_RAYLET, [])
    return bool(procs) and all(p.process.poll() is not None for p in procs)


class PerNodeRuntimeEnvFakeProvider(FakeMultiNodeProvider):
    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        # the parent builds the node's RayParams, whose runtime_env_dir_name defaults to this constant
        with self.lock:
            default = ray_constants.DEFAULT_RUNTIME_ENV_DIR_NAME
            ray_constants.DEFAULT_RUNTIME_ENV_DIR_NAME = f"{default}_node{self._next_node_id + 1:05d}"
            try:
                super()._create_node_with_resources_and_labels(node_config, tags, count, resources, labels)
            finally:
                ray_constants.DEFAULT_RUNTIME_ENV_DIR_NAME = default

    def non_terminated_nodes(self, tag_filters):
        with self.lock:
            for node_id in [n for n, e in self._nodes.items() if _raylet_dead(e)]:
                logger.info("fake node %s: its raylet is gone (reclaimed); reported terminated", node_id)
                self._terminate_node(self._nodes.pop(node_id))  # reaps whatever of it is left
        return super().non_terminated_nodes(tag_filters)
