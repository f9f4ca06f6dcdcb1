"""Redaction: secret-named keys at any depth in any naming style, and the secrets inside strings (card numbers,
URL passwords, `name=value` pairs, bearer tokens), without hiding what is not secret."""
from __future__ import annotations

import json
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fh_tasks.redact import MAX_DEPTH, REDACTED, TOO_DEEP, is_secret_key, redact, redact_text

SECRET_KEYS = [
    "password", "Password", "PASSWORD", "passwd", "db_pass", "user_password", "passphrase", "passcode", "pwd",
    "secret", "client_secret", "clientSecret", "token", "access_token", "refreshToken", "X-Auth-Token", "id_token",
    "api_key", "apiKey", "APIKey", "api-key", "apikey", "API_KEY", "access_key", "accessKey", "private_key",
    "privateKey", "key", "signing_key", "signingKey", "encryption.key", "keys", "auth", "Authorization",
    "authorization", "credential", "credentials", "creds", "cookie", "Set-Cookie", "session", "session_id",
    "sessionid", "pin", "PIN", "user_pin", "pin_code", "otp", "OTPCode", "totp", "jwt", "jwt_token", "bearer",
    "cvv", "CVV2", "cvc", "card_number", "cardNumber", "Card Number", "ccnum", "cc_number", "credit_card", "pan",
]
PLAIN_KEYS = [
    "user", "username", "name", "email", "keyboard", "monkey", "turkey", "hockey", "author", "authority",
    "passenger", "bypass", "compass", "pinned", "spin", "opinion", "span", "company", "tokenizer", "secretary",
    "credit", "card", "number", "cookbook", "url", "path", "count", "id", "description", "keynote",
]


@pytest.mark.parametrize("key", SECRET_KEYS)
def test_secret_keys_are_recognised(key: str) -> None:
    assert is_secret_key(key), key


@pytest.mark.parametrize("key", PLAIN_KEYS)
def test_ordinary_keys_are_left_alone(key: str) -> None:
    assert not is_secret_key(key), key


def styled(words: list[str], style: int) -> str:
    "`words` joined in one of the usual naming styles."
    if style == 0: return "_".join(words)
    if style == 1: return "-".join(w.capitalize() for w in words)
    if style == 2: return words[0] + "".join(w.capitalize() for w in words[1:])
    if style == 3: return "_".join(words).upper()
    return " ".join(words)


@given(prefix=st.sampled_from(["", "user", "db", "stripe", "github", "x", "primary", "old"]),
       secret=st.sampled_from(["password", "secret", "token", "key", "pin", "otp", "cookie", "credentials", "jwt"]),
       style=st.integers(0, 4))
def test_a_secret_word_in_any_naming_style_is_recognised(prefix: str, secret: str, style: int) -> None:
    assert is_secret_key(styled([w for w in (prefix, secret) if w], style))


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-1000, 1000), st.text(alphabet="abcdefgh ", max_size=8))
plain_key = st.sampled_from(PLAIN_KEYS)


def plain_json(depth: int = 3) -> st.SearchStrategy[object]:
    return st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                           st.dictionaries(plain_key, inner, max_size=3)),
                        max_leaves=12)


@given(value=plain_json(), key=st.sampled_from(SECRET_KEYS), seed=st.integers(0, 10**6),
       secret=st.text(alphabet="QWXZ0123456789", min_size=6, max_size=12))
def test_a_secret_value_never_survives_and_the_rest_is_kept(value: object, key: str, seed: int, secret: str) -> None:
    # Given an ordinary JSON value with a secret-named key put at a random depth
    rnd = random.Random(seed)
    holder: dict[str, object] = {key: "SECRET-" + secret}
    doc: object = holder
    for _ in range(rnd.randint(0, 5)): doc = [doc] if rnd.random() < 0.5 else {rnd.choice(PLAIN_KEYS): doc}
    whole = {"data": value, "nested": doc}
    # Then the secret is gone, everything else is unchanged, and redacting again changes nothing
    out = redact(whole)
    assert "SECRET-" not in json.dumps(out)
    assert out["data"] == value
    assert redact(out) == out


