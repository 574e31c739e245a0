#!/usr/bin/env python3
"""Writes the tampered keyset documents of tests/bad_input.rs.

    tests/data/bad-documents/generate.py target/debug/keyroll

Makes a real document with the keyroll binary (ES256 + RS256, `rotate --now`
twice: an active, a next and a retired key per algorithm), turns it into
valid.json, a template whose kids, private keys and certificates are
placeholders like {{ES256.active.private_key_pem}} (so that no key material
is checked in; the test fills them from a document it makes the same way),
then derives one tampered document per case in CASES. What each must make
keyroll say is in cases.toml beside them.
"""
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = """[store]
type = "file"
dir = "store"

[[keysets]]
name = "default"
algorithms = ["ES256", "RS256"]
rotate_every = "10s"
token_ttl = "5s"
jwks_cache_ttl = "2s"
propagation = "2s"
clock_skew = "1s"
"""
SECRET_FIELDS = ("kid", "private_key_pem", "certificate")


def real_document(binary):
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "keyroll.toml"), "w") as f:
            f.write(CONFIG)
        for _ in range(2):
            subprocess.run([binary, "--config", "keyroll.toml", "rotate", "--now"],
                           cwd=tmp, check=True, capture_output=True)
        with open(os.path.join(tmp, "store", "default.json")) as f:
            return json.load(f)


def template(doc):
    labels = {}
    for key in doc["keys"]:
        label = f"{key['alg']}.{key['state']}"
        labels[key["kid"]] = label
        for field in SECRET_FIELDS:
            key[field] = "{{%s.%s}}" % (label, field)
    for record in doc["audit"]:
        record["kid"] = "{{%s.kid}}" % labels[record["kid"]]
    return doc


def key(doc, alg, state):
    return next(k for k in doc["keys"] if k["alg"] == alg and k["state"] == state)


def text(doc):
    return json.dumps(doc, indent=2) + "\n"


def edit(change):
    def make(valid):
        doc = json.loads(valid)
        change(doc)
        return text(doc)
    return make


def set_field(alg, state, field, value):
    return edit(lambda doc: key(doc, alg, state).__setitem__(field, value))


def two_active(doc):
    k = key(doc, "ES256", "next")
    k["state"] = "active"
    k["activated_at"] = k["published_at"]


def two_next(doc):
    k = key(doc, "RS256", "retired")
    k.update(state="next", activated_at=None, retired_at=None, remove_at=None)


def kid_holds_private_key(doc):
    k = key(doc, "ES256", "active")
    k["kid"], k["private_key_pem"] = k["private_key_pem"], k["kid"]


def field_name_holds_private_key(doc):
    # A backtick first made serde's quoting pair up wrongly (found by fuzzing).
    key(doc, "ES256", "next")["`{{ES256.next.private_key_pem}}"] = 1


CASES = {
    "truncated.json": lambda valid: valid[: len(valid) // 2],
    "empty.json": lambda valid: "",
    "not-json.json": lambda valid: "keyroll state, see keyroll status\n",
    "json-array.json": lambda valid: "[" + valid + "]\n",
    "trailing-garbage.json": lambda valid: valid + "}\n",
    "byte-order-mark.json": lambda valid: "\ufeff" + valid,
    "not-utf8.json": lambda valid: valid.replace('"keyset": "default"', '"keyset": "d\udcc9fault"'),
    "schema-version-99.json": edit(lambda doc: doc.__setitem__("schema_version", 99)),
    "schema-version-string.json": edit(lambda doc: doc.__setitem__("schema_version", "1")),
    "no-schema-version.json": edit(lambda doc: doc.pop("schema_version")),
    "other-keyset.json": edit(lambda doc: doc.__setitem__("keyset", "billing")),
    "unknown-field.json": edit(lambda doc: doc.__setitem__("comment", "edited by hand")),
    "keys-not-a-list.json": edit(lambda doc: doc.__setitem__("keys", {})),
    "unknown-state.json": set_field("ES256", "retired", "state", "compromised"),
    "unknown-algorithm.json": set_field("RS256", "next", "alg", "HS256"),
    "bad-timestamp.json": set_field("ES256", "next", "created_at", "yesterday"),
    "two-active-keys.json": edit(two_active),
    "two-next-keys.json": edit(two_next),
    "duplicate-kid.json": set_field("RS256", "next", "kid", "{{ES256.next.kid}}"),
    "active-without-activated-at.json": set_field("RS256", "active", "activated_at", None),
    "retired-without-remove-at.json": set_field("ES256", "retired", "remove_at", None),
    "kid-does-not-match-key.json": set_field("ES256", "active", "kid", "{{ES256.retired.kid}}x"),
    "unparseable-private-key.json": set_field(
        "ES256", "next", "private_key_pem", "{{ES256.next.private_key_pem.truncated}}"),
    "key-of-other-algorithm.json": set_field(
        "RS256", "active", "private_key_pem", "{{ES256.retired.private_key_pem}}"),
    "kid-holds-private-key.json": edit(kid_holds_private_key),
    "field-name-holds-private-key.json": edit(field_name_holds_private_key),
    "audit-unknown-event.json": edit(lambda doc: doc["audit"][0].__setitem__("event", "lost")),
}


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: generate.py PATH/TO/keyroll")
    valid = text(template(real_document(os.path.abspath(sys.argv[1]))))
    with open(os.path.join(HERE, "valid.json"), "w") as f:
        f.write(valid)
    for name, make in CASES.items():
        # surrogateescape writes the lone \udcc9 above as the byte 0xC9.
        with open(os.path.join(HERE, name), "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(make(valid))
    print(f"wrote valid.json and {len(CASES)} tampered documents to {HERE}")


if __name__ == "__main__":
    main()
