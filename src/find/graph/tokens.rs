//! A `BatchNormalization` on the features of tokens `[…, C]`, the last axis, where a
//! Linear (`MatMul`) reads and writes them: ONNX normalizes axis 1, so exporters put the
//! tokens in that place and back around the BN, and the three (or four) nodes are one
//! per-feature op of a branch ([`GOp::Bn`] with its `around` nodes):
//! - `Transpose(perm [0, 2, 1])`, BN, `Transpose(perm [0, 2, 1])`:
//!   `bn(x.transpose(1, 2)).transpose(1, 2)` on `[B, N, C]`, the BN on `[B, C, N]`'s axis 1;
//! - `Flatten`, BN, `Reshape` to `Shape` of the same tensor: LeViT's
//!   `bn(x.flatten(0, 1)).reshape_as(x)` as TorchScript writes it. The BN's `C` values are
//!   checked against the Linear's features, which are `x`'s last axis; the BN runs only if
//!   the flattened rows hold `C` values, so each row is one token, and the `Reshape` gives
//!   back `x`'s own shape.
//!
//! dynamo writes the `Reshape`s to constant shapes: whether the second gives back the
//! input's shape the graph does not say without shapes, so that form is found and left, with
//! why.

use super::*;

/// Which way round a token BN is written.
enum Around {
    /// `Transpose` both ways.
    Transpose,
    /// `Flatten`, then `Reshape` to the `Shape` node's output.
    Flatten { shape: usize },
    /// `Reshape` to constant shapes both ways (dynamo).
    ConstReshape,
}

impl View<'_> {
    /// The token BN whose last node is `end`, as one step on the first node's input.
    pub(super) fn token_bn_ending(&self, end: &Node) -> Option<Step> {
        let bn_out = end.inputs.first()?;
        let &b = self.producer.get(bn_out.as_str())?;
        let bn_node = self.node(b);
        if !bn_node.is("BatchNormalization") || !self.single_use(bn_out) {
            return None;
        }
        let Kind::Step(mut step) = self.bn(bn_node) else {
            return None;
        };
        // The first node may feed other token BNs (TorchScript shares one `Transpose` among
        // RepViT's two heads): the set's check of every intermediate's readers decides.
        let &f = self.producer.get(step.input.as_str())?;
        let first = self.node(f);
        let x = first.inputs.first().filter(|x| !self.is_const(x))?;
        let around = self.around(first, end, x)?;
        let mut nodes = vec![f, end.index];
        match around {
            Around::Transpose => {}
            Around::Flatten { shape } => nodes.push(shape),
            Around::ConstReshape => {
                step.problem = step.problem.or(Some(format!(
                    "BatchNormalization `{}` runs between Reshapes to constant shapes (`{}`, `{}`): \
                     without the shape of `{x}` the graph does not say that the second gives it back, \
                     so the BN is not known to act on the last axis alone",
                    bn_node.label(),
                    first.label(),
                    end.label()
                )));
            }
        }
        nodes.sort_unstable();
        if let Some(GOp::Bn { around, .. }) = step.op.as_mut() {
            *around = nodes;
        }
        Some(Step {
            node: end.index,
            input: x.clone(),
            ..step
        })
    }

    /// How `first` and `end` put `x`'s tokens around a BN, if they do.
    fn around(&self, first: &Node, end: &Node, x: &str) -> Option<Around> {
        let swap = |n: &Node| n.is("Transpose") && n.ints("perm") == Some(&[0, 2, 1][..]);
        if swap(first) && swap(end) {
            return Some(Around::Transpose);
        }
        // `allowzero` only matters for a 0 in the target: `Shape`'s output holds the
        // tensor's own dims, and a constant target is left anyway.
        if !end.is("Reshape") {
            return None;
        }
        let target = end.inputs.get(1)?;
        if first.is("Flatten") {
            let &s = self.producer.get(target.as_str())?;
            let shape = self.node(s);
            let plain =
                shape.attrs.is_empty() && shape.inputs.first().map(String::as_str) == Some(x);
            return (shape.is("Shape") && plain && self.single_use(target))
                .then_some(Around::Flatten { shape: s });
        }
        let reshaped = first.is("Reshape") && first.inputs.get(1).is_some_and(|t| self.is_const(t));
        (reshaped && self.is_const(target)).then_some(Around::ConstReshape)
    }

    /// The token BN that reads `t` (its first node, and a `Shape` of `t`, being all that
    /// read it), as one step.
    pub(super) fn token_bn_from(&self, t: &str) -> Option<Step> {
        if self.outputs.contains(t) {
            return None;
        }
        let readers = self.consumers_of(t);
        let first = readers.iter().find(|&&c| {
            matches!(
                self.node(c).op_type.as_str(),
                "Transpose" | "Flatten" | "Reshape"
            )
        })?;
        let bn_in = self.node(*first).outputs.first()?;
        let &[b] = self.consumers_of(bn_in) else {
            return None;
        };
        let bn_out = self.node(b).outputs.first()?;
        let &[end] = self.consumers_of(bn_out) else {
            return None;
        };
        let step = self.token_bn_ending(self.node(end))?;
        let inside = match &step.op {
            Some(GOp::Bn { around, .. }) => around.clone(),
            _ => return None,
        };
        (step.input == t && readers.iter().all(|c| inside.contains(c))).then_some(step)
    }

    /// The BN step of BatchNormalization node `bn`: a token BN when it is one's middle.
    pub(super) fn bn_step(&self, bn: usize) -> Option<Step> {
        let out = self.node(bn).outputs.first()?;
        let token = match self.consumers_of(out) {
            &[end] => self.token_bn_ending(self.node(end)),
            _ => None,
        };
        match token {
            Some(s) if matches!(&s.op, Some(GOp::Bn { node, .. }) if *node == bn) => Some(s),
            _ => match self.kind(bn) {
                Kind::Step(s) => Some(s),
                _ => None,
            },
        }
    }
}
