//! JSON that holds private keys, without copies left behind in freed
//! memory. Writing: into one zeroizing buffer of its exact size (a first
//! pass only counts the bytes; the buffer refuses to grow, because a growing
//! `Vec` copies its content and frees the old buffer without wiping it).
//! Reading: a secret string is taken from the input text as it is and
//! unescaped straight into its zeroizing buffer (serde_json would unescape
//! it into a scratch buffer of its own, grown and freed without wiping).

use std::io;

use serde::de::{self, Deserialize, Deserializer, Unexpected};
use serde::Serialize;
use serde_json::value::RawValue;
use zeroize::Zeroizing;

/// Counts what a serializer writes, storing nothing.
struct Count(usize);

impl io::Write for Count {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Appends to a buffer within its capacity, and fails rather than grow it.
struct Exact<'a>(&'a mut Vec<u8>);

impl io::Write for Exact<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.0.capacity() - self.0.len() < buf.len() {
            return Err(io::Error::other("the buffer would grow"));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn write_exact<T, F>(value: &T, write: F) -> Zeroizing<Vec<u8>>
where
    T: Serialize + ?Sized,
    F: Fn(&mut dyn io::Write, &T) -> serde_json::Result<()>,
{
    let mut count = Count(0);
    // Invariant: keyroll serializes only its own types (string map keys,
    // no fallible Serialize impls), and the two passes write the same bytes.
    write(&mut count, value).expect("keyroll's types always serialize");
    let mut bytes = Zeroizing::new(Vec::with_capacity(count.0));
    write(&mut Exact(&mut bytes), value).expect("the second pass writes what the first counted");
    bytes
}

/// Compact JSON (`signing.json`).
pub fn to_vec<T: Serialize + ?Sized>(value: &T) -> Zeroizing<Vec<u8>> {
    write_exact(value, |out, value| serde_json::to_writer(out, value))
}

/// Pretty JSON (the stored keyset document).
pub fn to_string_pretty<T: Serialize + ?Sized>(value: &T) -> Zeroizing<String> {
    let mut bytes = write_exact(value, |out, value| serde_json::to_writer_pretty(out, value));
    // Moves the buffer, no copy; serde_json writes only UTF-8.
    let text = String::from_utf8(std::mem::take(&mut *bytes)).expect("serde_json writes UTF-8");
    Zeroizing::new(text)
}

/// Deserializes a JSON string that holds a secret (a PEM) into a zeroizing
/// buffer, never through serde_json's scratch buffer. Needs a deserializer
/// that borrows from its input (`serde_json::from_str`), as keyroll's
/// document parser is.
pub fn secret_string<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Zeroizing<String>, D::Error> {
    let raw = <&'de RawValue>::deserialize(deserializer)?.get();
    match raw.as_bytes().first() {
        Some(b'"') => unescape(raw).ok_or_else(|| {
            de::Error::invalid_value(Unexpected::Other("string"), &"a string with valid escapes")
        }),
        first => {
            let found = match first {
                Some(b'{') => Unexpected::Map,
                Some(b'[') => Unexpected::Seq,
                Some(b't') => Unexpected::Bool(true),
                Some(b'f') => Unexpected::Bool(false),
                Some(b'n') => Unexpected::Unit,
                _ => Unexpected::Other("number"),
            };
            Err(de::Error::invalid_type(found, &"a string"))
        }
    }
}

/// Decodes the JSON string `raw` (quotes included) into a buffer allocated
/// once, at least as long as the result. `None` for a broken escape.
fn unescape(raw: &str) -> Option<Zeroizing<String>> {
    let inner = raw.strip_prefix('"')?.strip_suffix('"')?;
    let mut out = Zeroizing::new(String::with_capacity(inner.len()));
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        let decoded = match chars.next()? {
            '"' => '"',
            '\\' => '\\',
            '/' => '/',
            'b' => '\u{8}',
            'f' => '\u{c}',
            'n' => '\n',
            'r' => '\r',
            't' => '\t',
            'u' => {
                let first = hex4(&mut chars)?;
                if (0xD800..0xDC00).contains(&first) {
                    // A surrogate pair: the low half must follow at once.
                    if chars.next()? != '\\' || chars.next()? != 'u' {
                        return None;
                    }
                    let second = hex4(&mut chars)?;
                    if !(0xDC00..0xE000).contains(&second) {
                        return None;
                    }
                    char::from_u32(0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00))?
                } else {
                    char::from_u32(first)?
                }
            }
            _ => return None,
        };
        out.push(decoded);
    }
    Some(out)
}

fn hex4(chars: &mut std::str::Chars<'_>) -> Option<u32> {
    (0..4).try_fold(0, |value, _| Some(value * 16 + chars.next()?.to_digit(16)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Secretish {
        pem: String,
        list: Vec<String>,
    }

    #[test]
    fn the_buffer_is_allocated_once_at_its_final_size() {
        // Large enough that a growing Vec would reallocate many times.
        let value = Secretish {
            pem: "x\n".repeat(5000),
            list: (0..300).map(|i| format!("line {i}")).collect(),
        };
        let pretty = to_string_pretty(&value);
        assert_eq!(pretty.capacity(), pretty.len());
        assert_eq!(*pretty, serde_json::to_string_pretty(&value).unwrap());
        let compact = to_vec(&value);
        assert_eq!(compact.capacity(), compact.len());
        assert_eq!(*compact, serde_json::to_vec(&value).unwrap());
    }

    #[derive(serde::Deserialize)]
    struct Holder {
        #[serde(deserialize_with = "secret_string")]
        secret: Zeroizing<String>,
    }

    #[test]
    fn secret_strings_decode_like_serde_json_without_its_buffer() {
        for text in [
            "-----BEGIN PRIVATE KEY-----\nMIGH/+==\n-----END PRIVATE KEY-----\n",
            "quotes \" and \\ and / and \u{8}\u{c}\r\t, é, 😀 and \u{1}",
            "",
        ] {
            let json = serde_json::to_string(&serde_json::json!({ "secret": text })).unwrap();
            let held: Holder = serde_json::from_str(&json).unwrap();
            assert_eq!(*held.secret, text);
            assert!(held.secret.capacity() >= held.secret.len());
        }
        let escaped: Holder =
            serde_json::from_str(r#"{"secret": "\u00e9\/\ud83d\ude00"}"#).unwrap();
        assert_eq!(*escaped.secret, "é/😀");
        for bad in [r#"{"secret": "\ud83d"}"#, r#"{"secret": "\udE00x"}"#] {
            assert!(serde_json::from_str::<Holder>(bad).is_err(), "{bad}");
        }
        let err = serde_json::from_str::<Holder>(r#"{"secret": {"a": 1}}"#)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.starts_with("invalid type: map, expected a string"),
            "{err}"
        );
    }

    #[test]
    fn the_writer_refuses_to_grow_the_buffer() {
        use std::io::Write;
        let mut bytes = Vec::with_capacity(4);
        let mut out = Exact(&mut bytes);
        out.write_all(b"1234").unwrap();
        assert!(out.write_all(b"5").is_err());
        assert_eq!(bytes.capacity(), 4);
    }
}
