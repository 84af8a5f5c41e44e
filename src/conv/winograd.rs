//! A 3×3 conv, stride 1, padding 1, by Winograd's minimal filtering F(2×2, 3×3) (Lavin and
//! Gray, "Fast Algorithms for Convolutional Neural Networks", 2016): each 2×2 block of
//! outputs from a 4×4 tile of input in 16 multiplications per input channel instead of 36.
//!
//! `Y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A` for a 3×3 kernel `g` and a 4×4 input tile `d`; the 16
//! element-wise products summed over input channels are 16 GEMMs (`[rows, in] · [in, tiles]`).
//! The transforms only add, subtract and halve, so in f64 the result is the direct
//! convolution's to within a few units of its last place: on RepVGG-B3 no block's deviation
//! (of order 1e-7 for an f32 file) moved by more than 1.4e-14.
//!
//! Verification runs its k×k convs, the train branch and the deploy conv alike, through this
//! when the kernel is 3×3: they are 95 % of RepVGG-B3's check, and the GEMM already runs near
//! the core's peak, so fewer multiplications was what was left to gain.

use std::ops::Range;

use ndarray::Array2;

use super::{Input, grouped_matmul};

/// Input channels per group below which the im2col path is used instead: a depthwise conv's
/// GEMMs are one deep, and the transforms would cost more than they save.
pub const MIN_DEPTH: usize = 16;

/// `[d0, d1, d2, d3]` → `Bᵀ d`.
#[inline(always)]
fn bt(d: [f64; 4]) -> [f64; 4] {
    [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]]
}

/// `[m0, m1, m2, m3]` → `Aᵀ m`.
#[inline(always)]
fn at(m: [f64; 4]) -> [f64; 2] {
    [m[0] + m[1] + m[2], m[1] - m[2] - m[3]]
}

/// An input transformed for F(2×2, 3×3): `16 · c` rows of `tiles` values, row `ξ·c + ch`
/// holding element ξ of `Bᵀ d B` for every 4×4 tile `d` of channel `ch` (tile
/// `(img·th + ty)·tw + tx` starts at input row `2·ty − 1`, column `2·tx − 1`; zero outside).
pub struct Transformed {
    c: usize,
    n: usize,
    h: usize,
    w: usize,
    tiles: usize,
    v: Vec<f64>,
}

impl Transformed {
    /// `x` transformed.
    pub fn new(x: &Input) -> Transformed {
        let (n, c, h, w) = (x.n, x.c, x.h, x.w);
        let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
        let tiles = n * th * tw;
        let mut v = vec![0.0; 16 * c * tiles];
        let at_in = |plane: &[f64], y: isize, xx: isize| {
            if (0..h as isize).contains(&y) && (0..w as isize).contains(&xx) {
                plane[y as usize * w + xx as usize]
            } else {
                0.0
            }
        };
        for img in 0..n {
            for ch in 0..c {
                let plane = &x.data[(img * c + ch) * h * w..(img * c + ch + 1) * h * w];
                for ty in 0..th {
                    for tx in 0..tw {
                        let (y0, x0) = (2 * ty as isize - 1, 2 * tx as isize - 1);
                        // Bᵀ on each column of the tile, then on each row of that.
                        let mut cols = [[0.0; 4]; 4];
                        for (b, col) in cols.iter_mut().enumerate() {
                            let xx = x0 + b as isize;
                            *col = bt(std::array::from_fn(|a| at_in(plane, y0 + a as isize, xx)));
                        }
                        let t = (img * th + ty) * tw + tx;
                        for i in 0..4 {
                            let row = bt(std::array::from_fn(|b| cols[b][i]));
                            for (j, value) in row.into_iter().enumerate() {
                                v[((i * 4 + j) * c + ch) * tiles + t] = value;
                            }
                        }
                    }
                }
            }
        }
        Transformed {
            c,
            n,
            h,
            w,
            tiles,
            v,
        }
    }

