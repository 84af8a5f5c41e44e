//! `verify`: judging a deploy file made by anyone against its train file.

use std::path::Path;

use super::output::{check_ci, check_not_input, put_in_place};
use super::{
    Outcome, ReportParts, Settings, Train, Written, build_report, set_checked, verify_probe,
    warnings,
};
use crate::Error;
use crate::checkpoint::Checkpoint;
use crate::deviation::Deviation;
use crate::int8;
use crate::progress::Hooks;

/// Judges a deploy file made by anyone against its train file, with the JSON report at
/// `report` (none: the caller has it in [`Outcome::report`]) and the CI files `settings.ci`
/// asks for, all put in place together.
pub fn verify_files(
    train_path: &Path,
    deploy_path: &Path,
    report: Option<&Path>,
    settings: &Settings,
    hooks: Hooks,
) -> Result<Outcome, Error> {
    let mut files = vec![train_path, deploy_path];
    if let Some(path) = report {
        for input in &files {
            check_not_input(input, path, "report path")?;
        }
        files.push(path);
    }
    check_ci(&settings.ci, &files)?;
    let train = Train::open(train_path, settings)?;
    let deploy = Checkpoint::open_with(deploy_path, &settings.read)?;
    let checked = train.check(&deploy, &settings.check, hooks)?;
    let int8 = int8::scan_deploy(&deploy, &train.detection.blocks, hooks.cancel)?;
    let dtype_of = |b: &crate::block::Block| {
        deploy
            .get(&b.deploy_weight)
            .map_or("missing".to_string(), |t| format!("{:?}", t.dtype))
    };
    let devs = (checked.deviations.iter()).map(|d| d.unwrap_or_else(Deviation::unknown));
    let mut blocks = train.block_reports(dtype_of, devs, int8);
    set_checked(&mut blocks, &checked);
    let written = Written {
        tensors: deploy.tensors().len(),
        parameters: deploy.tensors().iter().map(|t| t.numel()).sum(),
        bytes: std::fs::metadata(deploy_path).map_or(0, |m| m.len()),
        nodes: deploy
            .onnx()
            .map(|m| crate::onnx::graph_view(m).nodes.len()),
    };
    let parts = ReportParts {
        command: "verify",
        output: deploy_path.to_path_buf(),
        eps: train.eps.clone(),
        probe: verify_probe(&checked.report),
        blocks,
        verify: Some(checked.report),
        written,
    };
    let mut r = build_report(&train, parts);
    r.warnings.extend(warnings(&deploy));
    put_in_place(&r, Vec::new(), report, &settings.ci)?;
    Ok(Outcome::new(r, report.map(Path::to_path_buf), settings))
}
