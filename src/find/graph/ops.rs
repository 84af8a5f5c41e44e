//! Reading one node as an op of a branch: its kind, its constants, its window (kernel,
//! stride, pads, dilation).

use super::*;

// ---------------------------------------------------------------------------------------
// What each node is

/// ONNX float types: FLOAT, FLOAT16, DOUBLE, BFLOAT16.
pub(super) const FLOAT_TYPES: [i32; 4] = [1, 10, 11, 16];

impl View<'_> {
    pub(super) fn kind(&self, i: usize) -> Kind {
        let n = self.node(i);
        let extra_outputs = n.outputs.iter().skip(1).any(|o| !o.is_empty());
        if !(n.domain.is_empty() || n.domain == "ai.onnx") || n.outputs.is_empty() || extra_outputs
        {
            return Kind::Other;
        }
        match n.op_type.as_str() {
            "Add" | "Sub" | "Mul" | "Div" => self.binary(n),
            "Sum" if n.inputs.len() >= 2 && n.inputs.iter().all(|t| !self.is_const(t)) => {
                Kind::Join(n.inputs.iter().map(|t| (t.clone(), 1.0)).collect())
            }
            "Identity" => match n.inputs.first() {
                Some(t) if !self.is_const(t) => Kind::Pass(t.clone()),
                _ => Kind::Other,
            },
            "BatchNormalization" => self.bn(n),
            "Conv" => self.conv(n),
            "AveragePool" => self.avg_pool(n),
            "Pad" => self.pad(n),
            "Gemm" => self.gemm(n),
            "MatMul" => self.matmul(n),
            "Transpose" | "Reshape" => self.token_bn_ending(n).map_or(Kind::Other, Kind::Step),
            _ => Kind::Other,
        }
    }

    pub(super) fn float_const(&self, t: &str) -> bool {
        self.constant(t)
            .is_some_and(|c| FLOAT_TYPES.contains(&c.data_type))
    }

    pub(super) fn binary(&self, n: &Node) -> Kind {
        let [a, b] = n.inputs.as_slice() else {
            return Kind::Other;
        };
        let (ca, cb) = (self.is_const(a), self.is_const(b));
        let step = |data: &str, tensor: &str, make: fn(usize, String) -> GOp| {
            if !self.float_const(tensor) {
                return Kind::Other;
            }
            Kind::Step(Step {
                node: n.index,
                op: Some(make(n.index, tensor.to_string())),
                input: data.to_string(),
                problem: None,
            })
        };
        match (n.op_type.as_str(), ca, cb) {
            ("Add", false, false) => Kind::Join(vec![(a.clone(), 1.0), (b.clone(), 1.0)]),
            ("Sub", false, false) => Kind::Join(vec![(a.clone(), 1.0), (b.clone(), -1.0)]),
            ("Add", false, true) => step(a, b, |node, tensor| GOp::Add { node, tensor }),
            ("Add", true, false) => step(b, a, |node, tensor| GOp::Add { node, tensor }),
            ("Sub", false, true) => step(a, b, |node, tensor| GOp::Sub { node, tensor }),
            ("Mul", false, true) => step(a, b, |node, tensor| GOp::Mul { node, tensor }),
            ("Mul", true, false) => step(b, a, |node, tensor| GOp::Mul { node, tensor }),
            ("Div", false, true) => step(a, b, |node, tensor| GOp::Div { node, tensor }),
            _ => Kind::Other,
        }
    }

    pub(super) fn bn(&self, n: &Node) -> Kind {
        let [x, scale, bias, mean, var] = n.inputs.as_slice() else {
            return Kind::Other;
        };
        if self.is_const(x) || n.int("training_mode").unwrap_or(0) != 0 {
            return Kind::Other;
        }
        let params = [scale, bias, mean, var];
        let problem = params.iter().find(|t| !self.float_const(t)).map(|t| {
            format!(
                "BatchNormalization `{}` reads `{t}`, which is not a constant",
                n.label()
            )
        });
        Kind::Step(Step {
            node: n.index,
            op: Some(GOp::Bn {
                node: n.index,
                scale: scale.clone(),
                bias: bias.clone(),
                mean: mean.clone(),
                var: var.clone(),
                eps: f64::from(n.float("epsilon").unwrap_or(1e-5)),
                around: Vec::new(),
            }),
            input: x.clone(),
            problem,
        })
    }

    pub(super) fn conv(&self, n: &Node) -> Kind {
        let (Some(x), Some(w)) = (n.inputs.first(), n.inputs.get(1)) else {
            return Kind::Other;
        };
        if self.is_const(x) {
            return Kind::Other;
        }
        let bias = n.inputs.get(2).filter(|b| !b.is_empty()).cloned();
        let mut problem = None;
        if !self.float_const(w) {
            problem = Some(format!(
                "the weight `{w}` of Conv `{}` is computed in the graph, not a constant",
                n.label()
            ));
        } else if bias.as_ref().is_some_and(|b| !self.float_const(b)) {
            problem = Some(format!(
                "the bias of Conv `{}` is computed in the graph, not a constant",
                n.label()
            ));
        }
        let dims = self.constant(w).map(|c| c.dims.clone()).unwrap_or_default();
        let kernel = n
            .ints("kernel_shape")
            .map(<[i64]>::to_vec)
            .unwrap_or_else(|| dims.get(2..).map(<[i64]>::to_vec).unwrap_or_default());
        let geo = window(n, &kernel).and_then(|g| {
            if dims.len() == 4 && dims[2..] != kernel[..] {
                Err(format!(
                    "Conv `{}` says kernel_shape {kernel:?} but its weight `{w}` is {dims:?}",
                    n.label()
                ))
            } else {
                Ok(g)
            }
        });
        let group = positive(n.int("group").unwrap_or(1));
        let (geo, problem) = match (geo, group, problem) {
            (Ok(g), Some(_), None) => (g, None),
            (Ok(g), None, None) => (g, Some(format!("Conv `{}` has group < 1", n.label()))),
            (Ok(g), _, p) => (g, p),
            (Err(e), _, p) => (Window::default(), p.or(Some(e))),
        };
        Kind::Step(Step {
            node: n.index,
            op: Some(GOp::Conv {
                node: n.index,
                weight: w.clone(),
                bias,
                kernel: geo.kernel,
                stride: geo.stride,
                dilation: geo.dilation,
                pads: geo.pads,
                group: group.unwrap_or(1),
            }),
            input: x.clone(),
            problem,
        })
    }

    pub(super) fn avg_pool(&self, n: &Node) -> Kind {
        let Some(x) = n.inputs.first() else {
            return Kind::Other;
        };
        let kernel = n
            .ints("kernel_shape")
            .map(<[i64]>::to_vec)
            .unwrap_or_default();
        let (geo, mut problem) = match window(n, &kernel) {
            Ok(g) => (g, None),
            Err(e) => (Window::default(), Some(e)),
        };
        if n.int("ceil_mode").unwrap_or(0) != 0 {
            problem = Some(format!(
                "AveragePool `{}` rounds its output size up (ceil_mode=1); no convolution does",
                n.label()
            ));
        } else if geo.dilation != (1, 1) {
            problem = Some(format!("AveragePool `{}` is dilated", n.label()));
        }
        Kind::Step(Step {
            node: n.index,
            op: Some(GOp::AvgPool {
                node: n.index,
                kernel: geo.kernel,
                stride: geo.stride,
                pads: geo.pads,
                count_include_pad: n.int("count_include_pad").unwrap_or(0) != 0,
            }),
            input: x.clone(),
            problem,
        })
    }

    pub(super) fn pad(&self, n: &Node) -> Kind {
        let Some(x) = n.inputs.first().filter(|x| !self.is_const(x)) else {
            return Kind::Other;
        };
        let label = n.label();
        let mode = n.string("mode").unwrap_or("constant");
        let from_inputs = n.inputs.get(1).is_some_and(|p| !p.is_empty());
        let values = |t: Option<&String>| {
            t.filter(|t| !t.is_empty())
                .map(|t| self.constant(t).and_then(|c| c.values.clone()))
        };
        let (pads, value) = if from_inputs {
            let pads = values(n.inputs.get(1))
                .flatten()
                .map(|v| v.iter().map(|&p| p as i64).collect::<Vec<_>>());
            let value = match values(n.inputs.get(2)) {
                None => Some(0.0),
                Some(v) => v.and_then(|v| v.first().copied()),
            };
            (pads, value)
        } else {
            let pads = n.ints("pads").map(<[i64]>::to_vec);
            (pads, Some(f64::from(n.float("value").unwrap_or(0.0))))
        };
        let problem = if mode != "constant" {
            Some(format!("Pad `{label}` is in {mode} mode, not constant"))
        } else if n.inputs.get(3).is_some_and(|a| !a.is_empty()) {
            Some(format!("Pad `{label}` pads chosen axes (an `axes` input)"))
        } else if pads.is_none() || value.is_none() {
            Some(format!(
                "Pad `{label}`'s pads or value are computed in the graph"
            ))
        } else {
            None
        };
        Kind::Step(Step {
            node: n.index,
            op: Some(GOp::Pad {
                node: n.index,
                pads: pads.unwrap_or_default(),
                value: value.unwrap_or(0.0),
            }),
            input: x.clone(),
            problem,
        })
    }

    pub(super) fn gemm(&self, n: &Node) -> Kind {
        let (Some(a), Some(b)) = (n.inputs.first(), n.inputs.get(1)) else {
            return Kind::Other;
        };
        if self.is_const(a) || !self.float_const(b) {
            return Kind::Other;
        }
        let bias = n.inputs.get(2).filter(|c| !c.is_empty()).cloned();
        let problem = if n.int("transA").unwrap_or(0) != 0 {
            Some(format!(
                "Gemm `{}` transposes its input (transA=1)",
                n.label()
            ))
        } else if bias.as_ref().is_some_and(|c| !self.float_const(c)) {
            Some(format!(
                "the bias of Gemm `{}` is computed in the graph",
                n.label()
            ))
        } else {
            None
        };
        Kind::Step(Step {
            node: n.index,
            op: Some(GOp::Gemm {
                node: n.index,
                weight: b.clone(),
                bias,
                trans_b: n.int("transB").unwrap_or(0) != 0,
                alpha: f64::from(n.float("alpha").unwrap_or(1.0)),
                beta: f64::from(n.float("beta").unwrap_or(1.0)),
            }),
            input: a.clone(),
            problem,
        })
    }

    pub(super) fn matmul(&self, n: &Node) -> Kind {
        let [a, b] = n.inputs.as_slice() else {
            return Kind::Other;
        };
        if self.is_const(a) || !self.float_const(b) {
            return Kind::Other;
        }
        let rank = self.constant(b).map_or(0, |c| c.dims.len());
        let problem = (rank != 2).then(|| {
            format!(
                "MatMul `{}` multiplies by `{b}`, a {rank}-D constant; only a 2-D weight is a Linear",
                n.label()
            )
        });
        Kind::Step(Step {
            node: n.index,
            op: Some(GOp::MatMul {
                node: n.index,
                weight: b.clone(),
            }),
            input: a.clone(),
            problem,
        })
    }
}

