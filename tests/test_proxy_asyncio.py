"""The request path on the stock asyncio loop too (``test_proxy.py`` runs on uvloop, as
``balancer run`` does): transports differ in details such as when a failed write is noticed
and how ``writelines`` batches, and the proxy must be right on both."""

from __future__ import annotations

from tests.test_proxy import (  # noqa: F401 - collected here again, on the default loop
    special,
    test_answer_cut_short_aborts_the_client_connection,
    test_bodies_stream_both_ways_intact,
    test_chunked_response_streams_first_chunk_before_backend_finishes,
    test_drain_closes_idle_connections_now_and_busy_ones_after_their_answer,
    test_expect_100_continue_is_relayed,
    test_failure_after_send_retries_get_but_never_post,
    test_forwarded_headers_and_hop_by_hop_removed,
    test_head_204_304_have_no_body_and_keep_the_connection,
    test_no_answer_within_read_timeout_is_504,
    test_pipelined_requests_are_answered_in_order,
    test_refused_backend_costs_clients_nothing_for_get_and_post,
    test_stale_pooled_connection_is_retried_on_a_fresh_one,
    test_websocket_echo,
)
