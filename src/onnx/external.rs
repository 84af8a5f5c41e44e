//! External data: tensors whose bytes live in a side file named by the model
//! (`external_data` entries `location`, `offset`, `length`), resolved relative to the model's
//! folder.
//!
//! A `location` is untrusted input: a graph from anywhere could otherwise make the tool read
//! (and copy into its output) any file the user can read. Absolute paths, `..` components and
//! symlinks that resolve outside the model's folder are refused, as is a side file shorter than
//! a tensor's `offset + length`.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Component, Path, PathBuf};

use super::OnnxError;
use super::proto::StringStringEntryProto;

/// A tensor's `external_data` entries, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalRef {
    /// The side file, relative to the model's folder, as written.
    pub location: String,
    /// Where the tensor starts in it (default 0).
    pub offset: u64,
    /// Its length in bytes, if given.
    pub length: Option<u64>,
}

impl ExternalRef {
    /// Parses the entries; `Err` says what is wrong. Keys other than the three (e.g.
    /// `checksum`) are ignored here and kept in the model.
    pub fn parse(entries: &[StringStringEntryProto]) -> Result<ExternalRef, String> {
        let mut location = None;
        let (mut offset, mut length) = (0, None);
        for entry in entries {
            let number = || {
                entry.value().parse::<u64>().map_err(|_| {
                    format!(
                        "external data `{}` is `{}`, not a byte count",
                        entry.key(),
                        entry.value()
                    )
                })
            };
            match entry.key() {
                "location" => location = Some(entry.value().to_string()),
                "offset" => offset = number()?,
                "length" => length = Some(number()?),
                _ => {}
            }
        }
        let location = location.ok_or("external data without a `location`")?;
        Ok(ExternalRef {
            location,
            offset,
            length,
        })
    }
}

/// Why `location` may not be used, looking at its text alone (`None`: it may, if it resolves
/// inside the model's folder).
pub fn refuse_location(location: &str) -> Option<&'static str> {
    let path = Path::new(location);
    if location.is_empty() {
        Some("it is empty")
    } else if location.contains('\0') {
        Some("it contains a NUL byte")
    } else if location.contains('\\') {
        Some("it contains a backslash; locations are relative paths with `/`")
    } else if path.has_root() || path.is_absolute() {
        Some("it is an absolute path; locations must be relative to the model's folder")
    } else if path.components().any(|c| matches!(c, Component::ParentDir)) {
        Some("it has a `..` component; locations must stay inside the model's folder")
    } else {
        None
    }
}

/// The side files of one model, each resolved and measured once.
#[derive(Debug)]
pub(crate) struct SideFiles {
    model: PathBuf,
    /// The model's folder, canonical.
    dir: PathBuf,
    /// location → (canonical path, size).
    files: HashMap<String, (PathBuf, u64)>,
}

impl SideFiles {
    /// The side files of the model at `model` (none resolved yet).
    pub(crate) fn new(model: &Path) -> Result<SideFiles, OnnxError> {
        let dir = match model.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let dir = std::fs::canonicalize(dir).map_err(|source| OnnxError::Io {
            path: model.to_path_buf(),
            what: format!("cannot resolve its folder {}", dir.display()),
            source,
        })?;
        Ok(SideFiles {
            model: model.to_path_buf(),
            dir,
            files: HashMap::new(),
        })
    }

    /// Resolves `ext` for `tensor`, which needs `expected` bytes: the side file's canonical
    /// path and the tensor's (offset, length), after every check.
    pub(crate) fn resolve(
        &mut self,
        tensor: &str,
        ext: &ExternalRef,
        expected: u64,
    ) -> Result<(PathBuf, u64, u64), OnnxError> {
        let (file, len) = self.file(tensor, &ext.location)?;
        let length = ext.length.unwrap_or(expected);
        let short = || OnnxError::SideFileShort {
            path: self.model.clone(),
            tensor: tensor.to_string(),
            file: file.clone(),
            len,
            offset: ext.offset,
            length,
        };
        match ext.offset.checked_add(length) {
            Some(end) if end <= len => Ok((file.clone(), ext.offset, length)),
            _ => Err(short()),
        }
    }

    /// The canonical path and size of the side file at `location`, checked once.
    fn file(&mut self, tensor: &str, location: &str) -> Result<(PathBuf, u64), OnnxError> {
        if let Some(known) = self.files.get(location) {
            return Ok(known.clone());
        }
        let refuse = |why| OnnxError::Location {
            path: self.model.clone(),
            tensor: tensor.to_string(),
            location: location.to_string(),
            why,
        };
        if let Some(why) = refuse_location(location) {
            return Err(refuse(why));
        }
        let joined = self.dir.join(location);
        let missing = |source| OnnxError::SideFileMissing {
            path: self.model.clone(),
            tensor: tensor.to_string(),
            file: joined.clone(),
            source,
        };
        let canonical = std::fs::canonicalize(&joined).map_err(missing)?;
        if !canonical.starts_with(&self.dir) {
            return Err(refuse(
                "it resolves (through a symlink) outside the model's folder",
            ));
        }
        let meta = std::fs::metadata(&canonical).map_err(missing)?;
        if !meta.is_file() {
            return Err(refuse("it is not a regular file"));
        }
        let known = (canonical, meta.len());
        self.files.insert(location.to_string(), known.clone());
        Ok(known)
    }

    /// Every side file resolved so far (canonical paths).
    pub(crate) fn paths(&self) -> Vec<PathBuf> {
        self.files.values().map(|(p, _)| p.clone()).collect()
    }
}

/// Reads `out.len()` bytes of `file` from `offset`.
pub(crate) fn read_at(file: &Path, offset: u64, out: &mut [u8]) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    File::open(file)?.read_exact_at(out, offset)
}

/// Copies `len` bytes of `file` from `offset` to `out`; fails if the file ends first.
pub(crate) fn copy_range(
    file: &Path,
    offset: u64,
    len: u64,
    out: &mut dyn Write,
) -> io::Result<()> {
    let mut f = File::open(file)?;
    f.seek(SeekFrom::Start(offset))?;
    let copied = io::copy(&mut f.take(len), out)?;
    if copied != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("{} ended after {copied} of {len} bytes", file.display()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_that_leave_the_folder_are_refused_by_their_text() {
        assert!(refuse_location("w.data").is_none());
        assert!(refuse_location("sub/w.data").is_none());
        assert!(refuse_location("./w.data").is_none());
        assert!(refuse_location("/etc/passwd").is_some());
        assert!(refuse_location("../w.data").is_some());
        assert!(refuse_location("sub/../../w.data").is_some());
        assert!(refuse_location("sub\\..\\w.data").is_some());
        assert!(refuse_location("").is_some());
        assert!(refuse_location("a\0b").is_some());
    }

    #[test]
    fn entries_parse_with_defaults() {
        let entry = |k: &str, v: &str| StringStringEntryProto {
            key: Some(k.into()),
            value: Some(v.into()),
            ..Default::default()
        };
        let r = ExternalRef::parse(&[entry("location", "a.bin"), entry("checksum", "x")]);
        assert_eq!(
            r,
            Ok(ExternalRef {
                location: "a.bin".into(),
                offset: 0,
                length: None
            })
        );
        let r = ExternalRef::parse(&[entry("location", "a"), entry("offset", "-1")]);
        assert!(r.is_err_and(|e| e.contains("not a byte count")));
        assert!(ExternalRef::parse(&[entry("offset", "4")]).is_err());
    }
}
