//! The zip container of `torch.save` (torch ≥ 1.6): its central directory, and where each
//! entry's bytes lie in the file.
//!
//! torch writes every entry *stored* (no compression), so an entry is a byte range of the file
//! and tensors are read from it with positioned reads. A compressed entry is refused rather
//! than inflated: torch never writes one, and inflating is where zip bombs live.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;

/// One stored entry: where its data starts in the file, and its length.
#[derive(Debug, Clone, Copy)]
pub struct Entry {
    /// Offset of the first data byte from the start of the file.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
}

/// The entries of a zip file by name.
#[derive(Debug, Default)]
pub struct Archive {
    /// Entries by full name (`archive/data/0`).
    pub entries: HashMap<String, Entry>,
    /// Names in central-directory order.
    pub names: Vec<String>,
}

const EOCD: u64 = 0x0605_4b50;
const EOCD64: u64 = 0x0606_4b50;
const EOCD64_LOCATOR: u64 = 0x0706_4b50;
const CENTRAL: u64 = 0x0201_4b50;
const LOCAL: u64 = 0x0403_4b50;

fn u16_at(b: &[u8], at: usize) -> u64 {
    u64::from(u16::from_le_bytes([b[at], b[at + 1]]))
}
fn u32_at(b: &[u8], at: usize) -> u64 {
    u64::from(u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes([
        b[at],
        b[at + 1],
        b[at + 2],
        b[at + 3],
        b[at + 4],
        b[at + 5],
        b[at + 6],
        b[at + 7],
    ])
}

fn read_at(file: &File, at: u64, len: usize) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, at)
        .map_err(|e| format!("cannot read {len} bytes at {at}: {e}"))?;
    Ok(buf)
}

/// Finds the central directory (at the end of the file) and reads it.
pub fn read(file: &File, file_len: u64) -> Result<Archive, String> {
    // The end record is 22 bytes plus a comment of up to 64 KiB.
    let tail_len = file_len.min(22 + 65_535);
    let tail = read_at(file, file_len - tail_len, tail_len as usize)?;
    let eocd = (0..tail.len().saturating_sub(21))
        .rev()
        .find(|&i| u32_at(&tail, i) == EOCD)
        .ok_or("no end-of-central-directory record: the zip is torn (truncated?)")?;
    let eocd_pos = file_len - tail_len + eocd as u64;
    let mut count = u16_at(&tail, eocd + 10);
    let mut cd_len = u32_at(&tail, eocd + 12);
    let mut cd_start = u32_at(&tail, eocd + 16);
    if (count == 0xffff || cd_len == 0xffff_ffff || cd_start == 0xffff_ffff) && eocd_pos >= 20 {
        let loc = read_at(file, eocd_pos - 20, 20)?;
        if u32_at(&loc, 0) == EOCD64_LOCATOR {
            let at = u64_at(&loc, 8);
            if at.checked_add(56).is_none_or(|end| end > eocd_pos) {
                return Err(format!(
                    "the zip64 end record at {at} lies past the end record"
                ));
            }
            let rec = read_at(file, at, 56)?;
            if u32_at(&rec, 0) != EOCD64 {
                return Err(format!("no zip64 end record at {at}"));
            }
            count = u64_at(&rec, 32);
            cd_len = u64_at(&rec, 40);
            cd_start = u64_at(&rec, 48);
        }
    }
    if cd_start
        .checked_add(cd_len)
        .is_none_or(|end| end > eocd_pos)
    {
        return Err(format!(
            "the central directory ({cd_len} bytes at {cd_start}) runs past its end record at {eocd_pos}: the zip is torn"
        ));
    }
    // Each central entry is at least 46 bytes: a count beyond that is a lie.
    if count > cd_len / 46 {
        return Err(format!(
            "the zip claims {count} entries in a {cd_len}-byte central directory"
        ));
    }
    let cd = read_at(file, cd_start, cd_len as usize)?;
    let mut archive = Archive::default();
    let mut at = 0usize;
    for _ in 0..count {
        let (name, entry, next) = central_entry(file, file_len, &cd, at)?;
        if archive.entries.insert(name.clone(), entry).is_some() {
            return Err(format!("entry `{name}` appears twice"));
        }
        archive.names.push(name);
        at = next;
    }
    Ok(archive)
}

/// Parses the central entry at `at`; returns its name, data range and the next entry's place.
fn central_entry(
    file: &File,
    file_len: u64,
    cd: &[u8],
    at: usize,
) -> Result<(String, Entry, usize), String> {
    if at + 46 > cd.len() || u32_at(cd, at) != CENTRAL {
        return Err(format!(
            "central directory entry at {at} is malformed: the zip is torn"
        ));
    }
    let method = u16_at(cd, at + 10);
    let mut csize = u32_at(cd, at + 20);
    let mut usize_ = u32_at(cd, at + 24);
    let name_len = u16_at(cd, at + 28) as usize;
    let extra_len = u16_at(cd, at + 30) as usize;
    let comment_len = u16_at(cd, at + 32) as usize;
    let mut local = u32_at(cd, at + 42);
    let next = at + 46 + name_len + extra_len + comment_len;
    if next > cd.len() {
        return Err(format!(
            "central directory entry at {at} runs past the directory"
        ));
    }
    let name = String::from_utf8_lossy(&cd[at + 46..at + 46 + name_len]).into_owned();
    // zip64 sizes and offset, in that order, for the fields that are saturated.
    let mut extra = &cd[at + 46 + name_len..at + 46 + name_len + extra_len];
    while extra.len() >= 4 {
        let id = u16_at(extra, 0);
        let n = (u16_at(extra, 2) as usize).min(extra.len() - 4);
        if id == 1 {
            let mut field = &extra[4..4 + n];
            for v in [&mut usize_, &mut csize, &mut local] {
                if *v == 0xffff_ffff && field.len() >= 8 {
                    *v = u64_at(field, 0);
                    field = &field[8..];
                }
            }
        }
        extra = &extra[4 + n..];
    }
    if method != 0 || csize != usize_ {
        return Err(format!(
            "entry `{name}` is compressed (method {method}); torch.save stores entries uncompressed, and compressed ones are not read (no zip bombs)"
        ));
    }
    if local.checked_add(30).is_none_or(|end| end > file_len) {
        return Err(format!(
            "entry `{name}`: its local header at {local} is past the end of the file"
        ));
    }
    let head = read_at(file, local, 30)?;
    if u32_at(&head, 0) != LOCAL {
        return Err(format!(
            "entry `{name}`: no local header at {local}: the zip is torn"
        ));
    }
    let start = local + 30 + u16_at(&head, 26) + u16_at(&head, 28);
    if start.checked_add(csize).is_none_or(|end| end > file_len) {
        return Err(format!(
            "entry `{name}`: its {csize} bytes at {start} run past the end of the {file_len}-byte file (truncated)"
        ));
    }
    Ok((name, Entry { start, len: csize }, next))
}
