//! Whether a candidate merges exactly: every branch's geometry (stride, centred pads,
//! groups, channels) agreeing with one convolution's.

use super::*;

// Whether a candidate merges exactly

/// One branch's geometry.
#[derive(Debug, Clone)]
pub(super) struct Geo {
    /// How messages name the branch.
    pub(super) label: String,
    /// Effective kernel (dilation included).
    pub(super) kernel: (usize, usize),
    pub(super) stride: (usize, usize),
    pub(super) pads: [usize; 4],
    /// (input, output) channels, when a conv or Gemm says.
    pub(super) io: Option<(usize, usize)>,
    pub(super) group: Option<usize>,
    /// `Some(true)` for Gemm/MatMul, `Some(false)` for Conv/AveragePool.
    pub(super) linear: Option<bool>,
}

impl Geo {
    pub(super) fn identity() -> Geo {
        Geo {
            label: "the identity branch".into(),
            kernel: (1, 1),
            stride: (1, 1),
            pads: [0; 4],
            io: None,
            group: None,
            linear: None,
        }
    }
}

/// The merged node's shape.
#[derive(Debug, Clone, Copy)]
pub(super) struct Shape {
    pub(super) kernel: (usize, usize),
    pub(super) stride: (usize, usize),
    pub(super) pads: [usize; 4],
    pub(super) c_in: usize,
    pub(super) c_out: usize,
    pub(super) group: usize,
    pub(super) linear: bool,
}

pub(super) fn eff(kernel: (usize, usize), dilation: (usize, usize)) -> (usize, usize) {
    (
        (kernel.0 - 1) * dilation.0 + 1,
        (kernel.1 - 1) * dilation.1 + 1,
    )
}