/// Longest data path of a border fill after its `Pad`.
const MAX_FILL: usize = 16;

impl View<'_> {
    /// DBB's BNAndPad border fill ending at `t`, read back through `ScatterND` data inputs
    /// (and dynamo's `Transpose`/`Identity`) to a `Pad`: a step that never merges, with why.
    pub(super) fn border_fill(&self, t: &str) -> Option<Step> {
        let mut chain = Vec::new();
        let mut cur = t;
        loop {
            let &i = self.producer.get(cur)?;
            let n = self.node(i);
            let data = n.inputs.first().filter(|x| !self.is_const(x))?;
            match n.op_type.as_str() {
                "ScatterND" | "Transpose" | "Identity" if chain.len() < MAX_FILL => {}
                "Pad" if chain.iter().any(|&c| self.node(c).is("ScatterND")) => {
                    let reason = self.fill_reason(n, &chain);
                    return Some(Step {
                        node: i,
                        op: Some(GOp::BorderFill { node: i, chain }),
                        input: data.clone(),
                        problem: Some(reason),
                    });
                }
                _ => return None,
            }
            chain.push(i);
            cur = data;
        }
    }

    /// Why a border fill after Pad `pad` is left as it is.
    fn fill_reason(&self, pad: &Node, chain: &[usize]) -> String {
        let scatters: Vec<&Node> = (chain.iter().map(|&i| self.node(i)))
            .filter(|n| n.is("ScatterND"))
            .collect();
        let head = format!(
            "DBB's BNAndPad border fill (Pad `{}` and {} ScatterND)",
            pad.label(),
            scatters.len()
        );
        let computed = scatters
            .iter()
            .any(|n| n.inputs.iter().skip(1).any(|x| !self.is_const(x)));
        if computed {
            return format!(
                "{head} writes values at indices the graph computes (Shape, Range, Where: \
                 TorchScript's export of `output[:, :, 0:p, :] = pad_values`); it is not \
                 matched as a constant border, so this 1×1 → k×k sequence is left as it is"
            );
        }
        match self.fill_gap(pad, &scatters) {
            Some((conv, gap)) if gap > 0.0 => format!(
                "{head} writes per-channel constants that differ by up to {gap:.1e} from what \
                 the 1×1 conv `{conv}` makes of zero input (its bias, into which the exporter \
                 folded the BN): computed apart, they disagree in the last bits, so the \
                 sequence is not exactly one convolution"
            ),
            _ => format!(
                "{head}: a 1×1 → k×k sequence with a filled border is not merged from graphs \
                 (its second conv's own bias has no place in the block model's sequence)"
            ),
        }
    }

    /// The 1×1 conv before the Pad, and the largest difference between its bias and the
    /// values the scatters write for each channel (axis 1 of every update).
    fn fill_gap(&self, pad: &Node, scatters: &[&Node]) -> Option<(String, f64)> {
        let conv = self.node(*self.producer.get(pad.inputs.first()?.as_str())?);
        let bias = conv.inputs.get(2).filter(|_| conv.is("Conv"))?;
        let bias = self.constant(bias)?.values.as_ref()?;
        let mut gap: f64 = 0.0;
        for s in scatters {
            let u = self.constant(s.inputs.get(2)?)?;
            let (values, dims) = (u.values.as_ref()?, &u.dims);
            let c = usize::try_from(*dims.get(1)?).ok()?;
            let inner: usize = dims[2..].iter().map(|&d| d as usize).product();
            if c != bias.len() || inner == 0 {
                return None;
            }
            for (k, v) in values.iter().enumerate() {
                gap = gap.max((v - bias[(k / inner) % c]).abs());
            }
        }
        Some((conv.label(), gap))
    }
}

