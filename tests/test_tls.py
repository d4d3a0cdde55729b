"""TLS and mutual TLS on the gRPC port, with certificates made by openssl for the test."""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.processes import PolicydProcess


def _pki(d: Path) -> None:
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
        "-subj", "/CN=policyd test CA")
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={'localhost' if name == 'server' else 'proxy'}")
        (d / f"{name}.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext")


def _check(address: str, credentials: grpc.ChannelCredentials) -> int:
    with grpc.secure_channel(address, credentials, options=[("grpc.ssl_target_name_override", "localhost")]) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def test_tls_and_mutual_tls(tmp_path: Path) -> None:
    _pki(tmp_path)
    read = lambda name: (tmp_path / name).read_bytes()  # noqa: E731
    env = {"POLICYD_TLS_CERT_FILE": str(tmp_path / "server.pem"), "POLICYD_TLS_KEY_FILE": str(tmp_path / "server.key"),
           "POLICYD_TLS_CLIENT_CA_FILE": str(tmp_path / "ca.pem")}
    process = PolicydProcess("", f"sqlite:///{tmp_path / 'p.db'}", extra_env=env, cwd=str(tmp_path))
    try:
        mutual = grpc.ssl_channel_credentials(read("ca.pem"), read("client.key"), read("client.pem"))
        assert _check(process.address, mutual) == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError):  # no client certificate: refused
            _check(process.address, grpc.ssl_channel_credentials(read("ca.pem")))
        with grpc.insecure_channel(process.address) as plain, pytest.raises(grpc.RpcError):
            health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=5)
    finally:
        process.stop()


def test_cli_over_mutual_tls(tmp_path: Path) -> None:
    import subprocess as sp

    from tests.processes import policyd_command

    _pki(tmp_path)
    env = {"POLICYD_TLS_CERT_FILE": str(tmp_path / "server.pem"), "POLICYD_TLS_KEY_FILE": str(tmp_path / "server.key"),
           "POLICYD_TLS_CLIENT_CA_FILE": str(tmp_path / "ca.pem")}
    process = PolicydProcess("", f"sqlite:///{tmp_path / 'p.db'}", extra_env=env, cwd=str(tmp_path))
    try:
        args = [*policyd_command(), "health", "--server", f"localhost:{process.port}", "--tls-ca",
                str(tmp_path / "ca.pem"), "--tls-cert", str(tmp_path / "client.pem"), "--tls-key",
                str(tmp_path / "client.key")]
        assert sp.run(args, capture_output=True, text=True, timeout=30).stdout.strip() == "serving"
    finally:
        process.stop()


def test_admin_service_on_its_own_listener_with_its_own_client_ca(tmp_path: Path) -> None:
    """Decision services over server TLS on one port; the AdminService only on another, which requires
    client certificates from the admins' CA (not the proxies')."""
    from tests.servers import free_port, wait_port
    from policyd_client.v1 import admin_pb2, admin_pb2_grpc, policy_pb2, policy_pb2_grpc

    _pki(tmp_path)
    admins = tmp_path / "admins"
    admins.mkdir()
    _pki(admins)
    read = lambda path: Path(path).read_bytes()  # noqa: E731
    admin_port = free_port()
    env = {"POLICYD_TLS_CERT_FILE": str(tmp_path / "server.pem"), "POLICYD_TLS_KEY_FILE": str(tmp_path / "server.key"),
           "POLICYD_ADMIN_LISTEN": f"127.0.0.1:{admin_port}",
           "POLICYD_ADMIN_TLS_CLIENT_CA_FILE": str(admins / "ca.pem")}
    process = PolicydProcess("", f"sqlite:///{tmp_path / 'p.db'}", extra_env=env, cwd=str(tmp_path))
    wait_port(admin_port)
    options = [("grpc.ssl_target_name_override", "localhost")]
    server_tls = grpc.ssl_channel_credentials(read(tmp_path / "ca.pem"))
    admin_mtls = grpc.ssl_channel_credentials(read(tmp_path / "ca.pem"), read(admins / "client.key"),
                                              read(admins / "client.pem"))
    proxy_mtls = grpc.ssl_channel_credentials(read(tmp_path / "ca.pem"), read(tmp_path / "client.key"),
                                              read(tmp_path / "client.pem"))
    try:
        with grpc.secure_channel(process.address, server_tls, options=options) as decisions:
            assert health_pb2_grpc.HealthStub(decisions).Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
                health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as absent:
                admin_pb2_grpc.AdminServiceStub(decisions).ListKeys(admin_pb2.ListKeysRequest(), timeout=10)
            assert absent.value.code() == grpc.StatusCode.UNIMPLEMENTED
        admin_address = f"127.0.0.1:{admin_port}"
        for refused in (server_tls, proxy_mtls):  # no client certificate, or one from the proxies' CA
            with grpc.secure_channel(admin_address, refused, options=options) as channel, pytest.raises(grpc.RpcError):
                admin_pb2_grpc.AdminServiceStub(channel).ListKeys(admin_pb2.ListKeysRequest(), timeout=5)
        with grpc.secure_channel(admin_address, admin_mtls, options=options) as channel:
            assert admin_pb2_grpc.AdminServiceStub(channel).ListKeys(admin_pb2.ListKeysRequest(), timeout=10).keys == []
            with pytest.raises(grpc.RpcError) as elsewhere:
                policy_pb2_grpc.PolicyServiceStub(channel).Release(policy_pb2.ReleaseRequest(request_id="x"), timeout=10)
            assert elsewhere.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        process.stop()