impl View<'_> {
    pub(super) fn validate(
        &self,
        joins: &[usize],
        input: &str,
        branches: &[(f64, Vec<Step>)],
        sum_out: &str,
    ) -> Result<BranchSet, Rejected> {
        let mut nodes: BTreeSet<usize> = joins.iter().copied().collect();
        for (_, b) in branches {
            nodes.extend(b.iter().map(|s| s.node));
            for s in b {
                match &s.op {
                    Some(GOp::BorderFill { chain, .. }) => nodes.extend(chain.iter().copied()),
                    Some(GOp::Bn { node, around, .. }) if !around.is_empty() => {
                        nodes.insert(*node);
                        nodes.extend(around.iter().copied());
                    }
                    _ => {}
                }
            }
        }
        let reject = |nodes: &BTreeSet<usize>, reason: String| Rejected {
            nodes: self.labels(&nodes.iter().copied().collect::<Vec<_>>()),
            reason,
        };
        let steps = branches.iter().flat_map(|(_, b)| b);
        if let Some(p) = steps.clone().find_map(|s| s.problem.clone()) {
            return Err(reject(&nodes, p));
        }
        let geos = branches
            .iter()
            .map(|(_, b)| self.geometry(b))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| reject(&nodes, e))?;
        let shape = block_shape(&geos).map_err(|e| reject(&nodes, e))?;
        let has_matmul = steps
            .clone()
            .any(|s| matches!(s.op, Some(GOp::MatMul { .. })));
        for (_, b) in branches {
            self.check_channels(b, &shape, has_matmul)
                .map_err(|e| reject(&nodes, e))?;
        }
        let (post, output) = self.post(sum_out, &shape, has_matmul);
        nodes.extend(post.iter().map(|s| s.node));
        for s in &post {
            if let Some(GOp::Bn { node, around, .. }) = &s.op {
                nodes.insert(*node);
                nodes.extend(around.iter().copied());
            }
        }
        self.check_uses(&nodes, &output)
            .map_err(|e| reject(&nodes, e))?;
        Ok(BranchSet {
            input: input.to_string(),
            output,
            nodes: nodes.into_iter().collect(),
            branches: branches
                .iter()
                .map(|(coef, b)| GBranch {
                    coef: *coef,
                    ops: branch_ops(b),
                })
                .collect(),
            post: post.into_iter().filter_map(|s| s.op).collect(),
            kernel: shape.kernel,
            stride: shape.stride,
            pads: shape.pads,
            group: shape.group,
            in_channels: shape.c_in,
            out_channels: shape.c_out,
            linear: shape.linear,
        })
    }

    /// Per-channel ops after the sum, as long as they fit; and the set's output.
    pub(super) fn post(
        &self,
        sum_out: &str,
        shape: &Shape,
        has_matmul: bool,
    ) -> (Vec<Step>, String) {
        let mut post = Vec::new();
        let mut t = sum_out.to_string();
        loop {
            let token = self.token_bn_from(&t);
            if token.is_none() && !self.single_use(&t) {
                break;
            }
            let c = token
                .as_ref()
                .map_or_else(|| self.consumers_of(&t)[0], |s| s.node);
            let step = match token.map_or_else(|| self.kind(c), Kind::Step) {
                Kind::Step(s) if s.input == t && s.problem.is_none() => s,
                Kind::Pass(_) => Step {
                    node: c,
                    op: None,
                    input: t.clone(),
                    problem: None,
                },
                _ => break,
            };
            let fits = match &step.op {
                None => true,
                Some(GOp::Bn { around, .. }) if has_matmul && around.is_empty() => false,
                Some(op) => {
                    is_per_channel(op)
                        && self
                            .check_per_channel(op, shape.c_out, shape.linear)
                            .is_ok()
                }
            };
            let Some(out) = self.node(c).outputs.first().filter(|_| fits) else {
                break;
            };
            t = out.clone();
            post.push(step);
        }
        (post, t)
    }

    /// Every intermediate tensor is read only inside the set.
    pub(super) fn check_uses(&self, nodes: &BTreeSet<usize>, output: &str) -> Result<(), String> {
        for &i in nodes {
            for t in self
                .node(i)
                .outputs
                .iter()
                .filter(|t| *t != output && !t.is_empty())
            {
                if self.outputs.contains(t.as_str()) {
                    return Err(format!(
                        "`{t}` (output of node `{}`) is also a graph output",
                        self.node(i).label()
                    ));
                }
                if let Some(&o) = self.consumers_of(t).iter().find(|c| !nodes.contains(c)) {
                    return Err(format!(
                        "`{t}` (output of node `{}`) is also read by node `{}`, outside the block",
                        self.node(i).label(),
                        self.node(o).label()
                    ));
                }
            }
        }
        Ok(())
    }

    pub(super) fn dims(&self, t: &str) -> Vec<i64> {
        self.constant(t).map(|c| c.dims.clone()).unwrap_or_default()
    }

    pub(super) fn label(&self, op: &GOp) -> String {
        op_node(op).map_or_else(|| "the identity".into(), |i| self.node(i).label())
    }

    /// The geometry of one branch's chain; `Err` says why the chain is not one conv.
    pub(super) fn geometry(&self, steps: &[Step]) -> Result<Geo, String> {
        let ops: Vec<&GOp> = steps.iter().filter_map(|s| s.op.as_ref()).collect();
        let Some(f) = ops.iter().position(|o| is_source(o)) else {
            return Ok(Geo::identity());
        };
        let src = ops[f];
        let geo = self.source_geo(src)?;
        if let Some(pre) = ops[..f].first() {
            let unpadded = geo.pads == [0; 4] || geo.linear == Some(true);
            if !unpadded {
                return Err(format!(
                    "`{}` comes before `{}`, which pads its input with zeros: the border would not see `{}`'s shift",
                    self.label(pre),
                    geo.label,
                    self.label(pre)
                ));
            }
        }
        let rest = &ops[f + 1..];
        match rest.iter().position(|o| !is_per_channel(o)) {
            None => Ok(geo),
            Some(k) => self.sequence(src, geo, &rest[..k], &rest[k..]),
        }
    }

    pub(super) fn source_geo(&self, op: &GOp) -> Result<Geo, String> {
        let label = self.label(op);
        let conv_like = |kernel, stride, pads, io, group| Geo {
            label: label.clone(),
            kernel,
            stride,
            pads,
            io,
            group,
            linear: Some(false),
        };
        match op {
            GOp::Conv {
                weight,
                kernel,
                stride,
                dilation,
                pads,
                group,
                ..
            } => {
                let d = self.dims(weight);
                let [o, i, _, _] = d.as_slice() else {
                    return Err(format!(
                        "Conv `{label}`'s weight `{weight}` has shape {d:?}; only 2-D convs merge"
                    ));
                };
                let (o, i) = (
                    usize::try_from(*o).unwrap_or(0),
                    usize::try_from(*i).unwrap_or(0),
                );
                if o == 0 || i == 0 || o % group != 0 {
                    return Err(format!(
                        "Conv `{label}`'s weight `{weight}` has shape {d:?}, which does not fit {group} groups"
                    ));
                }
                Ok(conv_like(
                    eff(*kernel, *dilation),
                    *stride,
                    *pads,
                    Some((i * group, o)),
                    Some(*group),
                ))
            }
            GOp::AvgPool {
                kernel,
                stride,
                pads,
                count_include_pad,
                ..
            } => {
                if !count_include_pad && *pads != [0; 4] {
                    return Err(format!(
                        "AveragePool `{label}` leaves the padding out of its mean (count_include_pad=0), so its border is no convolution"
                    ));
                }
                Ok(conv_like(*kernel, *stride, *pads, None, None))
            }
            GOp::Gemm { weight, .. } | GOp::MatMul { weight, .. } => linear_geo(
                &self.dims(weight),
                weight,
                label,
                matches!(op, GOp::Gemm { trans_b: true, .. }),
            ),
            _ => Err(format!("`{label}` is not a source")),
        }
    }
}

