//! JSON that holds private keys, written into one zeroizing buffer of its
//! exact size. A first pass only counts the bytes; the second writes into a
//! buffer allocated once, which refuses to grow: a growing `Vec` copies its
//! content and frees the old buffer without wiping it.

use std::io;

use serde::Serialize;
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
