//! Positions (§3.5): the fixed sinusoidal encoding of the paper, and learned positional
//! embeddings.
//!
//! "Since our model contains no recurrence and no convolution, in order for the model to
//! make use of the order of the sequence, we must inject some information about the relative
//! or absolute position of the tokens" (§3.5). Both kinds here *add* a vector that depends
//! only on the position t to row `b·T + t` of the `[B·T, d_model]` input, usually the scaled
//! token embeddings (§3.4). A `start` argument gives the position of the first row, so
//! step-by-step decoding (one new position per call) adds exactly what a full forward pass
//! adds at that position.
//!
//! **Sinusoidal** ([`SinusoidalEncoding`], [`sinusoidal_table`]), in the paper's interleaved
//! layout, for `i = 0, 1, …`:
//! ```text
//! PE(pos, 2i)   = sin(pos / 10000^(2i/d_model))
//! PE(pos, 2i+1) = cos(pos / 10000^(2i/d_model))
//! ```
//! The wavelengths form a geometric progression from 2π to 10000·2π, and `PE(pos + k)` is a
//! linear function (a rotation) of `PE(pos)`; the derivation, a table of values, and the
//! concatenated `[sin ‖ cos]` layout of tensor2tensor and fairseq, whose checkpoints are not
//! interchangeable with this one, follow the example below (the same text as
//! `docs/positional-encoding.md` in the repository).
//! Values are computed in `f64` and rounded once to the element type, so they stay accurate
//! at any position (computing the angle in `f32`, as the usual PyTorch code does, puts values
//! off by a few 1e-5 at position 1000). Any length works: nothing is tabulated at init. An
//! odd `d_model` works too: its last column is a sin. The encoding has no parameters, and
//! its backward pass is the identity, `∂L/∂x = ∂L/∂y`.
//!
//! **Learned** ([`LearnedPositional`]): a table P `[max_len, d_model]`,
//! `y[b·T + t] = x[b·T + t] + P[start + t]`. "We also experimented with using learned
//! positional embeddings instead, and found that the two versions produced nearly identical
//! results (see Table 3 row (E))" (§3.5). Backward: `∂L/∂x = ∂L/∂y`,
//! `∂L/∂P[start + t] = Σ_b ∂L/∂y[b·T + t]`, summed over the batch in order on one thread, so
//! the result is deterministic. Positions at or past `max_len` are an error.
//!
//! PyTorch equivalent: `nn.Transformer` has no positional encoding; the sinusoidal one is the
//! `PositionalEncoding` module of the PyTorch tutorial and of the Annotated Transformer
//! (`pe[:, 0::2] = sin(…)`, `pe[:, 1::2] = cos(…)`, a buffer of `max_len` rows computed in
//! `f32`), without its dropout: the paper applies dropout to the sums of embeddings and
//! positional encodings (§5.4), which is the dropout layer's job. The learned one is
//! `x + nn.Embedding(max_len, d_model)(torch.arange(start, start + T))`, as in BERT and
//! GPT-2, initialised N(0, 0.02²) as Hugging Face initialises theirs
//! (`initializer_range = 0.02`).
//!
//! # Example
//! ```
//! use vaswani::ndarray::{Array2, s};
//! use vaswani::layers::{SinusoidalConfig, sinusoidal_table};
//!
//! let pe = SinusoidalConfig::new(4).init()?;
//! let x = Array2::<f32>::zeros((2 * 3, 4)); // B = 2 sequences of T = 3
//! let y = pe.forward(x.view(), 3, 0);
//! assert_eq!(y.row(0), vaswani::ndarray::arr1(&[0.0, 1.0, 0.0, 1.0])); // PE(0)
//! assert_eq!(y.slice(s![3..6, ..]), sinusoidal_table::<f32>(3, 4)); // sequence b = 1
//!
//! // Decoding one step at a time: position 2 of both sequences, given alone.
//! let step = pe.forward(Array2::<f32>::zeros((2, 4)).view(), 1, 2);
//! assert_eq!(step.row(1), y.row(3 + 2));
//! # Ok::<(), vaswani::Error>(())
//! ```
//!
#![doc = include_str!("../../docs/positional-encoding.md")]