def luhn_complete(body: str) -> str:
    "`body` with the check digit that makes it pass the Luhn check."
    for d in "0123456789":
        n = body + d
        total = sum(int(c) * (2 if i % 2 else 1) - (9 if int(c) * (2 if i % 2 else 1) > 9 else 0)
                    for i, c in enumerate(reversed(n)))
        if total % 10 == 0: return n
    raise AssertionError("unreachable")


@given(body=st.text(alphabet="0123456789", min_size=12, max_size=18), sep=st.sampled_from(["", " ", "-"]))
def test_card_numbers_in_text_are_masked(body: str, sep: str) -> None:
    number = luhn_complete(body)
    shown = sep.join(number[i:i + 4] for i in range(0, len(number), 4))
    out = redact_text(f"charge card {shown} for order 12")
    assert out == f"charge card {REDACTED} for order 12"
    assert redact({"note": shown}) == {"note": REDACTED}


@given(body=st.text(alphabet="0123456789", min_size=12, max_size=18))
def test_numbers_that_fail_the_luhn_check_are_kept(body: str) -> None:
    good = luhn_complete(body)
    bad = good[:-1] + str((int(good[-1]) + 1) % 10)
    assert redact_text(f"order {bad}") == f"order {bad}"


def test_short_numbers_and_ids_are_kept() -> None:
    for text in ("4111 1111 1111", "order 42", "01a23594ee054724d478bde38014c663", "1796195282.4377835",
                 "tel +44 20 7946 0958"):
        assert redact_text(text) == text


@given(user=st.text(alphabet="abcdefghijklmnop_", min_size=1, max_size=10),
       password=st.text(alphabet="QWXZ0123456789!$%^*()@", min_size=1, max_size=16),
       scheme=st.sampled_from(["postgres", "https", "redis", "amqp", "mysql+pymysql"]),
       host=st.sampled_from(["db.example.com", "127.0.0.1:5432", "[::1]"]))
def test_passwords_inside_urls_are_masked_and_the_url_kept(user: str, password: str, scheme: str, host: str) -> None:
    url = f"{scheme}://{user}:{password}@{host}/app?sslmode=require"
    assert redact_text(f"cannot connect to {url}") == (
        f"cannot connect to {scheme}://{user}:{REDACTED}@{host}/app?sslmode=require")


@pytest.mark.parametrize("text, shown", [
    ("GET https://api.example.com/v1?token=abc123&page=2", f"GET https://api.example.com/v1?token={REDACTED}&page=2"),
    ("login(user='ada', password='hunter2')", f"login(user='ada', password='{REDACTED}')"),
    ("{'api_key': 'sk-live-1', 'n': 3}", f"{{'api_key': '{REDACTED}', 'n': 3}}"),
    ('{"pin": 1234, "name": "ada"}', f'{{"pin": {REDACTED}, "name": "ada"}}'),
    ("Authorization: Bearer eyJhbGciOi.eyJzdWIi.sig", f"Authorization: Bearer {REDACTED}"),
    ("headers: authorization=Basic dXNlcjpwYXNz", f"headers: authorization={REDACTED} {REDACTED}"),
    ("Bearer xxx", f"Bearer {REDACTED}"),
    ('{"Authorization": "Bearer abc.def"}', f'{{"Authorization": "{REDACTED}"}}'),
    ("Basic dXNlcjpwYXNzd29yZA==", f"Basic {REDACTED}"),
    ("keyboard=qwerty monkey=1 key=k", f"keyboard=qwerty monkey=1 key={REDACTED}"),
    ("KeyError: 'session'", "KeyError: 'session'"),
    ("a plain sentence about a bearer of news", "a plain sentence about a bearer of news"),
])
def test_secrets_inside_text_are_masked(text: str, shown: str) -> None:
    assert redact_text(text) == shown


def test_values_nested_thousands_deep_are_cut_not_a_crash() -> None:
    deep: object = "x"
    for _ in range(5000): deep = [deep]
    out = redact({"a": deep})
    json.dumps(out)  # shallow enough to print
    node = out["a"]
    for _ in range(MAX_DEPTH - 1): node = node[0]
    assert node == TOO_DEEP


def test_the_cli_still_exports_redact() -> None:
    from fh_tasks.cli import redact as cli_redact
    assert cli_redact is redact
