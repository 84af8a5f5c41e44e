//! Where results go. Every file the tool writes — the deploy file, the report, the JUnit file,
//! the job summary — goes through [`write_atomic`]: a temp file beside its target, finished
//! before a run puts any of its files in place ([`commit`]), and never over an input.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::Error;
use crate::onnx::{DataPlacement, GraphEdit, OnnxModel, OutFiles, WriteSummary};
use crate::report::junit::{RunInfo, junit};
use crate::report::{Report, markdown};

/// The files CI systems read besides the exit code and the report.
#[derive(Debug, Clone, Default)]
pub struct CiOutputs {
    /// Write the verification as JUnit XML here.
    pub junit: Option<PathBuf>,
    /// Add the Markdown job summary to the end of this file (`$GITHUB_STEP_SUMMARY`).
    pub job_summary: Option<PathBuf>,
    /// When and where the run started, for the JUnit file.
    pub started: RunStart,
}

/// When and where a run started.
#[derive(Debug, Clone)]
pub struct RunStart {
    /// The start, for the wall time.
    pub instant: Instant,
    /// The start, seconds since the Unix epoch.
    pub epoch_seconds: u64,
    /// The machine's name.
    pub hostname: String,
}

impl RunStart {
    /// Now, on `hostname`.
    pub fn now(hostname: String) -> RunStart {
        RunStart {
            instant: Instant::now(),
            epoch_seconds: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            hostname,
        }
    }

    /// The run so far, for the JUnit file.
    pub fn info(&self) -> RunInfo {
        RunInfo {
            seconds: self.instant.elapsed().as_secs_f64(),
            started: self.epoch_seconds,
            hostname: self.hostname.clone(),
        }
    }
}

impl Default for RunStart {
    fn default() -> Self {
        RunStart::now("localhost".into())
    }
}

/// A finished file in a temp file beside its target: put in place by [`commit`], removed if
/// dropped before.
pub(crate) struct Pending {
    tmp: tempfile::NamedTempFile,
    target: PathBuf,
    what: &'static str,
    /// A model whose side file is put in place before it ([`commit`] renames it last).
    reads_side: bool,
}

impl Pending {
    /// Where the finished file is until it is put in place.
    pub(crate) fn path(&self) -> &Path {
        self.tmp.path()
    }
}

/// The one way the tool writes a file: `write` fills a new temp file beside `target`, which is
/// returned pending (with what `write` returned), so that a run puts its files in place only
/// when all of them are written. `what` names the file in errors ("the report").
pub(crate) fn write_atomic<T>(
    target: &Path,
    what: &'static str,
    write: impl FnOnce(&mut File) -> Result<T, Error>,
) -> Result<(Pending, T), Error> {
    let mut tmp = temp_beside(target)?;
    let value = write(tmp.as_file_mut())?;
    let pending = Pending {
        tmp,
        target: target.to_path_buf(),
        what,
        reads_side: false,
    };
    Ok((pending, value))
}

/// Writes `model` with `edit` applied to `out` (and its side file, for external data) through
/// `write_atomic`, and puts both in place (the side file first, so a model in place always
/// finds its data); on error nothing is left and an existing output is untouched. `fill`
/// writes each new tensor's bytes (see [`OnnxModel::write_deploy`]).
pub fn write_graph(
    model: &OnnxModel,
    edit: &GraphEdit,
    out: &Path,
    placement: DataPlacement,
    fill: &mut dyn FnMut(usize, &mut dyn std::io::Write) -> std::io::Result<()>,
) -> Result<WriteSummary, Error> {
    let (files, summary) = stage_graph(model, edit, out, placement, fill)?;
    commit(files)?;
    Ok(summary)
}

/// Like [`write_graph`], leaving the finished files pending (side file first).
pub(crate) fn stage_graph(
    model: &OnnxModel,
    edit: &GraphEdit,
    out: &Path,
    placement: DataPlacement,
    fill: &mut dyn FnMut(usize, &mut dyn std::io::Write) -> std::io::Result<()>,
) -> Result<(Vec<Pending>, WriteSummary), Error> {
    let Some(side) = model.side_target(out, placement) else {
        let (model_file, summary) = write_atomic(out, "the finished graph", |model_file| {
            let files = OutFiles {
                model: model_file,
                side: None,
            };
            Ok(model.write_deploy(edit, out, files, fill)?)
        })?;
        return Ok((vec![model_file], summary));
    };
    let (side_file, (model_file, summary)) = write_atomic(&side, "the side file", |side_file| {
        write_atomic(out, "the finished graph", |model_file| {
            let files = OutFiles {
                model: model_file,
                side: Some(side_file),
            };
            Ok(model.write_deploy(edit, out, files, fill)?)
        })
    })?;
    let files = if summary.side_bytes > 0 {
        let model_file = Pending {
            reads_side: true,
            ..model_file
        };
        vec![side_file, model_file]
    } else {
        vec![model_file]
    };
    Ok((files, summary))
}

