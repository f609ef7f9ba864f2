"""Who may publish code: ed25519 signing keys, their text form, and the keys a loader trusts.

A compile cache is code that model servers import and run. Chunks are safe by
construction (named by their digest, verified on every read); manifests decide which
chunks become which files, so a manifest is trusted only when a trusted key signed it
(docs/security.md).

Text forms:

* a public key is ``ed25519:<standard base64 of the 32 raw bytes>`` (44 characters after
  the colon), optionally followed by a space and a comment, as in SSH's authorized_keys;
* a private key is a PKCS#8 PEM file (what ``openssl genpkey -algorithm ed25519`` writes),
  created by :func:`generate` with mode 0600.

``cryptography`` is imported only when a key is used, so model.py's import stays light.
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from casstore.errors import InvalidKey

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

ALGORITHM = "ed25519"
PUBLIC_KEY_PREFIX = f"{ALGORITHM}:"
PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64
# Prefixed to what is signed, so that a casstore signature can never be replayed as a
# signature of anything else made with the same key (and the reverse).
SIGNATURE_CONTEXT = b"casstore manifest signature v1\x00"

SIGNING_KEY_VARIABLE = "CASSTORE_SIGNING_KEY"
TRUSTED_KEYS_VARIABLE = "CASSTORE_TRUSTED_KEYS"


@dataclass(frozen=True)
class PublicKey:
    raw: bytes

    def __str__(self) -> str:
        return PUBLIC_KEY_PREFIX + base64.b64encode(self.raw).decode("ascii")

    @property
    def short(self) -> str:
        """The first 12 base64 characters, for tables: ``ed25519:AbCdEf012345``. Trust is
        always decided on the whole key; this only helps a person match a line."""
        return str(self)[: len(PUBLIC_KEY_PREFIX) + 12]


def signer_name(signer: bytes | None, *, short: bool = False) -> str:
    """A manifest's signer for people and JSON: ``ed25519:…`` (``short``: its first
    characters), or ``unsigned``."""
    if signer is None:
        return "unsigned"
    key = PublicKey(signer)
    return key.short if short else str(key)


def parse_public_key(text: str) -> PublicKey:
    """``ed25519:<base64>`` (a comment after a space is ignored) → :class:`PublicKey`."""
    word = text.strip().split(maxsplit=1)[0] if text.strip() else ""
    if not word.startswith(PUBLIC_KEY_PREFIX):
        raise InvalidKey(f"{word[:60]!r} is not a public key (expected ed25519:<base64>)")
    try:
        raw = base64.b64decode(word[len(PUBLIC_KEY_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidKey(f"{word[:60]!r} is not a public key (bad base64)") from None
    if len(raw) != PUBLIC_KEY_SIZE:
        raise InvalidKey(f"{word[:60]!r} is not a public key ({len(raw)} bytes, not 32)")
    return PublicKey(raw)


class SigningKey:
    """A private key read from a file; signs manifests."""

    def __init__(self, private: Ed25519PrivateKey, source: str) -> None:
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        self._private = private
        self.source = source
        self.public = PublicKey(private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))

    def sign(self, message: bytes) -> bytes:
        return self._private.sign(SIGNATURE_CONTEXT + message)

    def __repr__(self) -> str:
        return f"SigningKey({self.public}, from {self.source})"


def load_signing_key(path: str | os.PathLike[str]) -> SigningKey:
    """The private key in the PEM file ``path``. Raises :class:`InvalidKey`."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    source = os.fspath(path)
    try:
        data = Path(source).expanduser().read_bytes()
    except OSError as e:
        raise InvalidKey(f"cannot read signing key {source}: {e.strerror or e}") from e
    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise InvalidKey(
            f"{source} is not an unencrypted PEM private key ({e}); `casstore keygen` makes one"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise InvalidKey(f"{source} holds a {type(key).__name__}, not an ed25519 key")
    return SigningKey(key, source)


def generate(path: str | os.PathLike[str]) -> PublicKey:
    """Write a new private key to ``path`` (mode 0600, never over an existing file) and
    return its public key. Raises :class:`FileExistsError` when ``path`` exists."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
    )

    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    target = Path(path).expanduser()
    # O_EXCL: a key is never replaced (that would orphan every manifest it signed); 0600
    # from the start, so the key is never readable by others, not even for a moment.
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, pem)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(target)
        raise
    os.close(fd)
    # The key's name must survive a crash too, once its public key has been printed.
    directory = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return SigningKey(key, os.fspath(target)).public


def verify(public: bytes, signature: bytes, message: bytes) -> bool:
    """Whether ``signature`` is ``public``'s ed25519 signature of ``message`` (as
    :meth:`SigningKey.sign` made it)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if len(public) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, SIGNATURE_CONTEXT + message)
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True)
class TrustedKeys:
    """The public keys whose manifests a loader uses; every other manifest is ignored."""

    keys: frozenset[bytes]
    source: str  # where the list came from, for messages

    def trusts(self, signer: bytes | None) -> bool:
        return signer is not None and signer in self.keys


def parse_trusted_keys(value: str, source: str = "trusted keys") -> TrustedKeys:
    """Public keys separated by commas (or whitespace), or the path of a file holding one
    per line (blank lines and ``#`` comments ignored). Raises :class:`InvalidKey` on
    anything else, and on an empty list: trusting no key at all is never what was meant."""
    text = value.strip()
    if text.startswith(PUBLIC_KEY_PREFIX):
        words = text.replace(",", " ").split()
        keys = [parse_public_key(w) for w in words]
    else:
        path = Path(text).expanduser()
        source = f"{source} file {path}"
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise InvalidKey(
                f"{text!r} is neither a list of public keys (ed25519:...) nor a readable "
                f"file of them ({getattr(e, 'strerror', None) or e})"
            ) from None
        keys = []
        for number, line in enumerate(lines, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                keys.append(parse_public_key(line))
            except InvalidKey as e:
                raise InvalidKey(f"{path}, line {number}: {e}") from None
    if not keys:
        raise InvalidKey(f"{source} names no public key")
    return TrustedKeys(frozenset(k.raw for k in keys), source)


def _setting(option: str | None, option_name: str, variable: str | None) -> tuple[str, str] | None:
    """(value, where it came from) of ``option``, else of ``$variable``; None when neither
    is set. Set but blank is an error, not "unset": an empty ``--trusted-keys "$KEYS"`` or
    a variable from a missing secret must never quietly turn trust or signing off."""
    if option is not None:
        value, source = option, option_name
    elif variable is not None and variable in os.environ:
        value, source = os.environ[variable], f"${variable}"
    else:
        return None
    if not value.strip():
        raise InvalidKey(f"{source} is set but empty (unset it to go without)")
    return value.strip(), source


def signing_key_from(
    option: str | None, variable: str | None = SIGNING_KEY_VARIABLE
) -> SigningKey | None:
    """The key ``option`` names, else ``$variable``'s (``$CASSTORE_SIGNING_KEY``), else
    None (unsigned)."""
    found = _setting(option, "--signing-key", variable)
    return load_signing_key(found[0]) if found else None


def trusted_keys_from(
    option: str | None, variable: str | None = TRUSTED_KEYS_VARIABLE
) -> TrustedKeys | None:
    """The keys ``option`` gives, else ``$variable``'s (``$CASSTORE_TRUSTED_KEYS``), else
    None (every manifest is used, signed or not)."""
    found = _setting(option, "--trusted-keys", variable)
    return parse_trusted_keys(*found) if found else None
