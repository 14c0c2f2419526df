"""``netns.returning``: the node agent enters one pod's namespace after another and must be back in its own
after each, however the pod's work ended (its CRI and API calls, and the next pod's checks, start from there)."""

from __future__ import annotations

import pytest

from istio_iptables.errors import ApplyError
from istio_iptables.host import netns
from tests.kernel.namespaces import Pod, needs_root

pytestmark = [pytest.mark.kernel, needs_root]


def test_the_block_ends_in_the_namespace_it_started_in() -> None:
    home = netns.identity()
    with Pod.create() as pod:
        with netns.returning():
            netns.enter(pod.name)
            assert netns.identity() != home
        assert netns.identity() == home

        with pytest.raises(ApplyError, match="one pod's failure"), netns.returning():
            netns.enter(pod.name)
            raise ApplyError("one pod's failure")
        assert netns.identity() == home