use ndarray::{Array2, ArrayView2, ArrayViewMut2, Axis, s};
use rand::Rng;

use crate::error::{Error, Result, check};
use crate::kernels::Float;
use crate::params::normal;

/// Configuration of a [`SinusoidalEncoding`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct SinusoidalConfig {
    /// Model width d_model.
    pub d_model: usize,
}

/// Configuration of a [`LearnedPositional`] embedding.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct LearnedPositionalConfig {
    /// The number of positions with an embedding: `start + seq_len` may not exceed it.
    pub max_len: usize,
    /// Model width d_model.
    pub d_model: usize,
}

/// Parameters of a [`LearnedPositional`] embedding (and, with the same type, their
/// gradients).
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(bound = ""))]
pub struct LearnedPositionalParams<F: Float = f32> {
    /// P, `[max_len, d_model]`: row t is added at position t.
    pub weight: Array2<F>,
}
crate::impl_params!(LearnedPositionalParams { weight });

/// The fixed sinusoidal positional encoding of §3.5, added to rows: `y = x + PE`. See the
/// [module docs](self).
///
/// It holds no numbers, so one value serves every element type and every length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SinusoidalEncoding {
    /// Its configuration.
    pub cfg: SinusoidalConfig,
}

/// Learned positional embeddings `y[b·T + t] = x[b·T + t] + P[start + t]` (§3.5, Table 3
/// row (E)). See the [module docs](self).
#[derive(Clone, Debug, PartialEq)]
pub struct LearnedPositional<F: Float = f32> {
    /// Its configuration.
    pub cfg: LearnedPositionalConfig,
    /// Its parameters.
    pub p: LearnedPositionalParams<F>,
}
crate::delegate_params!(LearnedPositional => p);

/// The sinusoidal encoding of positions `0..len`: `[len, d_model]`, row `pos` is `PE(pos)`
/// (§3.5), in the paper's interleaved layout.
///
/// `PE(pos, 2i) = sin(pos / 10000^(2i/d_model))`,
/// `PE(pos, 2i+1) = cos(pos / 10000^(2i/d_model))`, computed in `f64` and rounded once. An
/// odd `d_model` ends with a sin column.
///
/// # Shapes
/// → `[len, d_model]`.
///
/// # Example
/// ```
/// let pe = vaswani::layers::sinusoidal_table::<f64>(3, 4);
/// assert_eq!(pe.row(0), vaswani::ndarray::arr1(&[0.0, 1.0, 0.0, 1.0]));
/// assert_eq!(pe[[1, 0]], 1.0_f64.sin());
/// assert_eq!(pe[[2, 3]], (2.0 / 100.0_f64).cos()); // 10000^(2/4) = 100
/// ```
pub fn sinusoidal_table<F: Float>(len: usize, d_model: usize) -> Array2<F> {
    sinusoidal_rows(0, len, d_model)
}

/// The sinusoidal encoding of positions `start..start + len`: row r is `PE(start + r)`,
/// the same values as rows `start..start + len` of [`sinusoidal_table`].
///
/// # Shapes
/// → `[len, d_model]`.
pub fn sinusoidal_rows<F: Float>(start: usize, len: usize, d_model: usize) -> Array2<F> {
    if let Some(table) = cached_table(start.saturating_add(len), d_model) {
        let rows = &table[start * d_model..(start + len) * d_model];
        return Array2::from_shape_fn((len, d_model), |(r, j)| F::from_f64(rows[r * d_model + j]));
    }
    computed_rows(start, len, d_model)
}

/// [`sinusoidal_rows`] computed, in `f64` until the one rounding to `F`.
fn computed_rows<F: Float>(start: usize, len: usize, d_model: usize) -> Array2<F> {
    // 10000^(2i/d_model) for column j = 2i or 2i + 1.
    let denom: Vec<f64> = (0..d_model)
        .map(|j| 10000.0_f64.powf((j - j % 2) as f64 / d_model as f64))
        .collect();
    Array2::from_shape_fn((len, d_model), |(r, j)| {
        // In f64 from the start, so that no position overflows a usize sum.
        let angle = (start as f64 + r as f64) / denom[j];
        F::from_f64(if j % 2 == 0 { angle.sin() } else { angle.cos() })
    })
}

