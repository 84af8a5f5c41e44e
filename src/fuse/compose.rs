//! The branch algebra: each branch's per-channel ops composed into one [`Affine`]
//! (α, β per output channel), and a sequence branch (DBB's 1×1 → k×k) composed into kernel
//! rows. What [`crate::fuse::rows::fuse_rows`] sums.

use std::ops::Range;

use safetensors::Dtype;

use crate::block::values::{ChannelOp, ChannelValues, OrepaValues, Sequence, first_non_finite};
use crate::block::{Block, BlockError, Op};
use crate::fuse::rows::Grid;

/// A composed sequence branch: kernel rows, the bias they carry (`through`), kernel side.
pub type Composed = (Vec<f64>, Vec<f64>, usize);

/// A branch's output per channel: `scale·source(x) + shift`.
#[derive(Debug, Clone, PartialEq)]
pub struct Affine {
    /// α per row.
    pub scale: Vec<f64>,
    /// β per row.
    pub shift: Vec<f64>,
}

impl Affine {
    /// `coef · ops(y)` for `rows` channels: the per-channel ops applied in order, then the
    /// coefficient.
    pub fn chain(rows: usize, ops: &[ChannelOp], coef: f64) -> Affine {
        let mut a = Affine {
            scale: vec![1.0; rows],
            shift: vec![0.0; rows],
        };
        ops.iter().for_each(|op| a.then(op));
        if coef != 1.0 {
            a.times(&vec![coef; rows]);
        }
        a
    }

    /// This affine followed by `post` (the block's post-ops): `post(α·y + β)`, without
    /// `post`'s own shift, which belongs to the block once, not to every branch.
    pub fn then_scaled(&mut self, post: &Affine) {
        self.times(&post.scale);
    }

    /// This affine followed by `op`: `op(α·y + β)`. A BN is `t·y + s` with
    /// `t = γ/√(σ² + ε)`, `s = β − t·μ`, so a conv bias c becomes `t·c + s`.
    fn then(&mut self, op: &ChannelOp) {
        match op {
            ChannelOp::Bias(c) => self.shift.iter_mut().zip(c).for_each(|(b, c)| *b += c),
            ChannelOp::Bn(bn) => {
                let (t, s) = bn.affine();
                self.times(&t);
                self.shift.iter_mut().zip(&s).for_each(|(b, s)| *b += s);
            }
            ChannelOp::Scale(g) => self.times(g),
            ChannelOp::ScaleShift { scale, shift } => {
                self.times(scale);
                self.shift.iter_mut().zip(shift).for_each(|(b, s)| *b += s);
            }
        }
    }

    fn times(&mut self, t: &[f64]) {
        self.scale.iter_mut().zip(t).for_each(|(a, t)| *a *= t);
        self.shift.iter_mut().zip(t).for_each(|(b, t)| *b *= t);
    }
}

impl Sequence {
    /// The first stage's ops as `(scale, shift)` per mid channel; the shift is also what
    /// they make of zero, the value DBB's BNAndPad pads with.
    pub fn affine(&self) -> Affine {
        Affine::chain(self.mid, &self.ops, 1.0)
    }
}

impl ChannelValues {
    /// Per branch, its input BN as an [`Affine`] per *input* channel (the values' loading
    /// refused σ² + ε = 0); a shift that overflows f64 is refused.
    pub fn input_affines(&self, block: &Block) -> Result<Vec<Option<Affine>>, BlockError> {
        let mut out = Vec::with_capacity(self.inputs.len());
        for (bn, branch) in self.inputs.iter().zip(&block.branches) {
            let Some(bn) = bn else {
                out.push(None);
                continue;
            };
            let (t, s) = bn.affine();
            if let Some(i) = s.iter().position(|v| !v.is_finite()) {
                return Err(BlockError::new(
                    &block.name,
                    format!(
                        "branch `{}`: its input BN's shift is {} at channel {i}: the values overflow f64",
                        branch.label, s[i]
                    ),
                ));
            }
            out.push(Some(Affine { scale: t, shift: s }));
        }
        Ok(out)
    }

