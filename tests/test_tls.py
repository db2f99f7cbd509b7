"""TLS between organization servers: verification and session resumption."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from popguard.errors import UserError
from popguard.net import tls

NAME = "127.0.0.1"


def _handshake(
    client: ssl.SSLContext, server: ssl.SSLContext, name: str = NAME
) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """A client and a server SSLObject, handshaken over memory BIOs."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client_side = client.wrap_bio(c_in, c_out, server_hostname=name)
    server_side = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(20):
        for side, obj in (("client", client_side), ("server", server_side)):
            if not done[side]:
                try:
                    obj.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
            s_in.write(c_out.read())
            c_in.write(s_out.read())
        if all(done.values()):
            return client_side, server_side
    raise AssertionError("the handshake did not finish")


@pytest.fixture
def contexts(tmp_path: Path) -> tuple[tls.ResumingClientContext, ssl.SSLContext]:
    pair = tls.TlsMaterial.of(tmp_path).ensure_server_certificate("mbx1", ["mbx1", NAME], [NAME])
    return tls.TlsMaterial.of(tmp_path).resuming_client_context(), tls.server_context(pair)


def test_the_second_connection_resumes_the_first_ones_session(
    contexts: tuple[tls.ResumingClientContext, ssl.SSLContext],
) -> None:
    client, server = contexts
    first, _ = _handshake(client, server)
    assert not first.session_reused
    assert first.version() == "TLSv1.2"
    client.handshake_done(first)
    for _ in range(3):
        again, server_side = _handshake(client, server)
        assert again.session_reused and server_side.session_reused
        client.handshake_done(again)
    # Another name is another server: it gets a full handshake of its own.
    other, _ = _handshake(client, server, name="mbx1")
    assert not other.session_reused


def test_a_session_is_not_resumed_after_its_lifetime(
    contexts: tuple[tls.ResumingClientContext, ssl.SSLContext], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, server = contexts
    first, _ = _handshake(client, server)
    client.handshake_done(first)
    monkeypatch.setattr(tls, "RESUMPTION_LIFETIME", -1.0)
    later, _ = _handshake(client, server)
    assert not later.session_reused
    client.handshake_done(later)
    monkeypatch.setattr(tls, "RESUMPTION_LIFETIME", 300.0)
    assert _handshake(client, server)[0].session_reused


def test_a_refused_session_falls_back_to_a_verified_full_handshake(
    tmp_path: Path, contexts: tuple[tls.ResumingClientContext, ssl.SSLContext]
) -> None:
    client, server = contexts
    first, _ = _handshake(client, server)
    client.handshake_done(first)
    # A restarted back end has new ticket keys: the old session is refused.
    restarted = tls.server_context(
        tls.TlsMaterial.of(tmp_path).ensure_server_certificate("mbx1", [NAME], [NAME])
    )
    full, _ = _handshake(client, restarted)
    assert not full.session_reused
    assert full.getpeercert() is not None


def test_resumption_never_skips_verification_of_a_stranger(
    tmp_path: Path, contexts: tuple[tls.ResumingClientContext, ssl.SSLContext]
) -> None:
    client, server = contexts
    client.handshake_done(_handshake(client, server)[0])
    # A server with a certificate from another CA, at the same name.
    stranger_pair = tls.TlsMaterial.of(tmp_path / "other").ensure_server_certificate(
        "mbx1", [NAME], [NAME]
    )
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(client, tls.server_context(stranger_pair))


def test_a_server_context_refuses_tls12_cbc_suites(
    contexts: tuple[tls.ResumingClientContext, ssl.SSLContext],
) -> None:
    """Every server context (POP3, replication's mutual one) is made by server_context."""
    client, server = contexts
    client.set_ciphers("ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA384")
    with pytest.raises(ssl.SSLError, match=r"NO_SHARED_CIPHER"):
        _handshake(client, server)


def test_a_valid_certificate_is_used_without_the_ca_key(tmp_path: Path) -> None:
    """A service that finds its certificate made needs no CA key; signing without it is
    one clear line, never a new CA made behind the organization's back."""
    material = tls.TlsMaterial.of(tmp_path)
    made = material.ensure_server_certificate("mbx1", ["mbx1"], [NAME])
    (material.folder / tls.CA_KEY).unlink()
    assert material.ensure_server_certificate("mbx1", ["mbx1"], [NAME]) == made
    with pytest.raises(UserError, match=r"^no certificate for server mbx2 on this host .*"
                       r"import-server-credentials"):  # fmt: skip
        material.ensure_server_certificate("mbx2", ["mbx2"], ["127.0.3.1"])
    assert not (material.folder / tls.CA_KEY).exists()