/// A Gemm's or MatMul's geometry from its weight's dims `d`.
pub(super) fn linear_geo(
    d: &[i64],
    weight: &str,
    label: String,
    trans_b: bool,
) -> Result<Geo, String> {
    let [a, b] = d else {
        return Err(format!(
            "`{label}`'s weight `{weight}` has shape {d:?}, not 2-D"
        ));
    };
    let (a, b) = (
        usize::try_from(*a).unwrap_or(0),
        usize::try_from(*b).unwrap_or(0),
    );
    Ok(Geo {
        label,
        kernel: (1, 1),
        stride: (1, 1),
        pads: [0; 4],
        io: Some(if trans_b { (b, a) } else { (a, b) }),
        group: Some(1),
        linear: Some(true),
    })
}

pub(super) fn branch_ops(steps: &[Step]) -> Vec<GOp> {
    let ops: Vec<GOp> = steps.iter().filter_map(|s| s.op.clone()).collect();
    if ops.iter().any(is_source) {
        ops
    } else {
        std::iter::once(GOp::Identity).chain(ops).collect()
    }
}

impl View<'_> {
    /// A 1×1 conv, per-channel ops `mid`, then `tail` = (Pad,) Conv or AveragePool, per-channel
    /// ops: DBB's sequence, one conv when the 1×1 is plain and the border comes out right.
    pub(super) fn sequence(
        &self,
        first: &GOp,
        geo: Geo,
        mid: &[&GOp],
        tail: &[&GOp],
    ) -> Result<Geo, String> {
        let plain_1x1 = matches!(first, GOp::Conv { kernel: (1, 1), stride: (1, 1), dilation: (1, 1), pads, .. } if *pads == [0; 4]);
        let (pad, second, after) = match tail {
            [p @ GOp::Pad { .. }, s, after @ ..] => (Some(*p), *s, after),
            [s, after @ ..] => (None, *s, after),
            [] => return Ok(geo),
        };
        if !matches!(second, GOp::Conv { .. } | GOp::AvgPool { .. }) || !plain_1x1 {
            let what = if matches!(second, GOp::Pad { .. }) {
                "Pad"
            } else {
                "op"
            };
            return Err(format!(
                "{what} `{}` follows `{}` in one branch; only a 1×1, stride-1, unpadded conv merges into the conv after it",
                self.label(second),
                geo.label
            ));
        }
        if let Some(op) = after.iter().find(|o| !is_per_channel(o)) {
            return Err(format!(
                "`{}` follows a 1×1 → k×k sequence in one branch",
                self.label(op)
            ));
        }
        let (value, extra) = match pad {
            Some(GOp::Pad { pads, value, .. }) => (*value, hw_pads(pads).ok_or_else(|| {
                format!("Pad `{}` pads {pads:?}: only the height and width of an N×C×H×W tensor, by ≥ 0, merge", self.label(pad.unwrap_or(first)))
            })?),
            _ => (0.0, [0; 4]),
        };
        let mut g2 = self.source_geo(second)?;
        let (c_in, mid_c) = geo.io.unwrap_or((0, 0));
        if let Some((i2, _)) = g2.io.filter(|&(i2, _)| i2 != mid_c) {
            return Err(format!(
                "`{}` reads {i2} channels but `{}` makes {mid_c}",
                g2.label, geo.label
            ));
        }
        if g2.group.is_some_and(|g| Some(g) != geo.group) {
            return Err(format!(
                "`{}` and `{}` have different groups; the sequence merges only with equal groups",
                geo.label, g2.label
            ));
        }
        let pads: [usize; 4] = std::array::from_fn(|k| g2.pads[k] + extra[k]);
        let shift = matches!(first, GOp::Conv { bias: Some(_), .. })
            || mid
                .iter()
                .any(|o| matches!(o, GOp::Bn { .. } | GOp::Add { .. } | GOp::Sub { .. }));
        if pads != [0; 4] && (shift || value != 0.0) {
            return Err(format!(
                "the 1×1 conv `{}` → `{}` sequence pads between the two after a bias or BatchNormalization: \
                 the border holds {value}, not what `{}` makes of zero input, so it is not one convolution",
                geo.label, g2.label, geo.label
            ));
        }
        let out = g2.io.map_or(mid_c, |(_, o)| o);
        g2.io = Some((c_in, out));
        g2.group = geo.group;
        g2.pads = pads;
        Ok(g2)
    }
}