    /// Each branch's [`Affine`] with the post-ops folded in, and the post-ops' own shift
    /// (`None` without post-ops); composed values that overflow f64 are refused (a BN with
    /// σ² + ε = 0 was refused when the values were loaded).
    pub fn affines(&self, block: &Block) -> Result<(Vec<Affine>, Option<Vec<f64>>), BlockError> {
        let n = self.rows.len();
        let post = (!self.post.is_empty()).then(|| Affine::chain(n, &self.post, 1.0));
        if let Some(p) = &post {
            self.refuse_non_finite(p, block, "the post-ops")?;
        }
        let mut out = Vec::with_capacity(self.branches.len());
        for ((coef, ops), branch) in self.branches.iter().zip(&block.branches) {
            let mut a = Affine::chain(n, ops, *coef);
            if let Some(p) = &post {
                a.then_scaled(p);
            }
            self.refuse_non_finite(&a, block, &branch.label)?;
            out.push(a);
        }
        Ok((out, post.map(|p| p.shift)))
    }

    fn refuse_non_finite(&self, a: &Affine, block: &Block, label: &str) -> Result<(), BlockError> {
        let err = |what: String| Err(BlockError::new(&block.name, what));
        if let Some(r) = a.scale.iter().position(|t| !t.is_finite()) {
            return err(format!(
                "branch `{label}`: its scale is {} at channel {}: the values overflow f64",
                a.scale[r],
                self.rows.start + r
            ));
        }
        if let Some(r) = a.shift.iter().position(|s| !s.is_finite()) {
            return err(format!(
                "branch `{label}`: its bias after BN is {} at channel {}: the values overflow f64",
                a.shift[r],
                self.rows.start + r
            ));
        }
        Ok(())
    }
}

/// A sequence branch's rows as one kernel `[rows, in/groups, side, side]` and the bias its
/// first stage's shift makes through the second (`through`), for output channels `rows`:
/// `K[o, i](u + q) = Σ_m K2[o, m](q)·s[m]·W1[m, i](u)` over the mid channels m of o's group
/// and the taps u of the first kernel (`seq.first_hw`), q of the second (`seq.second_hw`),
/// `through[o] = Σ_m Σ_q K2[o, m](q)·t[m]`. `second` holds the second conv's rows (`[rows,
/// mid/groups, kh, kw]`), or is `None` for an average (mid == out); `side` is the composed
/// kernel's, `kh₁ + kh₂ − 1` (checked square in `Block::new`).
pub fn compose_rows(
    seq: &Sequence,
    mid_affine: &Affine,
    second: Option<&[f64]>,
    side: usize,
    rows: Range<usize>,
    grid: Grid,
) -> (Vec<f64>, Vec<f64>) {
    let (ipg, taps) = (grid.in_per_group, side * side);
    let (first_hw, second_hw) = (seq.first_hw, seq.second_hw);
    let (t1, t2) = (first_hw.0 * first_hw.1, second_hw.0 * second_hw.1);
    let mpg = match second {
        Some(k2) => k2.len() / (rows.len() * t2).max(1),
        None => grid.out_per_group,
    };
    let mut values = vec![0.0; rows.len() * ipg * taps];
    let mut through = vec![0.0; rows.len()];
    let avg = vec![1.0 / t2 as f64; t2];
    for (r, o) in rows.enumerate() {
        let g = o / grid.out_per_group;
        let out = &mut values[r * ipg * taps..(r + 1) * ipg * taps];
        for ml in 0..mpg {
            let k2 = match second {
                Some(k2) => &k2[(r * mpg + ml) * t2..(r * mpg + ml + 1) * t2],
                None if ml == o % mpg => &avg[..],
                None => continue,
            };
            let m = g * mpg + ml;
            let (s, t) = (mid_affine.scale[m], mid_affine.shift[m]);
            through[r] += t * k2.iter().sum::<f64>();
            for i in 0..ipg {
                let w1 = &seq.first[(m * ipg + i) * t1..(m * ipg + i + 1) * t1];
                let dst = &mut out[i * taps..(i + 1) * taps];
                for (u, w1) in w1.iter().enumerate() {
                    let (w, at) = (s * w1, (u / first_hw.1) * side + u % first_hw.1);
                    for (q, k) in k2.iter().enumerate() {
                        dst[at + (q / second_hw.1) * side + q % second_hw.1] += k * w;
                    }
                }
            }
        }
    }
    (values, through)
}

