//! Per-channel constants: one value per channel where they act, or a scalar.

use super::*;

impl View<'_> {
    /// Each per-channel op has one value per channel where it acts.
    pub(super) fn check_channels(
        &self,
        steps: &[Step],
        shape: &Shape,
        has_matmul: bool,
    ) -> Result<(), String> {
        let mut c = shape.c_in;
        for op in steps.iter().filter_map(|s| s.op.as_ref()) {
            match op {
                GOp::Conv { weight, .. } => {
                    c = self
                        .dims(weight)
                        .first()
                        .and_then(|&o| usize::try_from(o).ok())
                        .unwrap_or(c);
                }
                GOp::Gemm {
                    weight, trans_b, ..
                } => {
                    let d = self.dims(weight);
                    let o = if *trans_b { d.first() } else { d.get(1) };
                    c = o.and_then(|&o| usize::try_from(o).ok()).unwrap_or(c);
                }
                GOp::MatMul { weight, .. } => {
                    c = self
                        .dims(weight)
                        .get(1)
                        .and_then(|&o| usize::try_from(o).ok())
                        .unwrap_or(c);
                }
                GOp::Bn { node, around, .. } if has_matmul && around.is_empty() => {
                    return Err(format!(
                        "BatchNormalization `{}` normalizes axis 1, which is a MatMul's feature axis only for 2-D tensors, and the graph gives no shapes",
                        self.node(*node).label()
                    ));
                }
                op if is_per_channel(op) => self.check_per_channel(op, c, shape.linear)?,
                _ => {}
            }
        }
        if let Some(GOp::Gemm {
            bias: Some(b),
            node,
            ..
        }) = steps
            .iter()
            .filter_map(|s| s.op.as_ref())
            .find(|o| matches!(o, GOp::Gemm { .. }))
        {
            self.fits_channels(b, shape.c_out, true)
                .map_err(|e| format!("the bias of Gemm `{}`: {e}", self.node(*node).label()))?;
        }
        Ok(())
    }

    pub(super) fn check_per_channel(&self, op: &GOp, c: usize, linear: bool) -> Result<(), String> {
        let label = self.label(op);
        match op {
            GOp::Bn {
                scale,
                bias,
                mean,
                var,
                ..
            } => {
                for t in [scale, bias, mean, var] {
                    let d = self.dims(t);
                    if d != [c as i64] {
                        return Err(format!(
                            "BatchNormalization `{label}`'s `{t}` has shape {d:?}, expected [{c}]"
                        ));
                    }
                }
                Ok(())
            }
            GOp::Mul { tensor, .. }
            | GOp::Add { tensor, .. }
            | GOp::Sub { tensor, .. }
            | GOp::Div { tensor, .. } => {
                let zero = self
                    .constant(tensor)
                    .and_then(|k| k.values.as_ref())
                    .is_some_and(|v| v.contains(&0.0));
                if matches!(op, GOp::Div { .. }) && zero {
                    return Err(format!("Div `{label}` divides by zero"));
                }
                self.fits_channels(tensor, c, linear).map_err(|e| {
                    format!(
                        "{} `{label}`: {e}",
                        self.node(op_node(op).unwrap_or(0)).op_type
                    )
                })
            }
            _ => Ok(()),
        }
    }

    /// A scalar, or one value per channel laid out so that it broadcasts over channels.
    pub(super) fn fits_channels(&self, t: &str, c: usize, linear: bool) -> Result<(), String> {
        let d = self.dims(t);
        let c = c as i64;
        let ok = d.iter().all(|&x| x == 1)
            || if linear {
                d.last() == Some(&c) && d.iter().rev().skip(1).all(|&x| x == 1)
            } else {
                matches!(d.as_slice(), [x, 1, 1] | [1, x, 1, 1] if *x == c)
            };
        if ok {
            Ok(())
        } else if !linear && d == [c] {
            Err(format!(
                "`{t}` has shape [{c}], which broadcasts over the width of an N×C×H×W tensor, not over its channels"
            ))
        } else {
            let want = if linear {
                format!("[{c}]")
            } else {
                format!("[{c},1,1] or [1,{c},1,1]")
            };
            Err(format!(
                "`{t}` has shape {d:?}; one value per channel is {want}, or a scalar"
            ))
        }
    }
}