/// `[h_begin, w_begin, h_end, w_end]` from an N×C×H×W Pad's `[n, c, h, w, n, c, h, w]`.
pub(super) fn hw_pads(p: &[i64]) -> Option<[usize; 4]> {
    let [0, 0, hb, wb, 0, 0, he, we] = *p else {
        return None;
    };
    let u = |v: i64| usize::try_from(v).ok();
    Some([u(hb)?, u(wb)?, u(he)?, u(we)?])
}

pub(super) fn dims_text(d: (usize, usize)) -> String {
    format!("{}×{}", d.0, d.1)
}

/// The merged node's shape from the branches', or why they do not add up to one.
pub(super) fn block_shape(geos: &[Geo]) -> Result<Shape, String> {
    let linear = geos.iter().find_map(|g| g.linear).unwrap_or(false);
    if let Some(g) = geos.iter().find(|g| g.linear.is_some_and(|l| l != linear)) {
        return Err(format!(
            "`{}` is a {} but `{}` a {}; they do not merge",
            g.label,
            if linear { "Conv" } else { "Gemm/MatMul" },
            geos.iter()
                .find(|g| g.linear == Some(linear))
                .map_or("", |g| g.label.as_str()),
            if linear { "Gemm/MatMul" } else { "Conv" },
        ));
    }
    let mut strides: BTreeMap<(usize, usize), usize> = BTreeMap::new();
    for g in geos {
        *strides.entry(g.stride).or_default() += 1;
    }
    let stride = strides
        .iter()
        .max_by_key(|(_, n)| **n)
        .map_or((1, 1), |(s, _)| *s);
    if let Some(g) = geos.iter().find(|g| g.stride != stride) {
        return Err(format!(
            "branch through node `{}` has stride {}, the others {}",
            g.label,
            dims_text(g.stride),
            dims_text(stride)
        ));
    }
    let Some(main) = geos.iter().find(|g| g.io.is_some()) else {
        return Err("no branch has a Conv or Gemm, so the channel counts are unknown".into());
    };
    let (c_in, c_out) = main.io.unwrap_or((0, 0));
    for g in geos {
        match g.io {
            Some(io) if io != (c_in, c_out) => {
                return Err(format!(
                    "branch through node `{}` maps {} → {} channels, branch through `{}` {c_in} → {c_out}",
                    g.label, io.0, io.1, main.label
                ));
            }
            None if c_in != c_out => {
                return Err(format!(
                    "{} needs as many input as output channels, but `{}` maps {c_in} → {c_out}",
                    g.label, main.label
                ));
            }
            _ => {}
        }
    }
    let group = main.group.unwrap_or(1);
    if let Some(g) = geos.iter().find(|g| g.group.is_some_and(|x| x != group)) {
        return Err(format!(
            "`{}` has {} groups, `{}` {group}; branches merge only with equal groups",
            g.label,
            g.group.unwrap_or(1),
            main.label
        ));
    }
    let (kernel, pads) = merged_window(geos)?;
    Ok(Shape {
        kernel,
        stride,
        pads,
        c_in,
        c_out,
        group,
        linear,
    })
}

