"""Encryption at rest for user secrets (Hub tokens), keyed from SECRET_KEY."""

import base64

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from django.conf import settings


def _fernet() -> Fernet:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"mistudio-hub-token").derive(
        settings.SECRET_KEY.encode()
    )
    return Fernet(base64.urlsafe_b64encode(key))


def encrypt_secret(value: str) -> bytes:
    return _fernet().encrypt(value.encode())


def decrypt_secret(value: bytes | memoryview) -> str:
    try:
        return _fernet().decrypt(bytes(value)).decode()
    except InvalidToken:
        raise ValueError("The stored secret cannot be decrypted (SECRET_KEY changed?).") from None
