//! Where results go: temp files beside their target, renamed into place only at the end, and
//! never over the input.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::Error;
use crate::report::Report;

/// A new temp file in `target`'s folder, removed unless persisted.
pub(crate) fn temp_beside(target: &Path) -> Result<tempfile::NamedTempFile, Error> {
    let dir = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        return Err(Error::Output {
            path: target.to_path_buf(),
            what: format!("its folder {} does not exist", dir.display()),
        });
    }
    let name = target
        .file_name()
        .map_or("out".into(), |n| n.to_string_lossy().into_owned());
    tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        // Like any new file: 0666 less the umask (tempfile's own default is 0600).
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666))
        .tempfile_in(&dir)
        .map_err(Error::write(
            target,
            format!("cannot create a file in {}", dir.display()),
        ))
}

/// `deploy.safetensors` → `deploy.report.json`, in the same folder.
///
/// ```
/// use std::path::Path;
/// use repvgg_fuse::app::default_report_path;
///
/// assert_eq!(
///     default_report_path(Path::new("out/deploy.safetensors")),
///     Path::new("out/deploy.report.json")
/// );
/// assert_eq!(default_report_path(Path::new("model")), Path::new("model.report.json"));
/// ```
pub fn default_report_path(output: &Path) -> PathBuf {
    let stem = output
        .file_stem()
        .map_or("deploy".into(), |s| s.to_string_lossy().into_owned());
    output.with_file_name(format!("{stem}.report.json"))
}

/// Refuses an output that is the input, by any path.
pub(crate) fn check_not_input(input: &Path, output: &Path, what: &str) -> Result<(), Error> {
    if output.is_dir() {
        return Err(Error::Output {
            path: output.to_path_buf(),
            what: format!("the {what} is a directory"),
        });
    }
    if same_file(input, output) {
        return Err(Error::Output {
            path: output.to_path_buf(),
            what: format!(
                "the {what} is the input file {}; it would be overwritten",
                input.display()
            ),
        });
    }
    Ok(())
}

/// Whether `a` and `b` name the same file: the same inode when both exist (any path, symlink
/// or hard link), else the same canonical folder and file name.
pub(crate) fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    if let (Ok(x), Ok(y)) = (std::fs::metadata(a), std::fs::metadata(b)) {
        return x.dev() == y.dev() && x.ino() == y.ino();
    }
    let place = |p: &Path| {
        let dir = match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        Some((std::fs::canonicalize(dir).ok()?, p.file_name()?.to_owned()))
    };
    a == b || matches!((place(a), place(b)), (Some(x), Some(y)) if x == y)
}

/// Writes `report` to `path` atomically (a temp file beside it, renamed into place), refusing
/// a path that is one of `inputs`.
pub fn write_report(report: &Report, path: &Path, inputs: &[&Path]) -> Result<(), Error> {
    for input in inputs {
        check_not_input(input, path, "report path")?;
    }
    persist(report_tmp(report, path)?, path, "the report")
}

/// The report, written to a temp file beside `path`.
pub(crate) fn report_tmp(report: &Report, path: &Path) -> Result<tempfile::NamedTempFile, Error> {
    let mut tmp = temp_beside(path)?;
    let text = serde_json::to_string_pretty(report)
        .map_err(|e| Error::internal(format!("the report does not serialize: {e}")))?;
    tmp.as_file_mut()
        .write_all(format!("{text}\n").as_bytes())
        .map_err(Error::write(path, "cannot write the report"))?;
    Ok(tmp)
}

/// Moves a finished temp file into place at `path`.
pub(crate) fn persist(tmp: tempfile::NamedTempFile, path: &Path, what: &str) -> Result<(), Error> {
    tmp.persist(path)
        .map(drop)
        .map_err(|e| Error::write(path, format!("cannot move {what} into place"))(e.error))
}