/// The largest kernel and its pads; every branch must sit centred in it.
pub(super) fn merged_window(geos: &[Geo]) -> Result<((usize, usize), [usize; 4]), String> {
    let kernel = (
        geos.iter().map(|g| g.kernel.0).max().unwrap_or(1),
        geos.iter().map(|g| g.kernel.1).max().unwrap_or(1),
    );
    // Per axis (0: height, 1: width), the pads of the branches with the full extent.
    let mut pads = [0usize; 4];
    for axis in 0..2 {
        let full = |g: &&Geo| {
            if axis == 0 {
                g.kernel.0 == kernel.0
            } else {
                g.kernel.1 == kernel.1
            }
        };
        let mut widest = geos.iter().filter(full);
        let Some(first) = widest.next() else { continue };
        let (b, e) = (first.pads[axis], first.pads[axis + 2]);
        if let Some(other) = widest.find(|g| (g.pads[axis], g.pads[axis + 2]) != (b, e)) {
            return Err(format!(
                "branches through `{}` and `{}` have the same {}-tap {} but pad it differently ({:?} and {:?})",
                first.label,
                other.label,
                if axis == 0 { kernel.0 } else { kernel.1 },
                if axis == 0 { "height" } else { "width" },
                first.pads,
                other.pads
            ));
        }
        pads[axis] = b;
        pads[axis + 2] = e;
    }
    for g in geos {
        let off = (kernel.0 - g.kernel.0, kernel.1 - g.kernel.1);
        let centred = off.0 % 2 == 0
            && off.1 % 2 == 0
            && pads[0] >= off.0 / 2
            && pads[2] >= off.0 / 2
            && pads[1] >= off.1 / 2
            && pads[3] >= off.1 / 2
            && g.pads
                == [
                    pads[0] - off.0 / 2,
                    pads[1] - off.1 / 2,
                    pads[2] - off.0 / 2,
                    pads[3] - off.1 / 2,
                ];
        if !centred {
            return Err(format!(
                "branch through node `{}` has a {} kernel with pads {:?}, which does not centre it on the {} kernel with pads {pads:?}",
                g.label,
                dims_text(g.kernel),
                g.pads,
                dims_text(kernel)
            ));
        }
    }
    Ok((kernel, pads))
}