    /// Output channels `rows` of the conv with `weight` (`[rows, in_per_group, 3, 3]`):
    /// `[rows, n·h·w]`, without bias, as [`super::conv_rows`] gives it.
    pub fn conv(
        &self,
        weight: &[f64],
        rows: Range<usize>,
        in_per_group: usize,
        out_per_group: usize,
    ) -> Array2<f64> {
        let (m, tiles) = (rows.len(), self.tiles);
        let mut out = Array2::<f64>::zeros((m, self.n * self.h * self.w));
        BUFS.with(|bufs| {
            let (u, taps, prod) = &mut *bufs.borrow_mut();
            transform_weight(weight, m, in_per_group, u, taps);
            // The GEMMs overwrite every element: `resize` zeroes only what the buffer grows by.
            prod.resize(16 * m * tiles, 0.0);
            let plane = self.c * tiles;
            for xi in 0..16 {
                grouped_matmul(
                    &u[xi * m * in_per_group..(xi + 1) * m * in_per_group],
                    &self.v[xi * plane..(xi + 1) * plane],
                    &mut prod[xi * m * tiles..(xi + 1) * m * tiles],
                    rows.clone(),
                    in_per_group,
                    out_per_group,
                );
            }
            self.untransform(prod, &mut out);
        });
        out
    }

    /// `Aᵀ M A` of every row's and tile's 4×4 products `prod` (16 planes `[m, tiles]`), put
    /// at the tile's 2×2 outputs of `out` (`[m, n·h·w]`; a tile's outputs past the edge of an
    /// odd side dropped).
    fn untransform(&self, prod: &[f64], out: &mut Array2<f64>) {
        let (h, w, tiles) = (self.h, self.w, self.tiles);
        let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
        let m = out.nrows();
        for (r, mut out_row) in out.rows_mut().into_iter().enumerate() {
            for t in 0..tiles {
                let e = |i: usize, j: usize| prod[((i * 4 + j) * m + r) * tiles + t];
                // Aᵀ on each column of the 4×4 products, then on each row of that.
                let cols: [[f64; 2]; 4] =
                    std::array::from_fn(|j| at(std::array::from_fn(|i| e(i, j))));
                let (img, ty, tx) = (t / (th * tw), t / tw % th, t % tw);
                let ys: [[f64; 2]; 2] =
                    std::array::from_fn(|p| at(std::array::from_fn(|j| cols[j][p])));
                for (p, ys) in ys.into_iter().enumerate() {
                    let y = 2 * ty + p;
                    for (q, value) in ys.into_iter().enumerate() {
                        let xx = 2 * tx + q;
                        if y < h && xx < w {
                            out_row[(img * h + y) * w + xx] = value;
                        }
                    }
                }
            }
        }
    }
}

thread_local! {
    /// Each thread's transformed weights, de-interleaved taps and products, reused chunk
    /// after chunk (fresh ones, 12 MB of U for a B3 chunk, were zeroed only to be overwritten).
    static BUFS: std::cell::RefCell<(Vec<f64>, Vec<f64>, Vec<f64>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

/// `u` = `G g Gᵀ` for every row and input channel of `weight` (`[m, depth, 3, 3]`): 16
/// planes `[m, depth]`, plane ξ = `4·i + j` holding element (i, j). Each row's kernels are
/// first split into their 9 taps (`taps`, `[9, depth]`), so that the transform runs along
/// the input channels, contiguous, and vectorizes.
fn transform_weight(weight: &[f64], m: usize, depth: usize, u: &mut Vec<f64>, taps: &mut Vec<f64>) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has the feature the function is compiled for (checked above).
        return unsafe { transform_weight_avx2(weight, m, depth, u, taps) };
    }
    transform_weight_any(weight, m, depth, u, taps);
}

/// [`transform_weight`] compiled for AVX2 (the same arithmetic, four lanes at a time).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn transform_weight_avx2(
    weight: &[f64],
    m: usize,
    depth: usize,
    u: &mut Vec<f64>,
    taps: &mut Vec<f64>,
) {
    transform_weight_any(weight, m, depth, u, taps);
}