/// The private folder [`readable_graph`] links a pending graph into; removed when dropped.
pub(crate) struct Linked(#[allow(dead_code)] tempfile::TempDir);

/// A path the pending graph `files` (side file first) can be opened at before they are in
/// place: the model's temp file itself, or, with a side file, both hard-linked under their
/// final names into a private folder beside `out` (removed with the returned guard), so that
/// the model's relative `location` finds the new side file, not an old one.
pub(crate) fn readable_graph(
    files: &[Pending],
    out: &Path,
) -> Result<(PathBuf, Option<Linked>), Error> {
    let [side, model] = files else {
        let model = files
            .last()
            .ok_or_else(|| Error::internal("no graph file was written"))?;
        return Ok((model.path().to_path_buf(), None));
    };
    let dir = folder_of(out);
    let linked = tempfile::Builder::new()
        .prefix(".repvgg-fuse-check.")
        .tempdir_in(&dir)
        .map_err(Error::write(
            out,
            "cannot create a folder to check the graph in",
        ))?;
    let name = |p: &Pending| p.target.file_name().map(|n| linked.path().join(n));
    let (Some(model_at), Some(side_at)) = (name(model), name(side)) else {
        return Err(Error::internal("a graph output without a file name"));
    };
    for (from, to) in [(model.path(), &model_at), (side.path(), &side_at)] {
        std::fs::hard_link(from, to)
            .map_err(Error::write(out, "cannot link the graph to check it"))?;
    }
    Ok((model_at, Some(Linked(linked))))
}

/// Puts finished files in place: all of them, or (on an error) none — every rename done so far
/// is undone, each target left as it was.
///
/// The files go in the order given, except that a graph model whose side file comes with it
/// ([`stage_graph`]) is renamed last of all, so that the model appears only when everything
/// it and the run need is in place. An existing model of that name is first moved aside
/// (into the backup folder), so that no reader ever pairs the old model with the new side
/// file between the two renames: in that instant the model is absent, not wrong. Every other
/// existing target is kept as a hard link in a private backup folder beside it
/// (`.repvgg-fuse-commit.*`, removed at the end) while its new file is renamed over it, and
/// restored from there when a later rename fails; a target that did not exist is removed
/// again. (A process killed in the middle leaves that folder with the old files in it.)
pub(crate) fn commit(files: Vec<Pending>) -> Result<(), Error> {
    let (last, mut files): (Vec<Pending>, Vec<Pending>) =
        files.into_iter().partition(|f| f.reads_side);
    let mut undo = Undo::default();
    let result = (|| {
        for model in &last {
            undo.move_aside(&model.target)?;
        }
        files.extend(last);
        for file in files {
            undo.rename(file)?;
        }
        Ok(())
    })();
    match result {
        Ok(()) => Ok(()),
        Err(e) => {
            undo.roll_back();
            Err(e)
        }
    }
}

/// What [`commit`] did so far, to undo it; the backup folders (one per target folder) go when
/// it is dropped.
#[derive(Default)]
struct Undo {
    folders: Vec<(PathBuf, tempfile::TempDir)>,
    /// In the order done: a target and where its old file is (`None`: it had none).
    done: Vec<(PathBuf, Option<PathBuf>)>,
}

impl Undo {
    /// A fresh path in the backup folder beside `target`.
    fn backup_path(&mut self, target: &Path) -> Result<PathBuf, Error> {
        let dir = folder_of(target);
        let n = self.done.len();
        let at = match self.folders.iter().position(|(d, _)| *d == dir) {
            Some(i) => i,
            None => {
                let backup = (tempfile::Builder::new().prefix(".repvgg-fuse-commit."))
                    .tempdir_in(&dir)
                    .map_err(Error::write(
                        target,
                        "cannot make a backup folder beside it",
                    ))?;
                self.folders.push((dir, backup));
                self.folders.len() - 1
            }
        };
        let name = target.file_name().unwrap_or(std::ffi::OsStr::new("out"));
        let mut file = std::ffi::OsString::from(format!("{n}."));
        file.push(name);
        Ok(self.folders[at].1.path().join(file))
    }

    /// Moves an existing file at `target` into the backup folder (nothing if there is none).
    fn move_aside(&mut self, target: &Path) -> Result<(), Error> {
        if !std::fs::symlink_metadata(target).is_ok_and(|m| !m.is_dir()) {
            return Ok(());
        }
        let backup = self.backup_path(target)?;
        std::fs::rename(target, &backup)
            .map_err(Error::write(target, "cannot move the old file aside"))?;
        self.done.push((target.to_path_buf(), Some(backup)));
        Ok(())
    }

    /// Renames `file` over its target, keeping the old one (if any) as a hard link, or a copy
    /// where the file system has no links.
    fn rename(&mut self, file: Pending) -> Result<(), Error> {
        let Pending {
            tmp, target, what, ..
        } = file;
        let old = match std::fs::symlink_metadata(&target) {
            Ok(m) if m.is_file() || m.is_symlink() => {
                let backup = self.backup_path(&target)?;
                (std::fs::hard_link(&target, &backup)
                    .or_else(|_| std::fs::copy(&target, &backup).map(drop)))
                .map_err(Error::write(
                    &target,
                    "cannot keep the old file while replacing it",
                ))?;
                Some(backup)
            }
            _ => None,
        };
        let moved = tmp
            .persist(&target)
            .map(drop)
            .map_err(|e| Error::write(&target, format!("cannot move {what} into place"))(e.error));
        if moved.is_ok() {
            self.done.push((target, old));
        }
        moved
    }

    /// Undoes every step, last first (best effort: the first error is the one reported).
    fn roll_back(&mut self) {
        for (target, old) in self.done.drain(..).rev() {
            let _ = match old {
                Some(backup) => std::fs::rename(&backup, &target),
                None => std::fs::remove_file(&target),
            };
        }
    }
}

/// The folder `path` is in (`.` for a bare file name).
fn folder_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A new temp file in `target`'s folder, removed unless persisted.
fn temp_beside(target: &Path) -> Result<tempfile::NamedTempFile, Error> {
    let dir = folder_of(target);
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

/// Whether `a` and `b` name the same file (one answer for every writer: see
/// [`crate::onnx::write::same_file`]).
pub(crate) use crate::onnx::write::same_file;

/// Refuses a path for `what` (`the JUnit file`) that is a directory, that would overwrite one
/// of `files` (the inputs and the other outputs, by any path), or whose folder does not exist.
/// Called before the run, so that a bad path writes nothing.
pub(crate) fn check_target(path: &Path, what: &str, files: &[&Path]) -> Result<(), Error> {
    let refuse = |what: String| {
        Err(Error::Output {
            path: path.to_path_buf(),
            what,
        })
    };
    if path.is_dir() {
        return refuse(format!("{what} is a directory"));
    }
    if let Some(file) = files.iter().find(|f| same_file(f, path)) {
        return refuse(format!("{what} would overwrite {}", file.display()));
    }
    let dir = folder_of(path);
    if !dir.is_dir() {
        return refuse(format!("its folder {} does not exist", dir.display()));
    }
    Ok(())
}

/// Refuses CI files that [`check_target`] refuses, before the run.
pub(crate) fn check_ci(ci: &CiOutputs, files: &[&Path]) -> Result<(), Error> {
    if let Some(junit) = &ci.junit {
        check_target(junit, "the JUnit file", files)?;
    }
    if let Some(summary) = &ci.job_summary {
        let mut files = files.to_vec();
        files.extend(ci.junit.as_deref());
        check_target(summary, "the job summary", &files)?;
    }
    Ok(())
}

/// The report, as a pending file at `path`.
pub(crate) fn stage_report(report: &Report, path: &Path) -> Result<Pending, Error> {
    stage_json(report, path)
}

/// Any JSON report, as a pending file at `path`.
pub(crate) fn stage_json(report: &impl serde::Serialize, path: &Path) -> Result<Pending, Error> {
    let text = serde_json::to_string_pretty(report)
        .map_err(|e| Error::internal(format!("the report does not serialize: {e}")))?;
    let (pending, ()) = write_atomic(path, "the report", |file| {
        (file.write_all(format!("{text}\n").as_bytes()))
            .map_err(Error::write(path, "cannot write the report"))
    })?;
    Ok(pending)
}

/// The JUnit file and the job summary `ci` asks for, as pending files. The job summary is
/// the file's content so far and the report's Markdown after it (GitHub collects what each
/// step adds).
pub(crate) fn stage_ci(report: &Report, ci: &CiOutputs) -> Result<Vec<Pending>, Error> {
    let mut files = Vec::new();
    if let Some(path) = &ci.junit {
        let xml = junit(report, &ci.started.info());
        files.push(stage_text(path, "the JUnit file", &xml)?);
    }
    if let Some(path) = &ci.job_summary {
        let md = markdown::job_summary(report);
        files.push(stage_appended(path, "the job summary", &md)?);
    }
    Ok(files)
}

/// `text` as a pending file at `path`; `what` names it in errors (`the JUnit file`).
pub(crate) fn stage_text(path: &Path, what: &'static str, text: &str) -> Result<Pending, Error> {
    let (pending, ()) = write_atomic(path, what, |file| {
        (file.write_all(text.as_bytes()))
            .map_err(Error::write(path, format!("cannot write {what}")))
    })?;
    Ok(pending)
}

/// The file at `path` (empty if there is none) with `text` after it, as a pending file: the
/// job summary, to which each step adds.
pub(crate) fn stage_appended(
    path: &Path,
    what: &'static str,
    text: &str,
) -> Result<Pending, Error> {
    let before = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(Error::write(path, format!("cannot read {what}"))(e)),
    };
    let (pending, ()) = write_atomic(path, what, |file| {
        (file
            .write_all(&before)
            .and_then(|()| file.write_all(text.as_bytes())))
        .map_err(Error::write(path, format!("cannot write {what}")))
    })?;
    Ok(pending)
}

/// Puts a run's files in place: `first` (a conversion's deploy file), the report at
/// `report_path`, then the CI files — every one written before any is renamed, so that a
/// failure writing one puts none in place.
pub(crate) fn put_in_place(
    report: &Report,
    first: Vec<Pending>,
    report_path: Option<&Path>,
    ci: &CiOutputs,
) -> Result<(), Error> {
    let mut files = first;
    if let Some(path) = report_path {
        files.push(stage_report(report, path)?);
    }
    files.extend(stage_ci(report, ci)?);
    commit(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pending file at `dir/name` holding `text`.
    fn pending(dir: &Path, name: &str, text: &str) -> Pending {
        let target = dir.join(name);
        let (p, ()) = write_atomic(&target, "the test file", |f| {
            f.write_all(text.as_bytes())
                .map_err(Error::write(&target, "cannot write"))
        })
        .expect("writable");
        p
    }

    /// The side file, a report and the model reading the side file, as `stage_graph` and
    /// `put_in_place` give them to `commit`.
    fn graph_run(dir: &Path) -> Vec<Pending> {
        let side = pending(dir, "deploy.onnx.data", "new data");
        let model = Pending {
            reads_side: true,
            ..pending(dir, "deploy.onnx", "new model")
        };
        vec![
            side,
            model,
            pending(dir, "deploy.report.json", "new report"),
        ]
    }

    fn listing(dir: &Path) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = std::fs::read_dir(dir)
            .expect("readable")
            .map(|e| {
                let e = e.expect("entry");
                let text = std::fs::read_to_string(e.path()).unwrap_or_else(|_| "(dir)".into());
                (e.file_name().to_string_lossy().into_owned(), text)
            })
            .collect();
        out.sort();
        out
    }

    fn old_pair(dir: &Path) {
        std::fs::write(dir.join("deploy.onnx"), "old model").expect("writable");
        std::fs::write(dir.join("deploy.onnx.data"), "old data").expect("writable");
    }

    #[test]
    fn a_graph_pair_replaces_the_old_one_and_leaves_no_backup() {
        let dir = tempfile::tempdir().expect("tempdir");
        old_pair(dir.path());
        commit(graph_run(dir.path())).expect("commits");
        let s = |a: &str, b: &str| (a.to_string(), b.to_string());
        assert_eq!(
            listing(dir.path()),
            [
                s("deploy.onnx", "new model"),
                s("deploy.onnx.data", "new data"),
                s("deploy.report.json", "new report"),
            ]
        );
    }

    #[test]
    fn a_failure_after_the_side_file_is_in_place_restores_the_old_pair() {
        let dir = tempfile::tempdir().expect("tempdir");
        old_pair(dir.path());
        // The report cannot be renamed over a folder that holds a file: the side file is in
        // place by then, and the model (last) not yet.
        std::fs::create_dir(dir.path().join("deploy.report.json")).expect("mkdir");
        std::fs::write(dir.path().join("deploy.report.json/x"), "").expect("writable");
        let err = commit(graph_run(dir.path())).expect_err("the report's rename fails");
        assert!(err.to_string().contains("deploy.report.json"), "{err}");
        let s = |a: &str, b: &str| (a.to_string(), b.to_string());
        assert_eq!(
            listing(dir.path()),
            [
                s("deploy.onnx", "old model"),
                s("deploy.onnx.data", "old data"),
                s("deploy.report.json", "(dir)"),
            ]
        );
    }

    #[test]
    fn a_failed_model_rename_removes_a_side_file_that_was_not_there() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("deploy.onnx")).expect("mkdir");
        std::fs::write(dir.path().join("deploy.onnx/x"), "").expect("writable");
        let err = commit(graph_run(dir.path())).expect_err("the model's rename fails");
        assert!(err.to_string().contains("deploy.onnx"), "{err}");
        let s = |a: &str, b: &str| (a.to_string(), b.to_string());
        assert_eq!(listing(dir.path()), [s("deploy.onnx", "(dir)")]);
    }
}
