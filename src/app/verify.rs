//! `verify`: judging a deploy file made by anyone against its train file.

use std::path::Path;

use super::{
    Outcome, ReportParts, Settings, Written, block_reports, build_report, eps_info, find,
    verify_probe,
};
use crate::Error;
use crate::check::check_deploy;
use crate::checkpoint::Checkpoint;
use crate::deviation::Deviation;
use crate::progress::Hooks;

/// Judges a deploy file made by anyone against its train file.
pub fn verify_files(
    train_path: &Path,
    deploy_path: &Path,
    settings: &Settings,
    hooks: Hooks,
) -> Result<Outcome, Error> {
    let train = Checkpoint::open(train_path)?;
    let deploy = Checkpoint::open(deploy_path)?;
    let detection = find(&train, &settings.find)?;
    let eps = eps_info(&detection, &settings.find);
    let (v, devs) = check_deploy(
        &train,
        &deploy,
        &detection,
        eps.value,
        &settings.check,
        hooks.cancel,
    )?;
    let dtype_of = |b: &crate::block::Block| {
        deploy
            .get(&b.deploy_weight)
            .map_or("missing".to_string(), |t| format!("{:?}", t.dtype))
    };
    let devs = devs
        .into_iter()
        .map(|d| d.unwrap_or_else(Deviation::unknown));
    let blocks = block_reports(&detection, dtype_of, devs);
    let written = Written {
        tensors: deploy.tensors().len(),
        parameters: deploy.tensors().iter().map(|t| t.numel()).sum(),
        bytes: std::fs::metadata(deploy_path).map_or(0, |m| m.len()),
    };
    let parts = ReportParts {
        command: "verify",
        output: deploy_path.to_path_buf(),
        eps,
        probe: verify_probe(&v),
        blocks,
        verify: Some(v),
        written,
    };
    Ok(Outcome {
        report: build_report(&train, &detection, parts),
        report_path: None,
    })
}
