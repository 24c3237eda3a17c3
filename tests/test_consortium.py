"""`braing3n consortium init`: certificates verify, SANs, key permissions, and the key files load in
Flower 1.42's own parsers (the functions `flower-supernode` and `flwr supernode register` call)."""

from __future__ import annotations

import argparse
import ipaddress
import json
import shlex
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import DNSName, IPAddress, PolicyBuilder, Store, VerificationError

from braing3n_core.cli import main
from braing3n_core.config import ConfigError
from braing3n_core.ops.consortium import (
    Layout,
    add_site,
    init_consortium,
    load_consortium,
    rekey_site,
    set_revoked,
    ssh_fingerprint,
)
from braing3n_core.ops.deploy import FlowerCommand, load_credentials, superlink_command, supernode_command
from braing3n_core.site_config import SiteConfig

SITES = ["site-a", "site-b", "site-c"]


@pytest.fixture(scope="module")
def consortium(tmp_path_factory):
    root = tmp_path_factory.mktemp("consortium") / "fl"
    return init_consortium(root, SITES, "fl.hospital-net.example", ip_addresses=["10.1.2.3"], dns_names=["superlink.local"])


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_superlink_certificate_chains_to_the_ca_for_each_name(consortium) -> None:
    layout = consortium.layout
    ca, server = _load(layout.ca_cert), _load(layout.server_cert)
    store = Store([ca])
    for subject in (DNSName("fl.hospital-net.example"), DNSName("superlink.local"), DNSName("localhost"),
                    IPAddress(ipaddress.ip_address("10.1.2.3")), IPAddress(ipaddress.ip_address("127.0.0.1"))):
        chain = PolicyBuilder().store(store).build_server_verifier(subject).verify(server, [])
        assert chain[-1] == ca
    with pytest.raises(VerificationError):
        PolicyBuilder().store(store).build_server_verifier(DNSName("elsewhere.example")).verify(server, [])
    other = init_consortium(layout.root.parent / "other", ["x"], "fl.hospital-net.example")
    with pytest.raises(VerificationError):  # another consortium's CA does not vouch for this certificate
        PolicyBuilder().store(Store([_load(other.layout.ca_cert)])).build_server_verifier(
            DNSName("fl.hospital-net.example")).verify(server, [])