/// Floats of `f64` a cached table holds at most (8 MiB): longer encodings are computed.
const CACHED_TABLE_FLOATS: usize = 1 << 20;

/// Rows `0..len'` (some `len' ≥ len`) of the encoding of width `d_model` in `f64`, computed
/// once for the process and kept (one table per width, grown by doubling), or `None` when
/// `len` rows would pass [`CACHED_TABLE_FLOATS`]. Every forward pass adds the encoding: the
/// `sin`, `cos` and `powf` of a tiny model's table took 1% of its forward pass.
fn cached_table(len: usize, d_model: usize) -> Option<std::sync::Arc<Vec<f64>>> {
    use std::sync::{Arc, Mutex};
    static TABLES: Mutex<Vec<(usize, Arc<Vec<f64>>)>> = Mutex::new(Vec::new());
    if d_model == 0 || len.checked_mul(d_model)? > CACHED_TABLE_FLOATS {
        return None;
    }
    let mut tables = TABLES.lock().unwrap_or_else(|e| e.into_inner());
    let at = tables.iter().position(|(d, _)| *d == d_model);
    if let Some(i) = at
        && tables[i].1.len() >= len * d_model
    {
        return Some(Arc::clone(&tables[i].1));
    }
    // At least len: len · d_model ≤ CACHED_TABLE_FLOATS (checked above).
    let rows = len.next_power_of_two().max(64).min(CACHED_TABLE_FLOATS / d_model);
    let table: Array2<f64> = computed_rows(0, rows, d_model);
    let table = Arc::new(table.into_raw_vec_and_offset().0);
    match at {
        Some(i) => tables[i].1 = Arc::clone(&table),
        None => tables.push((d_model, Arc::clone(&table))),
    }
    Some(table)
}

impl SinusoidalConfig {
    /// A sinusoidal encoding of width `d_model`.
    pub fn new(d_model: usize) -> Self {
        SinusoidalConfig { d_model }
    }

    /// Builds the encoding. It has no parameters, so no random generator is needed.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if `d_model` is 0.
    pub fn init(&self) -> Result<SinusoidalEncoding> {
        check::positive("d_model", self.d_model)?;
        Ok(SinusoidalEncoding { cfg: self.clone() })
    }
}

impl LearnedPositionalConfig {
    /// Its number of parameters, `max_len · d_model`, in `f64` (exact below 2⁵³; an absurd config saturates instead of wrapping around).
    pub fn params(&self) -> f64 {
        self.max_len as f64 * self.d_model as f64
    }

    /// Learned embeddings for `max_len` positions of width `d_model`.
    pub fn new(max_len: usize, d_model: usize) -> Self {
        LearnedPositionalConfig { max_len, d_model }
    }

    /// Builds the layer in `f32`, the type for training and inference;
    /// [`LearnedPositionalConfig::init_as`] builds it in another float type (`f64` for gradient checks).
    ///
    /// # Errors
    /// As [`LearnedPositionalConfig::init_as`].
    pub fn init(&self, rng: &mut impl Rng) -> Result<LearnedPositional> {
        self.init_as(rng)
    }

    /// Builds the layer: P ~ N(0, 0.02²), as Hugging Face's BERT and GPT-2 initialise
    /// theirs (PyTorch's `nn.Embedding` draws N(0, 1)).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if `max_len` or `d_model` is 0.
    pub fn init_as<F: Float>(&self, rng: &mut impl Rng) -> Result<LearnedPositional<F>> {
        check::positive("max_len", self.max_len)?;
        check::positive("d_model", self.d_model)?;
        check::tensor("max_len", &[self.max_len, self.d_model], size_of::<F>())?;
        Ok(LearnedPositional {
            cfg: self.clone(),
            p: LearnedPositionalParams {
                weight: normal((self.max_len, self.d_model), 0.02, rng),
            },
        })
    }
}

