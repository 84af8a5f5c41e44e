//! Grouped 2-D convolution, stride 1, same padding ((kh − 1)/2 × (kw − 1)/2 for an odd
//! kh×kw kernel), in f64: im2col then one GEMM per group, or for a 3×3 kernel Winograd's
//! F(2×2, 3×3) ([`winograd`]).

pub mod winograd;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::ops::Range;

use ndarray::Array2;
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};

/// An NCHW batch of f64 images.
#[derive(Debug, Clone, PartialEq)]
pub struct Input {
    /// Batch size.
    pub n: usize,
    /// Channels.
    pub c: usize,
    /// Height.
    pub h: usize,
    /// Width.
    pub w: usize,
    /// `n·c·h·w` values, NCHW order.
    pub data: Vec<f64>,
}

impl Input {
    /// Uniform random values in [-1, 1) from a ChaCha8 stream: the same `seed` and `stream`
    /// always give the same input, whatever order the blocks are processed in.
    pub fn random(n: usize, c: usize, h: usize, w: usize, seed: u64, stream: u64) -> Input {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(stream);
        let data = (0..n * c * h * w)
            .map(|_| {
                // 53 random bits → [0, 1) → [-1, 1)
                let unit = (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
                2.0 * unit - 1.0
            })
            .collect();
        Input { n, c, h, w, data }
    }

    /// Number of output positions `n·h·w` of a stride-1, same-padded conv on this input.
    pub fn positions(&self) -> usize {
        self.n * self.h * self.w
    }

    /// The input as a `[c, n·h·w]` matrix: the im2col of a 1×1 kernel.
    pub fn channels(&self) -> Array2<f64> {
        im2col(self, (1, 1), 1)
    }
}

/// A kernel's `(kh, kw)` and the spacing of its taps: what an im2col matrix is made for.
pub type KernelGeometry = ((usize, usize), usize);

/// The input a block is run on, its im2col matrices by kernel `(kh, kw)` and dilation, and
/// its Winograd transform when a 3×3 kernel is among them.
pub struct BlockInput {
    /// The input.
    pub input: Input,
    cols: BTreeMap<KernelGeometry, Array2<f64>>,
    winograd: Option<winograd::Transformed>,
}

impl BlockInput {
    /// `input`, with the im2col matrices of the `kernels` made ahead (and its F(2×2, 3×3)
    /// transform for a 3×3 one, when it has enough channels to use it).
    pub fn new(input: Input, kernels: &[KernelGeometry]) -> Self {
        let cols = kernels
            .iter()
            .map(|&(k, d)| ((k, d), im2col(&input, k, d)))
            .collect();
        let winograd = (kernels.contains(&((3, 3), 1)) && input.c >= winograd::MIN_DEPTH)
            .then(|| winograd::Transformed::new(&input));
        BlockInput {
            input,
            cols,
            winograd,
        }
    }

    /// The im2col matrix of the input for a kh×kw kernel with dilation `d` (computed on
    /// demand for one not made ahead).
    pub fn cols(&self, k: (usize, usize), d: usize) -> Cow<'_, Array2<f64>> {
        match self.cols.get(&(k, d)) {
            Some(c) => Cow::Borrowed(c),
            None => Cow::Owned(im2col(&self.input, k, d)),
        }
    }

    /// Output channels `rows` of the conv with `weight` (`[rows, in/groups, kh, kw]`, taps
    /// `d` apart) on this input, as [`conv_rows`] gives it: by Winograd for a 3×3 kernel over
    /// at least [`winograd::MIN_DEPTH`] channels per group, else by im2col.
    pub fn conv(
        &self,
        weight: &[f64],
        rows: Range<usize>,
        in_per_group: usize,
        (k, d): KernelGeometry,
        out_per_group: usize,
    ) -> Array2<f64> {
        match &self.winograd {
            Some(t) if (k, d) == ((3, 3), 1) && in_per_group >= winograd::MIN_DEPTH => {
                t.conv(weight, rows, in_per_group, out_per_group)
            }
            _ => conv_rows(
                &self.cols(k, d),
                weight,
                rows,
                in_per_group,
                k,
                out_per_group,
            ),
        }
    }
}