def test_superlink_certificate_names_and_usage(consortium) -> None:
    server = _load(consortium.layout.server_cert)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["fl.hospital-net.example", "superlink.local", "localhost"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.1.2.3", "127.0.0.1", "::1"]
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    ca = _load(consortium.layout.ca_cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert server.not_valid_after_utc <= ca.not_valid_after_utc


def test_private_keys_are_private_and_public_files_readable(consortium) -> None:
    layout = consortium.layout
    secrets = [layout.ca_key, layout.server_key, layout.release_key] + [layout.bundle(s) / "supernode.key" for s in SITES]
    for path in secrets:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for folder in [layout.root, layout.ca_key.parent, layout.release_key.parent] + [layout.bundle(s) for s in SITES]:
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    for path in [layout.ca_cert, layout.server_cert, layout.release_pub, layout.manifest, layout.bundle("site-a") / "site.json",
                 layout.bundle("site-a") / "supernode.pub", layout.bundle("site-a") / "README.txt"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_site_keys_load_in_flowers_parsers(consortium) -> None:
    from flwr.cli.supernode.register import try_load_public_key  # what `flwr supernode register` runs
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication  # `--auth-supernode-private-key`

    for site in SITES:
        bundle = consortium.layout.bundle(site)
        registered = try_load_public_key(bundle / "supernode.pub")
        private, public = _try_setup_client_authentication(
            argparse.Namespace(auth_supernode_private_key=str(bundle / "supernode.key"), auth_supernode_public_key=None))
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        # The SuperLink matches a SuperNode by the PEM of its public key: the pair must be the registered one.
        assert public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo) == registered
        assert consortium.sites[site].fingerprint == ssh_fingerprint(public)
        assert (bundle / "supernode.pub").read_text().startswith("ecdsa-sha2-nistp384 ")


def test_tls_handshake_with_the_generated_files(consortium) -> None:
    """A real TLS server with the SuperLink's files; clients trusting only the consortium CA."""
    layout = consortium.layout
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(layout.server_cert, layout.server_key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def accept(count: int) -> None:
        for _ in range(count):
            connection, _ = listener.accept()
            try:
                with server_context.wrap_socket(connection, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError):
                pass

    thread = threading.Thread(target=accept, args=(3,), daemon=True)
    thread.start()
    try:
        client = ssl.create_default_context(cafile=str(layout.bundle("site-a") / "ca.crt"))
        for name in ("localhost", "127.0.0.1"):
            with socket.create_connection(("127.0.0.1", port)) as raw, client.wrap_socket(raw, server_hostname=name) as tls:
                assert tls.recv(2) == b"ok"
        with pytest.raises(ssl.SSLCertVerificationError):  # a name the certificate does not carry
            with socket.create_connection(("127.0.0.1", port)) as raw:
                client.wrap_socket(raw, server_hostname="intruder.example")
    finally:
        thread.join(10)
        listener.close()


def test_bundle_holds_what_a_site_needs_and_only_its_own_key(consortium) -> None:
    bundle = consortium.layout.bundle("site-b")
    assert sorted(p.name for p in bundle.iterdir()) == ["README.txt", "ca.crt", "release.pub", "site.json",
                                                        "supernode.key", "supernode.pub"]
    readme = (bundle / "README.txt").read_text()
    for name in ("ca.crt", "supernode.key", "supernode.pub", "release.pub", "site.json"):
        assert f"\n{name} " in readme
    info = json.loads((bundle / "site.json").read_text())
    assert info["site_id"] == "site-b" and info["superlink_host"] == "fl.hospital-net.example"
    assert (bundle / "ca.crt").read_bytes() == consortium.layout.ca_cert.read_bytes()
    assert (bundle / "release.pub").read_bytes() == consortium.layout.release_pub.read_bytes()
    keys = {(consortium.layout.bundle(s) / "supernode.key").read_bytes() for s in SITES}
    assert len(keys) == 3


def test_cli_init_prints_no_secret(tmp_path: Path, capsys) -> None:
    assert main(["consortium", "init", str(tmp_path / "c"), "--sites", "a,b", "--host", "10.0.0.7", "--dns", "fl.example"]) == 0
    out = capsys.readouterr().out
    layout = Layout((tmp_path / "c").resolve())
    assert "PRIVATE KEY" not in out and "BEGIN" not in out
    for secret in [layout.ca_key, layout.server_key, layout.release_key, layout.bundle("a") / "supernode.key"]:
        body = "".join(line for line in secret.read_text().splitlines() if not line.startswith("-----"))
        assert body[20:60] not in out
    assert "IP 10.0.0.7, 127.0.0.1, ::1" in out and "DNS fl.example, localhost" in out  # --host as an IP is an IP SAN


def test_refusals_name_the_problem(tmp_path: Path, consortium) -> None:
    with pytest.raises(ConfigError, match="already holds a consortium"):
        init_consortium(consortium.layout.root, ["x"], "h")
    with pytest.raises(ConfigError, match="not site ids"):
        init_consortium(tmp_path / "a", ["ok", "bad id"], "h")
    with pytest.raises(ConfigError, match="duplicate"):
        init_consortium(tmp_path / "b", ["x", "x"], "h")
    with pytest.raises(ConfigError, match="not an IP address"):
        init_consortium(tmp_path / "c", ["x"], "h", ip_addresses=["10.0.0.300"])
    with pytest.raises(ConfigError, match="not a DNS name"):
        init_consortium(tmp_path / "d", ["x"], "bad host!")
    with pytest.raises(ConfigError, match="no consortium.json"):
        load_consortium(tmp_path / "nothing")


def test_add_site_with_the_hospitals_own_key_and_revocation_flag(tmp_path: Path) -> None:
    root = tmp_path / "c"
    init_consortium(root, ["a"], "localhost")
    own = ec.generate_private_key(ec.SECP256R1())  # the hospital keeps its private key
    (tmp_path / "own.pub").write_bytes(own.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                      serialization.PublicFormat.OpenSSH))
    entry = add_site(root, "b", tmp_path / "own.pub")
    bundle = Layout(root.resolve()).bundle("b")
    assert not (bundle / "supernode.key").exists() and entry.fingerprint == ssh_fingerprint(own.public_key())
    with pytest.raises(ConfigError, match="exists already"):
        add_site(root, "b")
    (tmp_path / "rsa.pub").write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl x")
    with pytest.raises(ConfigError, match="NIST curve"):
        add_site(root, "c", tmp_path / "rsa.pub")
    set_revoked(root, "a")
    consortium = load_consortium(root)
    assert consortium.active_sites == ["b"] and consortium.sites["a"].revoked
    # A revoked key is never accepted again: the site comes back with a new one.
    old_key = (Layout(root.resolve()).bundle("a") / "supernode.key").read_bytes()
    entry = rekey_site(root, "a")
    consortium = load_consortium(root)
    assert consortium.active_sites == ["a", "b"] and entry.fingerprint != consortium.sites["b"].fingerprint
    assert (Layout(root.resolve()).bundle("a") / "supernode.key").read_bytes() != old_key


def test_site_credentials_are_checked_before_flower_starts(tmp_path: Path, consortium) -> None:
    layout = consortium.layout
    site_yaml = tmp_path / "site-a.yaml"
    site_yaml.write_text(yaml.safe_dump({"site_id": "site-a", "data_root": str(tmp_path), "cache_dir": str(tmp_path / "cache")}))
    site = SiteConfig.from_yaml(site_yaml)
    with pytest.raises(ConfigError, match="credentials of site 'site-b'"):
        load_credentials(layout.bundle("site-b"), "site-a")
    credentials = load_credentials(layout.bundle("site-a"), "site-a")
    command = supernode_command(site, credentials, "fl.hospital-net.example:9092", 9100)
    assert command.argv[1:] == ("--root-certificates", str(layout.bundle("site-a") / "ca.crt"), "--superlink",
                                "fl.hospital-net.example:9092", "--auth-supernode-private-key",
                                str(layout.bundle("site-a") / "supernode.key"), "--port", "9100",
                                "--node-config", f"site-config='{site_yaml.resolve()}'")
    assert command.env["FLWR_HOME"] == str(tmp_path / "cache" / "flower-home")
    assert command.env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1" and command.env["FLWR_TELEMETRY_ENABLED"] == "0"
    # The printed command is what a shell would run: it splits back into the same words.
    words = shlex.split(command.shell())
    assert words[words.index("flower-supernode") + 1:] == list(command.argv[1:])
    assert '--node-config "site-config=' in command.shell()
    key = layout.bundle("site-a") / "supernode.key"
    key.chmod(0o640)
    try:
        with pytest.raises(ConfigError, match="chmod 600"):
            load_credentials(layout.bundle("site-a"), "site-a")
    finally:
        key.chmod(0o600)


def test_superlink_command_uses_tls_auth_and_a_database(consortium) -> None:
    command = superlink_command(consortium, "0.0.0.0", 9092)
    argv = list(command.argv)
    layout = consortium.layout
    for flag, value in (("--ssl-ca-certfile", layout.ca_cert), ("--ssl-certfile", layout.server_cert),
                        ("--ssl-keyfile", layout.server_key), ("--database", layout.state / "superlink.db"),
                        ("--host", "0.0.0.0"), ("--port", "9092")):
        assert argv[argv.index(flag) + 1] == str(value)
    assert "--enable-supernode-auth" in argv and "--disable-runtime-dependency-installation" in argv
    assert "--insecure" not in argv
    assert FlowerCommand(("flwr", "ls"), {}).shell() == "flwr ls"
