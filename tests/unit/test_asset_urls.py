"""samseg.stores.signed_urls: signing and verifying mask URLs (pure functions; the clock is passed in)."""

from __future__ import annotations

import os
from urllib.parse import parse_qs, urlsplit

import pytest
from pydantic import SecretStr

from samseg.core.settings import Settings
from samseg.stores.signed_urls import AssetSignatureError, sign, signed_mask_url, verify, verify_request

SECRET = SecretStr("asset-url-secret-" + "s" * 32)
NOW = 1_800_000_000
MASK_0 = "/assets/job-1/mask_images/mask_000.png"
MASK_1 = "/assets/job-1/mask_images/mask_001.png"
OTHER_JOB = "/assets/job-2/mask_images/mask_000.png"


@pytest.fixture(autouse=True)
def hermetic(monkeypatch, tmp_path):
    for key in list(os.environ):
        if key.upper().startswith(("SAMSEG_", "AWS_")):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def params(query: str) -> tuple[str, str]:
    parsed = parse_qs(query, strict_parsing=True)
    assert sorted(parsed) == ["expires", "signature"]
    return parsed["expires"][0], parsed["signature"][0]


def reason(path: str, expires: str | None, signature: str | None, now: float = NOW, secret=SECRET) -> str:
    with pytest.raises(AssetSignatureError) as info:
        verify(path, expires, signature, secret, now)
    return info.value.reason


def test_a_signed_path_verifies_until_it_expires():
    expires, signature = params(sign(MASK_0, SECRET, 600, NOW))
    assert expires == str(NOW + 600)
    assert "=" not in signature and "+" not in signature and "/" not in signature  # URL-safe, unpadded
    verify(MASK_0, expires, signature, SECRET, NOW)
    verify(MASK_0, expires, signature, SECRET, NOW + 599.9)
    assert reason(MASK_0, expires, signature, now=NOW + 600) == "expired"
    assert reason(MASK_0, expires, signature, now=NOW + 86_400) == "expired"


@pytest.mark.parametrize(("expires", "signature"), [(None, None), ("", ""), (str(NOW + 60), None), (None, "abc")])
def test_missing_parameters(expires, signature):
    assert reason(MASK_0, expires, signature) == "missing"


@pytest.mark.parametrize("expires", ["-5", "1e9", "0x10", " 1800000600", "١٨٠٠", "9" * 13])
def test_malformed_expires(expires):
    assert reason(MASK_0, expires, "sig") == "malformed"


def test_a_signature_is_bound_to_its_path():
    expires, signature = params(sign(MASK_0, SECRET, 600, NOW))
    for other in (MASK_1, OTHER_JOB, MASK_0 + "/", MASK_0.upper(), "/assets/job-1/result.json"):
        assert reason(other, expires, signature) == "bad_signature", other


def test_tampering_with_either_parameter_fails():
    expires, signature = params(sign(MASK_0, SECRET, 600, NOW))
    assert reason(MASK_0, str(int(expires) + 3600), signature) == "bad_signature"  # extending the lifetime
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    assert reason(MASK_0, expires, flipped) == "bad_signature"
    assert reason(MASK_0, expires, signature[:-1]) == "bad_signature"
    assert reason(MASK_0, expires, signature + "=") == "bad_signature"
    assert reason(MASK_0, expires, "ünïcødé") == "bad_signature"


def test_an_expired_forgery_is_a_bad_signature_not_expired():
    assert reason(MASK_0, str(NOW - 10), "forged") == "bad_signature"


def test_another_secret_does_not_verify():
    expires, signature = params(sign(MASK_0, SECRET, 600, NOW))
    assert reason(MASK_0, expires, signature, secret=SecretStr("another-secret-" + "t" * 32)) == "bad_signature"
    verify(MASK_0, expires, signature, SECRET.get_secret_value(), NOW)  # a plain str key is the same key


def test_sign_refuses_nonsense():
    with pytest.raises(ValueError, match="route path"):
        sign("https://host/assets/x.png", SECRET, 60, NOW)
    with pytest.raises(ValueError, match="ttl"):
        sign(MASK_0, SECRET, 0, NOW)


# --- with Settings ------------------------------------------------------------------------------------


def test_without_a_secret_urls_are_unchanged_and_anything_is_served():
    settings = Settings(_env_file=None)
    assert signed_mask_url("http://localhost:8000", MASK_0, settings, NOW) == "http://localhost:8000" + MASK_0
    verify_request(MASK_0, None, None, settings)  # no secret: nothing to check


def test_signed_mask_url_uses_the_asset_url_ttl():
    settings = Settings(_env_file=None, asset_url_secret=SECRET, asset_ttl_seconds=7200)
    url = signed_mask_url("https://cdn.example.com/", MASK_0, settings, NOW)
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == ("https", "cdn.example.com", MASK_0)
    expires, signature = params(parts.query)
    assert int(expires) == NOW + 7200  # SAMSEG_ASSET_TTL_SECONDS when SAMSEG_ASSET_URL_TTL_SECONDS is unset
    verify(MASK_0, expires, signature, SECRET, NOW)

    short = Settings(_env_file=None, asset_url_secret=SECRET, asset_url_ttl_seconds=60)
    assert int(params(urlsplit(signed_mask_url("https://x", MASK_0, short, NOW)).query)[0]) == NOW + 60


def test_verify_request_against_the_real_clock():
    settings = Settings(_env_file=None, asset_url_secret=SECRET)
    expires, signature = params(urlsplit(signed_mask_url("http://h", MASK_0, settings)).query)
    verify_request(MASK_0, expires, signature, settings)
    with pytest.raises(AssetSignatureError) as info:
        verify_request(MASK_1, expires, signature, settings)
    assert info.value.reason == "bad_signature"
    with pytest.raises(AssetSignatureError) as info:
        verify_request(MASK_0, None, None, settings)
    assert info.value.reason == "missing"
