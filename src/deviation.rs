//! How far a fused output is from the unfused one: the figure every check reports.

use ndarray::{Array2, Zip};
use serde::Serialize;

/// How far the fused output is from the unfused one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Deviation {
    /// max |fused − unfused| over every output element.
    pub max_abs: f64,
    /// `max_abs / max |unfused|` (0 when the unfused output is all zero).
    pub max_rel: f64,
    /// max |unfused|: the scale the relative deviation is taken against.
    pub max_abs_output: f64,
    /// Where |fused − unfused| is largest (none when they agree everywhere).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worst: Option<WorstElement>,
}

/// The output element where fused and unfused differ most.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct WorstElement {
    /// Image of the batch.
    pub image: usize,
    /// Output channel.
    pub channel: usize,
    /// Row.
    pub y: usize,
    /// Column.
    pub x: usize,
    /// The unfused output there.
    pub unfused: f64,
    /// The fused output there.
    pub fused: f64,
}

impl Deviation {
    /// The deviation given max |fused − unfused| and max |unfused|.
    pub fn of(max_abs: f64, max_abs_output: f64) -> Deviation {
        Deviation {
            max_abs,
            max_rel: relative(max_abs, max_abs_output),
            max_abs_output,
            worst: None,
        }
    }

    /// The deviation over the union of two sets of outputs.
    pub fn merge(self, other: Deviation) -> Deviation {
        let max_abs = nan_max(self.max_abs, other.max_abs);
        let max_abs_output = nan_max(self.max_abs_output, other.max_abs_output);
        Deviation {
            max_abs,
            max_rel: relative(max_abs, max_abs_output),
            max_abs_output,
            worst: if worse(other.max_abs, self.max_abs) {
                other.worst
            } else {
                self.worst
            },
        }
    }

    /// Whether the deviation is within `atol + rtol · max|unfused|`.
    pub fn within(&self, atol: f64, rtol: f64) -> bool {
        // Written so that NaN fails.
        self.max_abs <= atol + rtol * self.max_abs_output
    }
}

/// `max` that keeps a NaN instead of dropping it: a NaN deviation must fail, not vanish.
fn nan_max(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

/// Whether `a` is a worse deviation than `b` (a first NaN is the worst of all).
fn worse(a: f64, b: f64) -> bool {
    a > b || (a.is_nan() && !b.is_nan())
}

fn relative(abs: f64, scale: f64) -> f64 {
    if scale > 0.0 {
        abs / scale
    } else if abs > 0.0 {
        f64::INFINITY
    } else {
        0.0
    }
}

/// Deviation between two outputs of the same shape (`reference` is the unfused one): rows are
/// output channels from `first_channel` on, columns `(image·h + y)·w + x` of an `[h, w]`
/// input, so the worst element is located in the output.
pub fn between(
    reference: &Array2<f64>,
    candidate: &Array2<f64>,
    first_channel: usize,
    [h, w]: [usize; 2],
) -> Deviation {
    let mut max_abs: f64 = 0.0;
    let mut max_out: f64 = 0.0;
    let mut worst = None;
    Zip::indexed(reference)
        .and(candidate)
        .for_each(|(row, col), &r, &c| {
            let d = (c - r).abs();
            if worse(d, max_abs) {
                max_abs = d;
                worst = Some((row, col, r, c));
            }
            max_out = nan_max(max_out, r.abs());
        });
    let plane = (h * w).max(1);
    Deviation {
        max_abs,
        max_rel: relative(max_abs, max_out),
        max_abs_output: max_out,
        worst: worst.map(|(row, col, unfused, fused)| WorstElement {
            image: col / plane,
            channel: first_channel + row,
            y: (col % plane) / w.max(1),
            x: col % w.max(1),
            unfused,
            fused,
        }),
    }
}

impl Deviation {
    /// A deviation that could not be measured: NaN everywhere, so it fails every tolerance.
    pub fn unknown() -> Deviation {
        Deviation {
            max_abs: f64::NAN,
            max_rel: f64::NAN,
            max_abs_output: f64::NAN,
            worst: None,
        }
    }
}
