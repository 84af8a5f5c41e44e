//! Protobuf wire-format pieces the streamed writer needs and rust-protobuf does not give:
//! where a field would go in a serialized message, a length-delimited field's header and
//! size, and a writer that counts (and pads) what went through it.

use std::io::{self, Write};

/// Offsets in the side file are multiples of this.
pub(super) const ALIGN: u64 = 64;

/// The offset of the first field numbered above `number` in a serialized message (its end if
/// none): where fields `number` would go to keep field-number order.
pub(super) fn split_before(message: &[u8], number: u64) -> usize {
    let mut at = 0;
    while at < message.len() {
        let Some((tag, n)) = super::varint(&message[at..]) else {
            break;
        };
        if tag >> 3 > number {
            return at;
        }
        let rest = at + n;
        let skip = match tag & 7 {
            0 => super::varint(&message[rest.min(message.len())..]).map_or(0, |(_, n)| n as u64),
            1 => 8,
            2 => super::varint(&message[rest.min(message.len())..])
                .map_or(0, |(len, n)| len.saturating_add(n as u64)),
            5 => 4,
            _ => break,
        };
        at = rest.saturating_add(skip as usize);
    }
    message.len()
}

/// Bytes of a length-delimited field with a one-byte tag and `len` bytes of payload.
pub(super) fn field_size(len: u64) -> u64 {
    1 + varint_size(len) + len
}

pub(super) fn varint_size(v: u64) -> u64 {
    u64::from((64 - v.leading_zeros()).max(1).div_ceil(7))
}

/// A length-delimited field's tag and length (field numbers below 16: one-byte tags).
pub(super) fn write_field_header(w: &mut impl Write, number: u8, len: u64) -> io::Result<()> {
    let mut buf = vec![(number << 3) | 2];
    let mut v = len;
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
    w.write_all(&buf)
}

/// A writer that counts what passes through it.
pub(super) struct Counted<W: Write> {
    /// The writer written to.
    pub(super) inner: W,
    /// Bytes written so far.
    pub(super) count: u64,
}

impl<W: Write> Counted<W> {
    pub(super) fn new(inner: W) -> Self {
        Counted { inner, count: 0 }
    }

    /// Zeros up to byte `at`.
    pub(super) fn pad_to(&mut self, at: u64) -> io::Result<()> {
        let zeros = [0u8; ALIGN as usize];
        while self.count < at {
            let n = (at - self.count).min(ALIGN) as usize;
            self.write_all(&zeros[..n])?;
        }
        Ok(())
    }
}

impl<W: Write> Write for Counted<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_sizes_match_the_encoding() {
        for v in [0u64, 1, 127, 128, 16383, 16384, u32::MAX as u64, u64::MAX] {
            let mut buf = Vec::new();
            write_field_header(&mut buf, 5, v).unwrap();
            assert_eq!(buf.len() as u64 - 1, varint_size(v), "{v}");
        }
    }

    #[test]
    fn split_finds_the_first_later_field() {
        // field 1 varint, field 2 bytes "ab", field 8 varint
        let m = [0x08, 0x01, 0x12, 0x02, b'a', b'b', 0x40, 0x05];
        assert_eq!(split_before(&m, 7), 6);
        assert_eq!(split_before(&m, 1), 2);
        assert_eq!(split_before(&m, 9), m.len());
    }
}
