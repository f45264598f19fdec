import pytest

from cfnode.launcher import group_alive
from tests.integration.harness import Swarm, wait_until


@pytest.fixture
def swarm(tmp_path):
    harness = Swarm(tmp_path)
    yield harness
    harness.close()
    # Each child ran in its own process group with its DHT process and p2p daemon: all of them must be gone.
    groups = [child.process.pid for child in harness.children]
    wait_until(lambda: not any(group_alive(g) for g in groups), 15, "every process of the test to exit")