#[inline(always)]
fn transform_weight_any(
    weight: &[f64],
    m: usize,
    depth: usize,
    u: &mut Vec<f64>,
    taps: &mut Vec<f64>,
) {
    let depth1 = depth.max(1);
    u.resize(16 * m * depth, 0.0);
    taps.resize(9 * depth, 0.0);
    let mut planes: Vec<&mut [f64]> = u.chunks_exact_mut((m * depth).max(1)).collect();
    for (r, kernels) in weight.chunks_exact(9 * depth1).enumerate().take(m) {
        for (ci, k) in kernels.chunks_exact(9).enumerate() {
            for (tap, &v) in k.iter().enumerate() {
                taps[tap * depth + ci] = v;
            }
        }
        let t: Vec<&[f64]> = taps.chunks_exact(depth1).collect();
        let span = r * depth..(r + 1) * depth;
        let mut out: Vec<&mut [f64]> = planes.iter_mut().map(|p| &mut p[span.clone()]).collect();
        let (Ok(t), Ok(out)) = (
            <&[&[f64]; 9]>::try_from(t.as_slice()),
            <&mut [&mut [f64]; 16]>::try_from(out.as_mut_slice()),
        ) else {
            return;
        };
        transform_taps(t, out);
    }
}

/// G's rows, as the coefficients of the three values they combine.
const G: [[f64; 3]; 4] = [
    [1.0, 0.0, 0.0],
    [0.5, 0.5, 0.5],
    [0.5, -0.5, 0.5],
    [0.0, 0.0, 1.0],
];

/// `G g Gᵀ` for kernels given as their 9 taps, each a plane over the input channels; into
/// the 16 planes of the result.
#[inline(always)]
fn transform_taps(t: &[&[f64]; 9], out: &mut [&mut [f64]; 16]) {
    let n = t[0].len();
    if t.iter().any(|p| p.len() != n) || out.iter().any(|p| p.len() != n) {
        return;
    }
    let [t0, t1, t2, t3, t4, t5, t6, t7, t8] = *t;
    for (i, four) in out.chunks_exact_mut(4).enumerate() {
        let [u0, u1, u2, u3] = four else {
            return;
        };
        let (u0, u1, u2, u3) = (&mut u0[..n], &mut u1[..n], &mut u2[..n], &mut u3[..n]);
        // Row i of G g, down each of the kernel's three columns; then that row times Gᵀ.
        let [a, b, c] = G[i];
        for ci in 0..n {
            let c0 = a * t0[ci] + b * t3[ci] + c * t6[ci];
            let c1 = a * t1[ci] + b * t4[ci] + c * t7[ci];
            let c2 = a * t2[ci] + b * t5[ci] + c * t8[ci];
            u0[ci] = c0;
            u1[ci] = 0.5 * (c0 + c1 + c2);
            u2[ci] = 0.5 * (c0 - c1 + c2);
            u3[ci] = c2;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{conv_rows, im2col};
    use super::*;

    /// F(2×2, 3×3) gives the direct conv (im2col and GEMM) to within rounding: odd and even
    /// sides (a last tile half outside), a batch of two, grouped rows, a chunk of rows that
    /// does not start at 0.
    #[test]
    fn winograd_equals_the_direct_3x3_conv() {
        for (n, c, h, w, groups, rows) in [
            (1, 16, 4, 4, 1, 0..5),
            (2, 32, 7, 5, 2, 3..11),
            (1, 17, 1, 3, 1, 0..2),
            (1, 64, 16, 16, 4, 6..30),
        ] {
            let x = Input::random(n, c, h, w, 3, 1);
            let (ipg, out): (usize, usize) = (c / groups, rows.end);
            let opg = out.div_ceil(groups);
            let weight: Vec<f64> = Input::random(1, rows.len() * ipg * 9, 1, 1, 4, 2).data;
            let direct = conv_rows(
                &im2col(&x, (3, 3), 1),
                &weight,
                rows.clone(),
                ipg,
                (3, 3),
                opg,
            );
            let fast = Transformed::new(&x).conv(&weight, rows.clone(), ipg, opg);
            assert_eq!(fast.dim(), direct.dim());
            let scale = direct.iter().fold(0.0f64, |a, v| a.max(v.abs()));
            let off = (&fast - &direct).iter().fold(0.0f64, |a, v| a.max(v.abs()));
            assert!(
                off <= 1e-13 * scale,
                "{n}×{c}×{h}×{w} g{groups}: off by {off:e} of {scale}"
            );
            assert!(scale > 0.1, "a conv that computed nothing");
        }
        // No rows: an empty output, not a chunk size of zero.
        let x = Input::random(1, 16, 4, 4, 3, 1);
        assert_eq!(Transformed::new(&x).conv(&[], 0..0, 16, 16).dim(), (0, 16));
    }
}
