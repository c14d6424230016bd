"""A pytest fixture for testing actor code on a real multi-node mesh (loaded through the ``pytest11`` entry point).

::

    @pytest.mark.zmesh_cluster(nodes=3, num_cpus=2)
    def test_my_actor(zmesh_cluster):
        zmesh_cluster.connect()
        ...
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from zmesh.testing import LocalCluster


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "zmesh_cluster(**kwargs): options for the zmesh_cluster fixture (LocalCluster's arguments)")


@pytest.fixture
def zmesh_cluster(request: pytest.FixtureRequest) -> Iterator[LocalCluster]:
    """A running ``LocalCluster`` (3 nodes unless ``@pytest.mark.zmesh_cluster(...)`` says otherwise), stopped afterwards."""
    marker = request.node.get_closest_marker("zmesh_cluster")
    options = dict(marker.kwargs) if marker is not None else {}
    with LocalCluster(**options) as cluster:
        yield cluster
