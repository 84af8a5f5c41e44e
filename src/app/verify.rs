//! `verify`: judging a deploy file made by anyone against its train file.

use std::path::Path;

use super::output::{check_ci, check_not_input, put_in_place};
use super::{
    Outcome, ReportParts, Settings, Train, Written, add_graph_check, build_report, graph_check,
    set_checked, verify_probe, warnings,
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
    // A graph exported by someone else names its merged weights its own way: it is judged by
    // running both graphs whole, not block by block.
    let ours = train.graph.is_none()
        || (train.detection.blocks.iter()).any(|b| deploy.get(&b.deploy_weight).is_some());
    let mut checked = if ours {
        train.check(&deploy, &settings.check, hooks)?
    } else {
        not_by_blocks(train.detection.blocks.len(), &settings.check)
    };
    let graph = match train.graph {
        Some(_) => graph_check(&train, deploy_path, &settings.check)?,
        None => None,
    };
    let graph = add_graph_check(&mut checked.report, graph);
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
    r.set_graph(graph);
    r.warnings.extend(warnings(&deploy));
    put_in_place(&r, Vec::new(), report, &settings.ci)?;
    Ok(Outcome::new(r, report.map(Path::to_path_buf), settings))
}

/// The verification of a graph whose blocks cannot be found by name: none run (their
/// deviations unknown), nothing failed yet; the whole-graph run decides.
fn not_by_blocks(blocks: usize, opts: &crate::verify::CheckOptions) -> crate::verify::Checked {
    let (atol, rtol) = opts.tolerance(safetensors::Dtype::F32);
    crate::verify::Checked {
        report: crate::report::VerifyReport {
            passed: true,
            atol,
            rtol,
            input_size: opts.input_size.unwrap_or([0, 0]),
            batch: opts.batch,
            seed: opts.seed,
            failures: Vec::new(),
        },
        deviations: vec![None; blocks],
        int8_output: vec![None; blocks],
    }
}