impl SinusoidalEncoding {
    /// `y = x + PE`: adds `PE(start + t)` to row `b·T + t` of every sequence b.
    ///
    /// `seq_len` is T; `start` is the position of each sequence's first row (0 for a whole
    /// sequence, the current step when decoding one position at a time). There is no
    /// length limit.
    ///
    /// # Shapes
    /// `x`: `[B·T, d_model]` → `[B·T, d_model]`.
    ///
    /// # Panics
    /// If `x` is not `[B·T, d_model]` for `T = seq_len` (its row count a multiple of
    /// `seq_len`).
    pub fn forward<F: Float>(&self, x: ArrayView2<F>, seq_len: usize, start: usize) -> Array2<F> {
        let mut y = x.to_owned();
        self.add_to(y.view_mut(), seq_len, start);
        y
    }

    /// [`SinusoidalEncoding::forward`] in place: `x ← x + PE`.
    ///
    /// # Shapes
    /// `x`: `[B·T, d_model]`.
    ///
    /// # Panics
    /// As [`SinusoidalEncoding::forward`].
    pub fn add_to<F: Float>(&self, mut x: ArrayViewMut2<F>, seq_len: usize, start: usize) {
        check_rows("SinusoidalEncoding", x.dim(), seq_len, self.cfg.d_model);
        if seq_len == 0 {
            return;
        }
        let pe = sinusoidal_rows::<F>(start, seq_len, self.cfg.d_model);
        for mut seq in x.axis_chunks_iter_mut(Axis(0), seq_len) {
            seq += &pe;
        }
    }

    /// Backward pass: the identity, `∂L/∂x = ∂L/∂y` (the encoding is a constant added to
    /// x, and has no parameters). Returns a copy of `grad_y`.
    ///
    /// # Shapes
    /// `grad_y`: `[B·T, d_model]` → `[B·T, d_model]`.
    ///
    /// # Panics
    /// If `grad_y` is not `[N, d_model]`.
    pub fn backward<F: Float>(&self, grad_y: ArrayView2<F>) -> Array2<F> {
        assert_eq!(
            grad_y.ncols(),
            self.cfg.d_model,
            "SinusoidalEncoding::backward: grad_y is {:?}, expected [N, d_model = {}]",
            grad_y.shape(),
            self.cfg.d_model
        );
        grad_y.to_owned()
    }
}

impl<F: Float> LearnedPositional<F> {
    /// `y[b·T + t] = x[b·T + t] + P[start + t]` for every sequence b.
    ///
    /// `seq_len` is T; `start` is the position of each sequence's first row.
    ///
    /// # Shapes
    /// `x`: `[B·T, d_model]` → `[B·T, d_model]`.
    ///
    /// # Errors
    /// [`Error::SequenceTooLong`] with `len = start + seq_len` and `max = max_len` if the
    /// positions run past the table.
    ///
    /// # Panics
    /// If `x` is not `[B·T, d_model]` for `T = seq_len`.
    pub fn forward(&self, x: ArrayView2<F>, seq_len: usize, start: usize) -> Result<Array2<F>> {
        check_rows("LearnedPositional", x.dim(), seq_len, self.cfg.d_model);
        let end = self.end(seq_len, start)?;
        let mut y = x.to_owned();
        if seq_len > 0 {
            let table = self.p.weight.slice(s![start..end, ..]);
            for mut seq in y.axis_chunks_iter_mut(Axis(0), seq_len) {
                seq += &table;
            }
        }
        Ok(y)
    }

    /// Backward pass: adds `Σ_b grad_y[b·T + t]` into `g.weight[start + t]`, summing over
    /// the batch in order, and returns `∂L/∂x = grad_y` (a copy).
    ///
    /// # Shapes
    /// `grad_y`: `[B·T, d_model]` → `[B·T, d_model]`.
    ///
    /// # Panics
    /// If `grad_y` is not `[B·T, d_model]` for `T = seq_len`, if `start + seq_len` exceeds
    /// `max_len` (the forward pass would have refused it), or if `g.weight` is not
    /// `[max_len, d_model]`.
    pub fn backward(
        &self,
        grad_y: ArrayView2<F>,
        seq_len: usize,
        start: usize,
        g: &mut LearnedPositionalParams<F>,
    ) -> Array2<F> {
        check_rows(
            "LearnedPositional::backward",
            grad_y.dim(),
            seq_len,
            self.cfg.d_model,
        );
        assert_eq!(
            g.weight.dim(),
            self.p.weight.dim(),
            "LearnedPositional::backward: gradient weight is {:?}, expected [max_len, d_model] = {:?}",
            g.weight.shape(),
            self.p.weight.shape()
        );
        let end = match self.end(seq_len, start) {
            Ok(end) => end,
            Err(e) => panic!("LearnedPositional::backward: {e}"),
        };
        if seq_len > 0 {
            let mut used = g.weight.slice_mut(s![start..end, ..]);
            for seq in grad_y.axis_chunks_iter(Axis(0), seq_len) {
                used += &seq;
            }
        }
        grad_y.to_owned()
    }