/// A 2-D window's geometry, auto_pad resolved.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Window {
    pub(super) kernel: (usize, usize),
    pub(super) stride: (usize, usize),
    pub(super) dilation: (usize, usize),
    pub(super) pads: [usize; 4],
}

pub(super) fn positive(v: i64) -> Option<usize> {
    usize::try_from(v).ok().filter(|&v| v > 0)
}

pub(super) fn pair(v: Option<&[i64]>, default: usize) -> Option<(usize, usize)> {
    match v {
        None => Some((default, default)),
        Some([h, w]) => Some((positive(*h)?, positive(*w)?)),
        Some(_) => None,
    }
}

/// Kernel, strides, dilations and pads of a Conv or AveragePool node.
pub(super) fn window(n: &Node, kernel: &[i64]) -> Result<Window, String> {
    let label = n.label();
    let bad = |what: &str| format!("{} `{label}` has {what}; only 2-D windows merge", n.op_type);
    let kernel = pair(Some(kernel), 1).ok_or_else(|| bad(&format!("kernel {kernel:?}")))?;
    let stride =
        pair(n.ints("strides"), 1).ok_or_else(|| bad("strides that are not 2 positive values"))?;
    let dilation = pair(n.ints("dilations"), 1)
        .ok_or_else(|| bad("dilations that are not 2 positive values"))?;
    let eff = (
        (kernel.0 - 1) * dilation.0 + 1,
        (kernel.1 - 1) * dilation.1 + 1,
    );
    let pads = match n.string("auto_pad").unwrap_or("NOTSET") {
        "NOTSET" | "" => match n.ints("pads") {
            None => [0; 4],
            Some(p) => {
                let p: Option<Vec<usize>> = p.iter().map(|&v| usize::try_from(v).ok()).collect();
                match p.as_deref() {
                    Some(&[a, b, c, d]) => [a, b, c, d],
                    _ => return Err(bad("pads that are not 4 values ≥ 0")),
                }
            }
        },
        "VALID" => [0; 4],
        same @ ("SAME_UPPER" | "SAME_LOWER") if stride == (1, 1) => {
            let (th, tw) = (eff.0 - 1, eff.1 - 1);
            let (hs, ws) = if same == "SAME_UPPER" {
                (th / 2, tw / 2)
            } else {
                (th - th / 2, tw - tw / 2)
            };
            [hs, ws, th - hs, tw - ws]
        }
        other => {
            return Err(format!(
                "{} `{label}` has auto_pad {other} with stride {}×{}: its pads depend on the input size",
                n.op_type, stride.0, stride.1
            ));
        }
    };
    Ok(Window {
        kernel,
        stride,
        dilation,
        pads,
    })
}

// ---------------------------------------------------------------------------------------
// From a sum down to its branches

/// A branch as found, before the set's input is settled.
#[derive(Debug, Clone)]
pub(super) struct Raw {
    pub(super) coef: f64,
    /// Linear ops below the leaf, graph order (the deepest first), ending at the leaf.
    pub(super) lower: Vec<Step>,
    /// Per-channel ops between the leaf and the sum (on partial sums), graph order.
    pub(super) upper: Vec<Step>,
    /// The tensor the sum (or a partial sum) reads.
    pub(super) leaf: String,
}

impl Raw {
    /// The tensor the branch reads when cut at `j` (it keeps `lower[j..]`).
    pub(super) fn input_at(&self, j: usize) -> &str {
        self.lower
            .get(j)
            .map_or(self.leaf.as_str(), |s| s.input.as_str())
    }
}

/// A sum and its branches.
#[derive(Debug, Default)]
pub(super) struct Tree {
    /// The sum nodes, the root first.
    pub(super) joins: Vec<usize>,
    /// The sums directly under the root (through per-channel ops only).
    pub(super) children: Vec<usize>,
    pub(super) raws: Vec<Raw>,
}