/// The im2col matrix for a kh×kw kernel with taps `d` apart and same padding
/// `p = ((kh − 1)·d/2, (kw − 1)·d/2)`: row `(ch·kh + ky)·kw + kx`, column `(img·h + y)·w + x`
/// holds input `[img, ch, y + ky·d − p.0, x + kx·d − p.1]` (0 outside).
pub fn im2col(x: &Input, (kh, kw): (usize, usize), d: usize) -> Array2<f64> {
    let (n, c, h, w) = (x.n, x.c, x.h, x.w);
    let (py, p) = (kh.saturating_sub(1) * d / 2, kw.saturating_sub(1) * d / 2);
    let mut cols = Array2::<f64>::zeros((c * kh * kw, n * h * w));
    for ch in 0..c {
        for ky in 0..kh {
            for kx in 0..kw {
                let row = (ch * kh + ky) * kw + kx;
                let mut dst = cols.row_mut(row);
                let dst = dst
                    .as_slice_mut()
                    .expect("rows of a fresh array are contiguous");
                for img in 0..n {
                    let plane = &x.data[(img * c + ch) * h * w..(img * c + ch + 1) * h * w];
                    for y in 0..h {
                        let iy = y + ky * d;
                        if iy < py || iy - py >= h {
                            continue;
                        }
                        let src = &plane[(iy - py) * w..(iy - py + 1) * w];
                        let out = &mut dst[(img * h + y) * w..(img * h + y + 1) * w];
                        for (xo, o) in out.iter_mut().enumerate() {
                            let ix = xo + kx * d;
                            if ix >= p && ix - p < w {
                                *o = src[ix - p];
                            }
                        }
                    }
                }
            }
        }
    }
    cols
}

/// Output channels `rows` of a grouped conv: `weight` is `[rows, in/groups, kh, kw]` for
/// those channels, `cols` the im2col of the whole input for this kernel `k = (kh, kw)`,
/// `out_per_group` the output channels of each group. Returns `[rows, n·h·w]`, without bias.
pub fn conv_rows(
    cols: &Array2<f64>,
    weight: &[f64],
    rows: Range<usize>,
    in_per_group: usize,
    (kh, kw): (usize, usize),
    out_per_group: usize,
) -> Array2<f64> {
    let depth = in_per_group * kh * kw;
    let p = cols.ncols();
    let mut out = Array2::<f64>::zeros((rows.len(), p));
    let cols = cols
        .as_slice()
        .expect("im2col matrices are standard-layout arrays");
    let out_slice = out
        .as_slice_mut()
        .expect("a fresh array is standard layout");
    grouped_matmul(weight, cols, out_slice, rows, depth, out_per_group);
    out
}

/// `out = weight · cols` group by group: `weight` holds output channels `rows`, `depth`
/// values each, `cols` the `[groups·depth, p]` matrix of the whole input, `out` `[rows, p]`;
/// each run of rows in one group is one GEMM against that group's slice of `cols`.
pub fn grouped_matmul<T: Element>(
    weight: &[T],
    cols: &[T],
    out: &mut [T],
    rows: Range<usize>,
    depth: usize,
    out_per_group: usize,
) {
    let p = out.len() / rows.len().max(1);
    let mut o = rows.start;
    while o < rows.end {
        // The run of rows that share o's group.
        let g = o / out_per_group.max(1);
        let end = rows.end.min((g + 1) * out_per_group.max(1));
        let (r0, r1) = (o - rows.start, end - rows.start);
        matmul(
            &weight[r0 * depth..r1 * depth],
            &cols[g * depth * p..(g + 1) * depth * p],
            &mut out[r0 * p..r1 * p],
            r1 - r0,
            depth,
            p,
        );
        o = end;
    }
}

/// An element type the GEMM runs in: f64 for the checks, f32 where its precision is plenty
/// (the INT8 error terms) and twice the work per instruction is welcome.
pub trait Element: Copy + 'static {
    /// 0.
    const ZERO: Self;
    /// 1.
    const ONE: Self;
}

impl Element for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
}

impl Element for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
}

