"""Who gets the lease when the group forms again: the assignor of EV_Central/ha.py."""

from __future__ import annotations

import json

from aiokafka.coordinator.protocol import ConsumerProtocolMemberMetadata

from EV_Central.ha import Lease, LeaseAssignor, claimed_term
from shared.bus import Topics


def member(term: int | None) -> ConsumerProtocolMemberMetadata:
    data = b"" if term is None else json.dumps({"term": term}).encode()
    return ConsumerProtocolMemberMetadata(0, [Topics.CENTRAL_LEASE], data)


def holder(members: dict[str, ConsumerProtocolMemberMetadata]) -> list[str]:
    assignor = LeaseAssignor(Lease("127.0.0.1:9", "test", 3.0))
    answer = assignor.assign(None, members)  # type: ignore[arg-type]
    assert set(answer) == set(members)  # every member gets an answer
    return [m for m, a in answer.items() if a.assignment == [(Topics.CENTRAL_LEASE, [0])]]


def test_the_newest_term_keeps_the_lease_against_a_central_that_comes_back() -> None:
    # "a" was active in term 4 and was cut off; "b" took over in term 5. "a" comes back still
    # claiming 4: the lease stays with "b" whatever the member ids' order.
    assert holder({"a-1": member(4), "b-2": member(5)}) == ["b-2"]
    assert holder({"z-1": member(4), "b-2": member(5), "c-3": member(0)}) == ["b-2"]


def test_without_claims_exactly_one_member_gets_the_lease() -> None:
    assert holder({"m-2": member(0), "m-1": member(0)}) == ["m-1"]
    assert holder({"only": member(None)}) == ["only"]


def test_a_claim_that_cannot_be_read_counts_as_none() -> None:
    assert claimed_term(b"not json") == 0
    assert claimed_term(b'{"term": -3}') == 0
    assert claimed_term(b'{"term": "7"}') == 0
    assert claimed_term(b"[1]") == 0
    assert claimed_term(None) == 0
    assert claimed_term(b'{"term": 7}') == 7


def test_the_claim_sent_when_joining_is_the_leases_term() -> None:
    lease = Lease("127.0.0.1:9", "test", 3.0)
    assignor = LeaseAssignor(lease)
    assert claimed_term(assignor.metadata([Topics.CENTRAL_LEASE]).user_data) == 0
    lease.term = 12
    sent = assignor.metadata([Topics.CENTRAL_LEASE])
    assert claimed_term(sent.user_data) == 12 and sent.subscription == [Topics.CENTRAL_LEASE]
