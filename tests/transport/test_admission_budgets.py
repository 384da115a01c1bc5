"""The admission budgets themselves, without a server: the server-wide caps hold above
every token's share, and a token alone may use more than its share (the attacks on
them, through a real server, are in test_attack_admission.py)."""

from __future__ import annotations

from tensorwire_server.transport.admission import Admission, Quotas


def test_server_wide_caps_hold_above_every_tokens_share() -> None:
    """Two tokens within their shares still meet the server's stream cap, and a public
    call never takes an authenticated place."""
    admission = Admission(Quotas(4, 3, 3, 2, 1, 1))
    a = [admission.enter(admission.places("/m", False, True, "a")) for _ in range(3)]
    assert isinstance(a[2], str) and "token 'a' has 2 streams open" in a[2]
    b = [admission.enter(admission.places("/m", False, True, "b")) for _ in range(2)]
    assert isinstance(b[1], str) and "max_concurrent_streams" in b[1]
    assert not isinstance(admission.enter(admission.places("/u", False, False, "b")), str)
    refused = admission.enter(admission.places("/u", False, False, "b"))
    assert isinstance(refused, str) and "max_concurrent_requests" in refused
    assert not isinstance(admission.enter(admission.places("/h", True, False, None)), str)
    for held in (a[0], a[1], b[0]):
        assert not isinstance(held, str)
        admission.leave(held)
    assert admission.held("streams") == 0 and admission.held("calls") == 1


def test_a_token_alone_may_use_more_than_its_share_but_leaves_one_free() -> None:
    """Shares are work-conserving: on an idle server one token takes the cap less one
    share (not its share alone, which would hold a single-token deployment to a
    fraction of the server); the next token still finds its share free, and past it
    neither gets more."""
    admission = Admission(Quotas(8, 8, 2, 2, 1, 1))
    a = [admission.enter(admission.places("/u", False, False, "a")) for _ in range(7)]
    assert not any(isinstance(held, str) for held in a[:6])
    assert isinstance(a[6], str) and "its share (max_calls_per_token)" in a[6]
    b = [admission.enter(admission.places("/u", False, False, "b")) for _ in range(3)]
    assert not any(isinstance(held, str) for held in b[:2])
    assert isinstance(b[2], str) and "max_concurrent_requests" in b[2]  # all taken
    assert admission.held("calls") == 8
    for held in a[:6] + b[:2]:
        assert not isinstance(held, str)
        admission.leave(held)
    assert admission.held("calls") == 0