/// A conv `[groups, 1, k, k]` (`kernel`) over each group's h×w patch as the rows `rows` of
/// the FC it equals (RepMLP's conv → FC): `[rows, in/groups]` with h = w = √(in/groups) and
/// `FC[g·hw + y·w + x, yy·w + xx] = K[g, 0, yy − y + k/2, xx − x + k/2]`, 0 where that tap
/// is outside the kernel (the conv's zero padding at the patch border).
pub fn conv_fc_rows(kernel: &[f64], k: usize, rows: Range<usize>, grid: Grid) -> Vec<f64> {
    let hw = grid.in_per_group;
    let side = (1..=hw).find(|s| s * s >= hw).unwrap_or(1);
    let c = (k / 2) as isize;
    let mut out = vec![0.0; rows.len() * hw];
    for (r, o) in rows.enumerate() {
        let (g, pos) = (o / grid.out_per_group.max(1), o % grid.out_per_group.max(1));
        let (y, x) = ((pos / side) as isize, (pos % side) as isize);
        let taps = &kernel[g * k * k..(g + 1) * k * k];
        for (j, dst) in out[r * hw..(r + 1) * hw].iter_mut().enumerate() {
            let (dy, dx) = ((j / side) as isize - y + c, (j % side) as isize - x + c);
            if (0..k as isize).contains(&dy) && (0..k as isize).contains(&dx) {
                *dst = taps[dy as usize * k + dx as usize];
            }
        }
    }
    out
}

/// Branch `b` of `block` composed for output channels `rows`, if it is a sequence:
/// `(kernel rows, through, side)` (see [`compose_rows`]); `raw` holds the second conv's rows
/// as stored (`None` for an average).
pub fn compose_branch(
    values: &ChannelValues,
    block: &Block,
    b: usize,
    raw: Option<(Dtype, &[u8], usize)>,
) -> Result<Option<Composed>, BlockError> {
    if let Some(Some((kernel, k))) = values.conv_fc.get(b) {
        let rows = conv_fc_rows(kernel, *k, values.rows.clone(), Grid::of(block));
        return Ok(Some((rows, vec![0.0; values.rows.len()], 1)));
    }
    if let Some(Some(orepa)) = values.generated.get(b) {
        return orepa_branch(orepa, values.rows.clone(), block).map(Some);
    }
    let (Some(Some(seq)), Some(branch)) = (values.sequences.get(b), block.branches.get(b)) else {
        return Ok(None);
    };
    let mid_affine = seq.affine();
    if let Some(i) = (mid_affine.scale.iter().chain(&mid_affine.shift)).position(|v| !v.is_finite())
    {
        return Err(BlockError::new(
            &block.name,
            format!(
                "branch `{}`: the ops after its first conv are not finite at channel {} (a BN with σ² + ε = 0?)",
                branch.label,
                i % seq.mid.max(1)
            ),
        ));
    }
    // The composed kernel's side (the stages' kernels were read with the sequence).
    let side = seq.first_hw.0 + seq.second_hw.0 - 1;
    let second = match (branch.second(), raw) {
        (Some(Op::ThenAvgPool { .. }), _) => None,
        (_, Some((dtype, bytes, _))) => {
            let w = crate::dtype::decode(dtype, bytes);
            if let Some(i) = first_non_finite(&w) {
                let name = branch.conv_weight().unwrap_or_default();
                return Err(BlockError::new(
                    &block.name,
                    format!(
                        "tensor `{name}` holds {} in the rows read; fusion needs finite values",
                        w[i]
                    ),
                ));
            }
            Some(w)
        }
        _ => return Ok(None),
    };
    let rows = values.rows.clone();
    let (k, through) = compose_rows(
        seq,
        &mid_affine,
        second.as_deref(),
        side,
        rows,
        Grid::of(block),
    );
    Ok(Some((k, through, side)))
}

/// OREPA's kernel for output channels `rows` as a [`Composed`] branch (no bias of its own),
/// refused where the sum overflows f64.
fn orepa_branch(
    v: &OrepaValues,
    rows: Range<usize>,
    block: &Block,
) -> Result<Composed, BlockError> {
    let n = rows.len();
    let k = orepa_rows(v, rows, Grid::of(block));
    if let Some(i) = first_non_finite(&k) {
        return Err(BlockError::new(
            &block.name,
            format!(
                "OREPA's computed kernel is {} at element {i} of the rows: the values overflow f64",
                k[i]
            ),
        ));
    }
    Ok((k, vec![0.0; n], v.k))
}

