"""A test module on uvloop, as ``balancer run`` serves (``test_proxy_asyncio.py`` covers the
stock loop). Import both names into the module::

    from tests.support.on_uvloop import event_loop_policy, pytestmark  # noqa: F401

pytest then finds the fixture (one loop policy per module) and the mark in the module itself.
"""

from __future__ import annotations

import pytest
import uvloop

#: pytest-asyncio warns that overriding ``event_loop_policy`` is deprecated; it is still how
#: one module picks its loop.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Overriding the \"event_loop_policy\" fixture is deprecated")


@pytest.fixture(scope="module")
def event_loop_policy() -> uvloop.EventLoopPolicy:
    """uvloop for every test of the importing module."""
    return uvloop.EventLoopPolicy()
