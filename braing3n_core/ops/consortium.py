"""The consortium's keys and certificates (`braing3n consortium init`), made with `cryptography`.

One folder holds everything the consortium operator needs; each hospital receives only its own bundle:

```
DIR/consortium.json              public facts: SuperLink host and SANs, sites, key fingerprints
DIR/ca/ca.crt                    consortium CA certificate (public; every site trusts it)
DIR/ca/ca.key                    CA private key (0600; only needed to issue a new SuperLink certificate)
DIR/superlink/server.crt         SuperLink TLS certificate, signed by the CA (SANs from the options)
DIR/superlink/server.key         its private key (0600)
DIR/release/release.key          consortium Ed25519 release-signing key (0600, PEM PKCS#8)
DIR/release/release.pub          its public key (PEM), shipped to every site to verify releases
DIR/sites/<site>/                the credentials bundle handed to hospital <site> (folder 0700):
    ca.crt                       to verify the SuperLink's certificate
    supernode.key                the site's SuperNode authentication key (OpenSSH ECDSA P-384, 0600)
    supernode.pub                its public key (OpenSSH), registered at the SuperLink
    release.pub                  to verify signed releases
    site.json                    site id, SuperLink host, fingerprints
    README.txt                   one line per file
DIR/state/                       written by `consortium serve`/`run`: registrations, Flower homes, logs, runs.json
                                 (runs submitted), status-token (the status page's token, 0600)
```

Formats are the ones Flower 1.42 parses: `flower-supernode --auth-supernode-private-key` loads an
OpenSSH private key and requires an elliptic-curve key, `flwr supernode register` loads an OpenSSH
public key on a NIST curve (the same files `ssh-keygen -t ecdsa -b 384` writes). The SuperLink
certificate always carries `DNS:localhost` and `IP:127.0.0.1`: the SuperLink's own SuperExec dials the
Runtime API on loopback even when the SuperLink listens on 0.0.0.0.

Private keys are written 0600 from the moment they exist (the temporary file is created 0600, then
renamed); nothing here prints or logs key material, only paths and fingerprints.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from braing3n_core.config import ConfigError
from braing3n_core.fileio import atomic_write_bytes, atomic_write_json

FORMAT = "braing3n-consortium/1"
SITE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")  # the same rule as SiteConfig.site_id
LOOPBACK_DNS = ("localhost",)
LOOPBACK_IPS = ("127.0.0.1", "::1")
CLOCK_SKEW = dt.timedelta(minutes=10)  # certificates start slightly in the past: hospital clocks drift


@dataclass(frozen=True)
class Layout:
    """Where each file of a consortium folder lives."""

    root: Path

    manifest = property(lambda self: self.root / "consortium.json")
    ca_cert = property(lambda self: self.root / "ca" / "ca.crt")
    ca_key = property(lambda self: self.root / "ca" / "ca.key")
    server_cert = property(lambda self: self.root / "superlink" / "server.crt")
    server_key = property(lambda self: self.root / "superlink" / "server.key")
    release_key = property(lambda self: self.root / "release" / "release.key")
    release_pub = property(lambda self: self.root / "release" / "release.pub")
    state = property(lambda self: self.root / "state")

    def bundle(self, site: str) -> Path:
        return self.root / "sites" / site

    def site_public_key(self, site: str) -> Path:
        return self.bundle(site) / "supernode.pub"


@dataclass(frozen=True)
class SiteEntry:
    site_id: str
    public_key: Path  # OpenSSH public key registered at the SuperLink
    fingerprint: str
    revoked: bool = False


@dataclass(frozen=True)
class Consortium:
    layout: Layout
    host: str
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    sites: dict[str, SiteEntry]

    @property
    def active_sites(self) -> list[str]:
        return sorted(s for s, e in self.sites.items() if not e.revoked)


# --- writing keys -------------------------------------------------------------------------------------------


def _write_private(path: Path, data: bytes) -> None:
    """0600 from creation: the temporary file of `atomic_write_bytes` is made by mkstemp (0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
    os.chmod(path, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
    os.chmod(path, 0o644)


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def ssh_fingerprint(public_key: ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey) -> str:
    """`SHA256:…` as `ssh-keygen -lf` prints it, so IT teams can compare with their own tools."""
    blob = public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).split()[1]
    digest = hashlib.sha256(base64.b64decode(blob)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def certificate_sha256(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "BrainG3N-FL consortium"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _make_ca(days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("BrainG3N-FL consortium CA"))
        .issuer_name(_name("BrainG3N-FL consortium CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def subject_alt_names(host: str, dns_names: Iterable[str] = (),
                      ip_addresses: Iterable[str] = ()) -> tuple[list[str], list[str]]:
    """(DNS names, IP addresses) for the SuperLink certificate: the host, extras, and loopback, deduplicated."""
    dns, ips = [], []
    for value in [host, *dns_names, *LOOPBACK_DNS]:
        try:
            ips.append(str(ipaddress.ip_address(value)))  # `--host 10.0.0.5` is an IP SAN, not a DNS SAN
        except ValueError:
            if not re.fullmatch(r"(?=.{1,253}$)([A-Za-z0-9*]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?)+", value):
                raise ConfigError(f"--host/--dns: {value!r} is not a DNS name or IP address") from None
            dns.append(value.lower().rstrip("."))
    for value in [*ip_addresses, *LOOPBACK_IPS]:
        try:
            ips.append(str(ipaddress.ip_address(value)))
        except ValueError:
            raise ConfigError(f"--ip: {value!r} is not an IP address") from None
    return list(dict.fromkeys(dns)), list(dict.fromkeys(ips))


def _make_server_certificate(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, host: str, dns: Sequence[str], ips: Sequence[str],
    days: int,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    sans = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(host))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=True, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def _pem_private(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _check_site_ids(sites: Iterable[str]) -> list[str]:
    sites = [s.strip() for s in sites if s.strip()]
    bad = [s for s in sites if not SITE_ID.match(s)]
    if bad:
        raise ConfigError(f"--sites: {bad} are not site ids (letters, digits, '-' or '_'; they must match "
                          "site_id in the site YAML)")
    if len(set(sites)) != len(sites):
        raise ConfigError(f"--sites: duplicate site ids in {sites}")
    if not sites:
        raise ConfigError("--sites: name at least one site")
    return sites


# --- site bundles -------------------------------------------------------------------------------------------


BUNDLE_README = """\
BrainG3N-FL credentials for site {site} (consortium SuperLink: {host}). Keep this folder private.
ca.crt         consortium CA certificate; --root-certificates ca.crt verifies the SuperLink with it (public)
supernode.key  this site's SuperNode private key (OpenSSH ECDSA P-384) for --auth-supernode-private-key; SECRET
supernode.pub  its public key, registered at the SuperLink (fingerprint {fingerprint}) (public)
release.pub    consortium Ed25519 release key; braing3n verify PATH --public-key release.pub checks releases (public)
site.json      site id, SuperLink host and the fingerprints above (public)
Join: braing3n site join sites/{site}.yaml --credentials <this folder> --superlink {host}:<port>
"""


def _write_bundle(layout: Layout, site: str, host: str, key: ec.EllipticCurvePrivateKey | None,
                  public_key: ec.EllipticCurvePublicKey, ca_cert: x509.Certificate, release_pub: bytes) -> SiteEntry:
    bundle = _private_dir(layout.bundle(site))
    _write_public(bundle / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:  # absent when the hospital generated its own key and sent only the public half
        _write_private(bundle / "supernode.key", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    public = public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write_public(bundle / "supernode.pub", public + f" braing3n-{site}\n".encode())
    _write_public(bundle / "release.pub", release_pub)
    fingerprint = ssh_fingerprint(public_key)
    atomic_write_json(bundle / "site.json", {"site_id": site, "superlink_host": host,
                                             "ca_sha256": certificate_sha256(ca_cert),
                                             "supernode_key_fingerprint": fingerprint})
    os.chmod(bundle / "site.json", 0o644)
    _write_public(bundle / "README.txt", BUNDLE_README.format(site=site, host=host, fingerprint=fingerprint).encode())
    return SiteEntry(site, bundle / "supernode.pub", fingerprint)


def load_supernode_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """An OpenSSH public key on a NIST curve, as `flwr supernode register` accepts it."""
    try:
        key = serialization.load_ssh_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path}: not an OpenSSH public key ({error})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
        raise ConfigError(f"{path}: Flower needs an ECDSA key on a NIST curve (ssh-keygen -t ecdsa -b 384)")
    return key


# --- the consortium folder ----------------------------------------------------------------------------------


def init_consortium(root: Path, sites: Sequence[str], host: str, ip_addresses: Sequence[str] = (),
                    dns_names: Sequence[str] = (), ca_days: int = 3650, server_days: int = 825,
                    force: bool = False) -> Consortium:
    """Create CA, SuperLink certificate, release key and one credentials bundle per site in `root`.

    `root` must be new or empty: keys written among other files are easy to hand over by mistake. `force`
    writes into a non-empty folder anyway (never over an existing consortium)."""
    layout = Layout(Path(root).resolve())
    if layout.manifest.exists() or layout.ca_key.exists():
        raise ConfigError(f"{layout.root}: already holds a consortium; add sites with `braing3n consortium add-site`")
    if layout.root.exists() and not layout.root.is_dir():
        raise ConfigError(f"{layout.root}: exists and is not a folder")
    sites = _check_site_ids(sites)
    present = sorted(p.name for p in layout.root.iterdir()) if layout.root.is_dir() else []
    if present and not force:
        ours = {layout.ca_key.parent.name, layout.server_key.parent.name, layout.release_key.parent.name,
                layout.bundle(sites[0]).parent.name}
        clash = [name for name in present if name in ours]
        shown = ", ".join(present[:5]) + (f" and {len(present) - 5} more" if len(present) > 5 else "")
        overwrite = f"; --force would write into {', '.join(clash)}/ among their files" if clash else ""
        raise ConfigError(f"{layout.root}: not empty ({shown}); a consortium folder holds private keys, so it "
                          f"starts empty: choose a new folder, or pass --force to write into this one{overwrite}")
    dns, ips = subject_alt_names(host, dns_names, ip_addresses)
    _private_dir(layout.root)
    _private_dir(layout.ca_key.parent)
    _private_dir(layout.server_key.parent)
    _private_dir(layout.release_key.parent)

    ca_key, ca_cert = _make_ca(ca_days)
    _write_private(layout.ca_key, _pem_private(ca_key))
    _write_public(layout.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    server_key, server_cert = _make_server_certificate(ca_key, ca_cert, host, dns, ips, server_days)
    _write_private(layout.server_key, _pem_private(server_key))
    _write_public(layout.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))

    release = ed25519.Ed25519PrivateKey.generate()
    _write_private(layout.release_key, _pem_private(release))
    release_pub = release.public_key().public_bytes(serialization.Encoding.PEM,
                                                    serialization.PublicFormat.SubjectPublicKeyInfo)
    _write_public(layout.release_pub, release_pub)

    entries = {}
    for site in sites:
        key = ec.generate_private_key(ec.SECP384R1())  # the curve Flower itself uses for node keys
        entries[site] = _write_bundle(layout, site, host, key, key.public_key(), ca_cert, release_pub)
    consortium = Consortium(layout, host, tuple(dns), tuple(ips), entries)
    _write_manifest(consortium, ca_cert, release.public_key())
    return consortium


def add_site(root: Path, site: str, public_key: Path | None = None) -> SiteEntry:
    """A new hospital: a fresh key pair, or only the public key the hospital generated itself."""
    consortium = load_consortium(root)
    (site,) = _check_site_ids([site])
    if site in consortium.sites:
        raise ConfigError(f"{consortium.layout.manifest}: site {site!r} exists already")
    layout = consortium.layout
    ca_cert = x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())
    if public_key is not None:
        key, public = None, load_supernode_public_key(public_key)
    else:
        key = ec.generate_private_key(ec.SECP384R1())
        public = key.public_key()
    entry = _write_bundle(layout, site, consortium.host, key, public, ca_cert, layout.release_pub.read_bytes())
    _write_manifest(_with_site(consortium, entry), ca_cert, load_release_public_key(layout.release_pub))
    return entry


def rekey_site(root: Path, site: str, public_key: Path | None = None) -> SiteEntry:
    """A new authentication key for an existing site (lost, leaked or revoked key; Flower never accepts a
    revoked key again). The next registration sync unregisters the old key and registers the new one."""
    consortium = load_consortium(root)
    if site not in consortium.sites:
        raise ConfigError(f"{consortium.layout.manifest}: no site {site!r}; sites are {sorted(consortium.sites)}")
    layout = consortium.layout
    ca_cert = x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())
    if public_key is not None:
        key, public = None, load_supernode_public_key(public_key)
        (layout.bundle(site) / "supernode.key").unlink(missing_ok=True)  # the old private key must not linger
    else:
        key = ec.generate_private_key(ec.SECP384R1())
        public = key.public_key()
    entry = _write_bundle(layout, site, consortium.host, key, public, ca_cert, layout.release_pub.read_bytes())
    _write_manifest(_with_site(consortium, entry), ca_cert, load_release_public_key(layout.release_pub))
    return entry


def set_revoked(root: Path, site: str, revoked: bool = True) -> Consortium:
    """Mark a site revoked (or reinstated) in consortium.json; `serve` never registers a revoked site."""
    consortium = load_consortium(root)
    if site not in consortium.sites:
        raise ConfigError(f"{consortium.layout.manifest}: no site {site!r}; sites are {sorted(consortium.sites)}")
    entry = consortium.sites[site]
    updated = _with_site(consortium, SiteEntry(entry.site_id, entry.public_key, entry.fingerprint, revoked))
    layout = consortium.layout
    _write_manifest(updated, x509.load_pem_x509_certificate(layout.ca_cert.read_bytes()),
                    load_release_public_key(layout.release_pub))
    return updated


def _with_site(consortium: Consortium, entry: SiteEntry) -> Consortium:
    sites = {**consortium.sites, entry.site_id: entry}
    return Consortium(consortium.layout, consortium.host, consortium.dns_names, consortium.ip_addresses, sites)


def _write_manifest(consortium: Consortium, ca_cert: x509.Certificate, release_pub: ed25519.Ed25519PublicKey) -> None:
    root = consortium.layout.root
    atomic_write_json(consortium.layout.manifest, {
        "format": FORMAT,
        "superlink": {"host": consortium.host, "dns_names": list(consortium.dns_names),
                      "ip_addresses": list(consortium.ip_addresses)},
        "ca_sha256": certificate_sha256(ca_cert),
        "release_key_fingerprint": ssh_fingerprint(release_pub),
        "sites": {s: {"public_key": str(e.public_key.relative_to(root)), "fingerprint": e.fingerprint,
                      "revoked": e.revoked} for s, e in sorted(consortium.sites.items())},
    })
    os.chmod(consortium.layout.manifest, 0o644)


def load_consortium(root: Path) -> Consortium:
    layout = Layout(Path(root).resolve())
    if not layout.manifest.is_file():
        raise ConfigError(f"{layout.root}: no consortium.json; create one with `braing3n consortium init`")
    try:
        raw = json.loads(layout.manifest.read_text())
        if raw.get("format") != FORMAT:
            raise ValueError(f"unknown format {raw.get('format')!r}")
        sites = {s: SiteEntry(s, layout.root / e["public_key"], e["fingerprint"], bool(e.get("revoked", False)))
                 for s, e in raw["sites"].items()}
        link = raw["superlink"]
        return Consortium(layout, link["host"], tuple(link["dns_names"]), tuple(link["ip_addresses"]), sites)
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"{layout.manifest}: malformed consortium file ({error})") from None


def _key_bytes(path: Path, what: str) -> bytes:
    """A key file's bytes; a missing file or a folder is named as such, not as a malformed key."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; give the {what} file")
    if not path.is_file():
        raise ConfigError(f"{path}: {what} file not found")
    try:
        return path.read_bytes()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the {what} ({error.strerror})") from None


def load_release_public_key(path: Path) -> ed25519.Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(_key_bytes(path, "public key"))
    except ValueError as error:
        raise ConfigError(f"{path}: not a PEM public key ({error})") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ConfigError(f"{path}: not an Ed25519 public key")
    return key


def load_release_private_key(path: Path) -> ed25519.Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(_key_bytes(path, "private key"), password=None)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{path}: not an unencrypted PEM private key ({error})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"{path}: not an Ed25519 private key")
    return key