/// OREPA's `weight_gen()` for output channels `rows`, `[rows, in/groups, k, k]`: per row o
/// (group g, row o' within it), `Σ_j vector[j, o]·K_j[o]` of origin, `avg_conv ⊗ avg_avg`,
/// `pfir_conv ⊗ prior[o]`, `Σ_t conv2[o, t]·first[g·T/G + t]`, the 1×1 at the centre, and
/// `Σ_e dw[(g·I/G + i)·E + e]·pw[o'·G + g, i·E + e]` (upstream's `dwsc2full` interleaving).
pub fn orepa_rows(v: &OrepaValues, rows: Range<usize>, grid: Grid) -> Vec<f64> {
    let (ipg, k, groups) = (grid.in_per_group, v.k, v.groups);
    let (kk, n) = (k * k, rows.len());
    let tpg = v.conv2.len() / (n * kk).max(1);
    let expand = v.dw.len() / (kk * ipg * groups).max(1);
    let centre = (k / 2) * k + k / 2;
    let mut out = vec![0.0; n * ipg * kk];
    for (r, o) in rows.enumerate() {
        let (g, within) = (o / grid.out_per_group, o % grid.out_per_group);
        let vj = |j: usize| v.vector[j][r];
        let pw_row = &v.pw[(within * groups + g) * expand * ipg..][..expand * ipg];
        for i in 0..ipg {
            let ri = r * ipg + i;
            let dst = &mut out[ri * kk..(ri + 1) * kk];
            for (tap, d) in dst.iter_mut().enumerate() {
                let mut seq = 0.0;
                for t in 0..tpg {
                    seq += v.conv2[(r * tpg + t) * kk + tap] * v.first[(g * tpg + t) * ipg + i];
                }
                let mut sep = 0.0;
                for e in 0..expand {
                    sep += v.dw[((g * ipg + i) * expand + e) * kk + tap] * pw_row[i * expand + e];
                }
                *d = vj(0) * v.origin[ri * kk + tap]
                    + vj(1) * v.avg_conv[ri] * v.avg_avg[tap]
                    + vj(2) * v.pfir_conv[ri] * v.prior[r * kk + tap]
                    + vj(3) * seq
                    + if tap == centre {
                        vj(4) * v.one[ri]
                    } else {
                        0.0
                    }
                    + vj(5) * sep;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::values::ChannelOp;

    /// RIFormer's fold (mmpretrain's `fuse_affine`): norm1 = (γ, β), the mixer
    /// `affine(y) − y` with affine (a, c), is γ(a − 1), β(a − 1) + c. With γ = 2, β = 0.5,
    /// a = 3, c = −1: 4 and 0; with γ = −1, β = 2, a = 0.5, c = 0.25: 0.5 and −0.75.
    #[test]
    fn riformer_affine_minus_norm_is_gamma_a_minus_one() {
        let norm = ChannelOp::ScaleShift {
            scale: vec![2.0, -1.0],
            shift: vec![0.5, 2.0],
        };
        let mixer = ChannelOp::ScaleShift {
            scale: vec![3.0, 0.5],
            shift: vec![-1.0, 0.25],
        };
        let main = Affine::chain(2, &[norm.clone(), mixer], 1.0);
        let skip = Affine::chain(2, &[norm], -1.0);
        let sum =
            |a: &[f64], b: &[f64]| -> Vec<f64> { a.iter().zip(b).map(|(x, y)| x + y).collect() };
        assert_eq!(sum(&main.scale, &skip.scale), [4.0, 0.5]);
        assert_eq!(sum(&main.shift, &skip.shift), [0.0, -0.75]);
    }

    /// OREPA with 4 outputs, 2 inputs, 2 groups, a 1×1 kernel: `dwsc2full` gives output
    /// `c·(O/G) + o'` pointwise row `o'·G + c` (upstream's `view(O/G, G, I/G, E)`), and the
    /// grouped `conv2 ∘ first` reads its own group's internal channel.
    #[test]
    fn orepa_separable_rows_interleave_across_groups() {
        let grid = Grid {
            in_per_group: 1,
            k: (1, 1),
            out_per_group: 2,
        };
        let zeros = vec![0.0; 4];
        let mut v = OrepaValues {
            k: 1,
            groups: 2,
            origin: zeros.clone(),
            avg_conv: zeros.clone(),
            avg_avg: vec![1.0],
            pfir_conv: zeros.clone(),
            prior: zeros.clone(),
            one: zeros.clone(),
            first: vec![5.0, 7.0],
            conv2: vec![1.0, 2.0, 3.0, 4.0],
            dw: vec![1.0, 2.0, 3.0, 4.0],
            // Pointwise row r is 10^r in both columns.
            pw: vec![1.0, 1.0, 10.0, 10.0, 100.0, 100.0, 1000.0, 1000.0],
            vector: vec![zeros.clone(); 6],
        };
        v.vector[5] = vec![1.0; 4];
        assert_eq!(orepa_rows(&v, 0..4, grid), [3.0, 300.0, 70.0, 7000.0]);
        v.vector[5] = zeros.clone();
        v.vector[3] = vec![1.0; 4];
        assert_eq!(orepa_rows(&v, 0..4, grid), [5.0, 10.0, 21.0, 28.0]);
    }

    /// A depthwise 1×3 then 3×1 (RepNeXt's stride-2 conv_3_w → conv_3_h) composes into their
    /// outer product, `K[y][x] = h[y]·w[x]`, scaled by what lies between; the shift between
    /// goes through the second conv's taps.
    #[test]
    fn a_row_then_a_column_compose_into_their_outer_product() {
        let seq = Sequence {
            // Two channels, 1×3 each.
            first: vec![1.0, 2.0, 3.0, -1.0, 0.5, 0.0],
            mid: 2,
            ops: vec![
                ChannelOp::Scale(vec![2.0, 1.0]),
                ChannelOp::Bias(vec![0.0, 0.25]),
            ],
            first_hw: (1, 3),
            second_hw: (3, 1),
        };
        let second = [4.0, 5.0, 6.0, 1.0, -2.0, 3.0];
        let grid = Grid {
            in_per_group: 1,
            k: (3, 3),
            out_per_group: 1,
        };
        let (k, through) = compose_rows(&seq, &seq.affine(), Some(&second), 3, 0..2, grid);
        let want: Vec<f64> = (0..2)
            .flat_map(|c| {
                let (w, h, s) = (&seq.first[c * 3..], &second[c * 3..], [2.0, 1.0][c]);
                (0..9).map(move |t| h[t / 3] * s * w[t % 3])
            })
            .collect();
        assert_eq!(k, want);
        assert_eq!(through, vec![0.0, 0.25 * (1.0 - 2.0 + 3.0)]);
    }

    /// A 3×3 conv over a 2×2 patch as an FC: output (y, x) reads input (yy, xx) through tap
    /// (yy − y + 1, xx − x + 1); the second group reads its own kernel.
    #[test]
    fn a_conv_over_a_patch_is_the_fc_of_its_taps() {
        let kernel: Vec<f64> = (0..18).map(f64::from).collect();
        let grid = Grid {
            in_per_group: 4,
            k: (1, 1),
            out_per_group: 4,
        };
        let fc = conv_fc_rows(&kernel, 3, 0..8, grid);
        // Row (0, 0): inputs (0,0) (0,1) (1,0) (1,1) meet taps (1,1) (1,2) (2,1) (2,2).
        assert_eq!(&fc[0..4], &[4.0, 5.0, 7.0, 8.0]);
        // Row (1, 1): taps (0,0) (0,1) (1,0) (1,1).
        assert_eq!(&fc[12..16], &[0.0, 1.0, 3.0, 4.0]);
        // Group 1, row (0, 1): taps (1,0) (1,1) (2,0) (2,1) of the second kernel.
        assert_eq!(&fc[20..24], &[12.0, 13.0, 15.0, 16.0]);
    }

    /// The 1×1 → k×k case (DBB) is what it was: the second kernel times the first's weight.
    #[test]
    fn a_pointwise_then_a_square_conv_scales_the_square_one() {
        let seq = Sequence {
            first: vec![3.0],
            mid: 1,
            ops: Vec::new(),
            first_hw: (1, 1),
            second_hw: (3, 3),
        };
        let second: Vec<f64> = (1..=9).map(f64::from).collect();
        let grid = Grid {
            in_per_group: 1,
            k: (3, 3),
            out_per_group: 1,
        };
        let (k, _) = compose_rows(&seq, &seq.affine(), Some(&second), 3, 0..1, grid);
        assert_eq!(k, second.iter().map(|v| 3.0 * v).collect::<Vec<_>>());
    }
}