/// `c = a · b` for row-major, contiguous `a` (m×k), `b` (k×n) and `c` (m×n).
///
/// The `gemm` crate picks its AVX-512 / AVX2 kernels at run time; it is about twice as fast
/// as matrixmultiply in f64 on AVX-512 machines, which is what makes `--verify` cheap.
pub fn matmul<T: Element>(a: &[T], b: &[T], c: &mut [T], m: usize, k: usize, n: usize) {
    assert!(a.len() == m * k && b.len() == k * n && c.len() == m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        c.fill(T::ZERO);
        return;
    }
    // SAFETY: the three slices hold exactly m×k, k×n and m×n elements (asserted above), the
    // strides below describe contiguous row-major storage within them, and `c` is borrowed
    // mutably so it aliases neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            n as isize,
            T::ZERO,
            T::ONE,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// A whole grouped conv2d with bias: `weight` is `[out, in/groups, k, k]` (square); returns
/// NCHW.
pub fn conv2d(x: &Input, weight: &[f64], bias: Option<&[f64]>, out: usize, groups: usize) -> Input {
    let in_per_group = x.c / groups;
    let k = ((weight.len() / (out * in_per_group)) as f64)
        .sqrt()
        .round() as usize;
    let cols = im2col(x, (k, k), 1);
    let y = conv_rows(&cols, weight, 0..out, in_per_group, (k, k), out / groups);
    let hw = x.h * x.w;
    let mut data = vec![0.0; x.n * out * hw];
    for o in 0..out {
        let b = bias.map_or(0.0, |b| b[o]);
        for img in 0..x.n {
            for i in 0..hw {
                data[(img * out + o) * hw + i] = y[[o, img * hw + i]] + b;
            }
        }
    }
    Input {
        n: x.n,
        c: out,
        h: x.h,
        w: x.w,
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_input_is_reproducible_and_in_range() {
        let a = Input::random(1, 2, 3, 3, 7, 5);
        assert_eq!(a, Input::random(1, 2, 3, 3, 7, 5));
        assert_ne!(a, Input::random(1, 2, 3, 3, 7, 6));
        assert!(a.data.iter().all(|v| (-1.0..1.0).contains(v)));
    }

    /// A kh×kw conv (3×5, then 1×3 with dilation 2) by im2col and GEMM equals the sum over
    /// its taps from the definition, padded by (kh − 1)·d/2 and (kw − 1)·d/2, borders included.
    #[test]
    fn kh_by_kw_conv_is_the_same_padded_definition() {
        let x = Input::random(2, 3, 4, 6, 1, 2);
        for ((kh, kw), d) in [((3, 5), 1), ((1, 3), 2)] {
            let w: Vec<f64> = (0..2 * 3 * kh * kw)
                .map(|i| (i * 13 % 11) as f64 - 5.0)
                .collect();
            let y = conv_rows(&im2col(&x, (kh, kw), d), &w, 0..2, 3, (kh, kw), 2);
            let (py, px) = (((kh - 1) * d / 2) as isize, ((kw - 1) * d / 2) as isize);
            for (img, o, oy, ox) in (0..2).flat_map(|n| {
                (0..2)
                    .flat_map(move |o| (0..4).flat_map(move |y| (0..6).map(move |x| (n, o, y, x))))
            }) {
                let mut want = 0.0;
                for (i, ky, kx) in
                    (0..3).flat_map(|i| (0..kh).flat_map(move |a| (0..kw).map(move |b| (i, a, b))))
                {
                    let iy = oy as isize + (ky * d) as isize - py;
                    let ix = ox as isize + (kx * d) as isize - px;
                    if (0..4).contains(&iy) && (0..6).contains(&ix) {
                        let v = x.data[((img * 3 + i) * 4 + iy as usize) * 6 + ix as usize];
                        want += w[((o * 3 + i) * kh + ky) * kw + kx] * v;
                    }
                }
                let got = y[[o, (img * 4 + oy) * 6 + ox]];
                assert!(
                    (got - want).abs() < 1e-12,
                    "{kh}×{kw} d{d}: {got} vs {want}"
                );
            }
        }
    }
}