    /// `start + seq_len`, if it is within `max_len`.
    fn end(&self, seq_len: usize, start: usize) -> Result<usize> {
        match start.checked_add(seq_len) {
            Some(end) if end <= self.cfg.max_len => Ok(end),
            _ => Err(Error::SequenceTooLong {
                len: start.saturating_add(seq_len),
                max: self.cfg.max_len,
            }),
        }
    }
}

/// Asserts that `shape` is `[B·T, d_model]` for `T = seq_len`.
fn check_rows(what: &str, shape: (usize, usize), seq_len: usize, d_model: usize) {
    let rows_fit = match seq_len {
        0 => shape.0 == 0,
        t => shape.0.is_multiple_of(t),
    };
    assert!(
        rows_fit && shape.1 == d_model,
        "{what}: input is {:?}, expected [B·T, d_model] with T = seq_len = {seq_len}, d_model = {d_model}",
        [shape.0, shape.1]
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{GradCheck, random_like};
    use crate::params::{Params, Tensors};
    use rand::{SeedableRng, rngs::StdRng};

    #[test]
    fn cached_rows_are_the_computed_ones() {
        // Growing tables, two widths, f32 and f64, and a length past the cache.
        for (start, len, d) in [
            (0, 3, 6),
            (5, 40, 6),
            (100, 300, 6),
            (7, 9, 64),
            (0, (1 << 20) / 8 + 1, 8),
        ] {
            assert_eq!(
                sinusoidal_rows::<f32>(start, len, d),
                computed_rows::<f32>(start, len, d),
                "{start} + {len} at {d}"
            );
            assert_eq!(
                sinusoidal_rows::<f64>(start, len, d),
                computed_rows::<f64>(start, len, d)
            );
        }
        assert!(cached_table((1 << 20) / 8 + 1, 8).is_none());
        assert!(cached_table(0, 0).is_none());
    }

    /// The formula as PyTorch writes it, `exp(−2i·ln(10000)/d)`, in f64: an independent
    /// route to the same numbers.
    fn formula(pos: usize, j: usize, d: usize) -> f64 {
        let i = (j / 2) as f64;
        let angle = pos as f64 * (-2.0 * i * 10000.0_f64.ln() / d as f64).exp();
        if j.is_multiple_of(2) {
            angle.sin()
        } else {
            angle.cos()
        }
    }

    #[test]
    fn pe_at_position_zero_is_zero_one_exactly() {
        for d in [1, 2, 7, 8, 512] {
            let pe = sinusoidal_table::<f32>(1, d);
            let want = Array2::from_shape_fn((1, d), |(_, j)| if j % 2 == 0 { 0.0 } else { 1.0 });
            assert_eq!(pe, want, "d_model = {d}");
            let pe = sinusoidal_table::<f64>(1, d);
            assert_eq!(pe, want.mapv(f64::from), "d_model = {d}");
        }
    }

    #[test]
    fn matches_the_formula_far_out_and_at_odd_width() {
        for d in [512, 7] {
            let table64 = sinusoidal_table::<f64>(1001, d);
            let table32 = sinusoidal_table::<f32>(1001, d);
            for pos in [1, 17, 1000] {
                for j in 0..d {
                    let want = formula(pos, j, d);
                    let got = table64[[pos, j]];
                    assert!(
                        (got - want).abs() < 1e-12,
                        "d {d} pos {pos} col {j}: {got} vs {want}"
                    );
                    // f32: rounded once from f64, so within half an f32 ulp of 1.
                    let got = table32[[pos, j]] as f64;
                    assert!((got - want).abs() < 1e-7, "f32, d {d} pos {pos} col {j}");
                }
            }
        }
        // The last column of an odd width is a sin, of the lowest frequency.
        let pe = sinusoidal_table::<f64>(2, 7);
        assert_eq!(pe[[1, 6]], (1.0 / 10000.0_f64.powf(6.0 / 7.0)).sin());
    }

    #[test]
    fn values_lie_in_unit_interval_and_rows_are_distinct() {
        let (len, d) = (600, 16);
        let pe = sinusoidal_table::<f64>(len, d);
        assert!(pe.iter().all(|v| (-1.0..=1.0).contains(v)));
        // Each sin/cos pair lies on the unit circle, so every row has norm √(d/2).
        for row in pe.rows() {
            assert!((row.dot(&row) - (d / 2) as f64).abs() < 1e-12);
        }
        let mut closest = f64::INFINITY;
        for a in 0..len {
            for b in a + 1..len {
                let diff = &pe.row(a) - &pe.row(b);
                closest = closest.min(diff.dot(&diff).sqrt());
            }
        }
        assert!(closest > 0.1, "two positions {closest} apart");
    }

    #[test]
    fn shifted_start_equals_the_rows_of_a_longer_pass() {
        let mut rng = StdRng::seed_from_u64(40);
        let (b, t, d) = (3, 7, 6);
        let pe = SinusoidalConfig::new(d).init().unwrap();
        let x: Array2<f64> = random_like((b * t, d), &mut rng);
        let full = pe.forward(x.view(), t, 0);
        // Every sequence b gets the same table.
        for seq in 0..b {
            let rows = s![seq * t..(seq + 1) * t, ..];
            assert_eq!(full.slice(rows), &x.slice(rows) + &sinusoidal_table::<f64>(t, d));
        }
        // Step-by-step decoding: position `step` of every sequence, given alone.
        for step in 0..t {
            let rows: Vec<usize> = (0..b).map(|seq| seq * t + step).collect();
            let x_step = x.select(Axis(0), &rows);
            let y_step = pe.forward(x_step.view(), 1, step);
            assert_eq!(y_step, full.select(Axis(0), &rows), "step {step}");
        }
        // The last 3 positions of each sequence with start = 4.
        let rows: Vec<usize> = (0..b).flat_map(|seq| (4..t).map(move |p| seq * t + p)).collect();
        let tail = pe.forward(x.select(Axis(0), &rows).view(), t - 4, 4);
        assert_eq!(tail, full.select(Axis(0), &rows));
        // In place, the same.
        let mut y = x.clone();
        pe.add_to(y.view_mut(), t, 0);
        assert_eq!(y, full);
    }

    #[test]
    fn any_length_and_any_start() {
        let pe = SinusoidalConfig::new(5).init().unwrap();
        let far = 1_000_000;
        let y = pe.forward(Array2::<f64>::zeros((2, 5)).view(), 1, far);
        for j in 0..5 {
            assert!((y[[1, j]] - formula(far, j, 5)).abs() < 1e-9);
        }
        let long = pe.forward(Array2::<f32>::zeros((20_000, 5)).view(), 20_000, 0);
        assert_eq!(long.row(19_999), sinusoidal_rows::<f32>(19_999, 1, 5).row(0));
        // Empty input, T = 0.
        assert_eq!(
            pe.forward(Array2::<f32>::zeros((0, 5)).view(), 0, 3).dim(),
            (0, 5)
        );
    }

    #[test]
    fn sinusoidal_backward_is_the_identity() {
        let mut rng = StdRng::seed_from_u64(41);
        let pe = SinusoidalConfig::new(4).init().unwrap();
        let grad_y: Array2<f64> = random_like((6, 4), &mut rng);
        assert_eq!(pe.backward(grad_y.view()), grad_y);
    }

    #[test]
    fn learned_gradients_match_finite_differences() {
        let mut rng = StdRng::seed_from_u64(42);
        let layer = LearnedPositionalConfig::new(7, 3)
            .init_as::<f64>(&mut rng)
            .unwrap();
        let (b, t, start) = (3, 4, 2);
        let x: Array2<f64> = random_like((b * t, 3), &mut rng);
        let r: Array2<f64> = random_like((b * t, 3), &mut rng);
        let mut g = layer.p.zeros_like();
        let grad_x = layer.backward(r.view(), t, start, &mut g);
        assert_eq!(grad_x, r);
        let mut point = (Tensors::new().with("x", x), layer.p.clone());
        let analytic = (Tensors::new().with("x", grad_x), g.clone());
        let report = GradCheck::default().run(&mut point, &analytic, |(inputs, p)| {
            let layer = LearnedPositional {
                cfg: layer.cfg.clone(),
                p: p.clone(),
            };
            let x = inputs.get("x").view().into_dimensionality().unwrap();
            (&layer.forward(x, t, start).unwrap() * &r).sum()
        });
        report.assert_ok();
        report.assert_all_nonzero();
        // Rows outside start..start + T get nothing; the used rows get the batch sum.
        for unused in [0, 1, 6] {
            assert!(g.weight.row(unused).iter().all(|&v| v == 0.0));
        }
        let want = &(&r.row(1) + &r.row(t + 1)) + &r.row(2 * t + 1);
        assert_eq!(g.weight.row(start + 1), want);
    }

    #[test]
    fn learned_adds_table_rows_from_start() {
        let mut rng = StdRng::seed_from_u64(43);
        let layer = LearnedPositionalConfig::new(5, 2).init(&mut rng).unwrap();
        let y = layer.forward(Array2::zeros((4, 2)).view(), 2, 3).unwrap();
        for seq in 0..2 {
            assert_eq!(
                y.slice(s![2 * seq..2 * seq + 2, ..]),
                layer.p.weight.slice(s![3..5, ..])
            );
        }
        let std = LearnedPositionalConfig::new(400, 50)
            .init_as::<f64>(&mut rng)
            .unwrap()
            .p
            .weight
            .mapv(|v| v * v)
            .mean()
            .unwrap()
            .sqrt();
        assert!((std - 0.02).abs() < 0.001, "std {std}");
    }

    #[test]
    fn too_long_is_an_error_naming_both_lengths() {
        let mut rng = StdRng::seed_from_u64(44);
        let layer = LearnedPositionalConfig::new(6, 2).init(&mut rng).unwrap();
        let x = Array2::zeros((8, 2));
        let err = layer.forward(x.view(), 4, 3).unwrap_err();
        assert_eq!(err, Error::SequenceTooLong { len: 7, max: 6 });
        assert_eq!(
            err.to_string(),
            "sequence of length 7 is longer than the maximum of 6"
        );
        assert!(layer.forward(x.view(), 4, 2).is_ok());
        assert_eq!(
            layer
                .forward(Array2::zeros((1, 2)).view(), 1, usize::MAX)
                .unwrap_err(),
            Error::SequenceTooLong {
                len: usize::MAX,
                max: 6
            }
        );
    }

    #[test]
    fn config_errors() {
        let mut rng = StdRng::seed_from_u64(0);
        assert!(SinusoidalConfig::new(0).init().is_err());
        assert!(LearnedPositionalConfig::new(0, 3).init(&mut rng).is_err());
        assert!(LearnedPositionalConfig::new(3, 0).init(&mut rng).is_err());
    }

    #[test]
    #[should_panic(expected = "input is [7, 4], expected [B·T, d_model] with T = seq_len = 3, d_model = 4")]
    fn rows_not_a_multiple_of_seq_len_panic_with_both_shapes() {
        let pe = SinusoidalConfig::new(4).init().unwrap();
        pe.forward(Array2::<f32>::zeros((7, 4)).view(), 3, 0);
    }

    #[test]
    #[should_panic(expected = "input is [6, 5], expected [B·T, d_model] with T = seq_len = 3, d_model = 4")]
    fn learned_wrong_width_panics_with_both_shapes() {
        let layer = LearnedPositionalConfig::new(8, 4)
            .init(&mut StdRng::seed_from_u64(0))
            .unwrap();
        let _ = layer.forward(Array2::zeros((6, 5)).view(), 3, 0);
    }

    #[test]
    #[should_panic(expected = "sequence of length 9 is longer than the maximum of 8")]
    fn learned_backward_past_the_table_panics() {
        let layer = LearnedPositionalConfig::new(8, 4)
            .init(&mut StdRng::seed_from_u64(0))
            .unwrap();
        layer.backward(Array2::zeros((3, 4)).view(), 3, 6, &mut layer.p.zeros_like());
    }
}
