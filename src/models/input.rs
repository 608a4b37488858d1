//! The input stage shared by every model: positions added to the embedded rows, then
//! dropout on the sum (§5.4: "we apply dropout to the sums of the embeddings and the
//! positional encodings in both the encoder and decoder stacks").

use ndarray::{Array2, Array3, ArrayView3};
use rand::Rng;

use crate::blocks::{flat, unrows};
use crate::error::Result;
use crate::kernels::Float;
use crate::layers::{
    Dropout, DropoutCache, DropoutConfig, LearnedPositional, LearnedPositionalConfig, SinusoidalConfig,
    SinusoidalEncoding,
};

/// How positions are encoded (§3.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum Positions {
    /// The paper's fixed sinusoids, for any length.
    #[default]
    Sinusoidal,
    /// A learned table of `max_len` positions (the paper's Table 3, row E, found "nearly
    /// identical results"); longer sequences are an error.
    Learned {
        /// The number of positions in the table.
        max_len: usize,
    },
}

impl Positions {
    /// The number of parameters they add for width `d_model`: a learned table's
    /// `max_len · d_model`, none for the sinusoids.
    pub fn params(&self, d_model: usize) -> f64 {
        match *self {
            Positions::Learned { max_len } => {
                crate::layers::LearnedPositionalConfig::new(max_len, d_model).params()
            }
            Positions::Sinusoidal => 0.0,
        }
    }
}

/// Positions plus dropout over embedded rows. Its only parameters are a learned table.
#[derive(Clone, Debug, PartialEq)]
pub struct InputStage<F: Float = f32> {
    /// The sinusoids (used when there is no learned table).
    pub sinusoidal: SinusoidalEncoding,
    /// The learned table, if positions are learned.
    pub learned: Option<LearnedPositional<F>>,
    /// Dropout on the sum.
    pub dropout: Dropout,
}
crate::delegate_params!(InputStage => learned);

/// What [`InputStage::backward`] needs.
#[derive(Clone, Debug)]
pub struct InputCache<F: Float = f32> {
    b: usize,
    t: usize,
    start: usize,
    dropout: DropoutCache<F>,
}
crate::kernels::workspace::impl_recycle!(InputCache<F: Float> { dropout });

impl<F: Float> InputStage<F> {
    /// A stage for width `d_model`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) for a zero size or a dropout
    /// rate outside [0, 1).
    pub fn new(d_model: usize, positions: Positions, p_drop: f32, rng: &mut impl Rng) -> Result<Self> {
        let learned = match positions {
            Positions::Sinusoidal => None,
            Positions::Learned { max_len } => {
                Some(LearnedPositionalConfig::new(max_len, d_model).init_as(rng)?)
            }
        };
        Ok(InputStage {
            sinusoidal: SinusoidalConfig::new(d_model).init()?,
            learned,
            dropout: DropoutConfig::new(p_drop).init()?,
        })
    }

    /// Adds positions `start .. start + t` to `x` (`[B·T, d]` rows) and applies dropout.
    ///
    /// # Errors
    /// [`Error::SequenceTooLong`](crate::Error::SequenceTooLong) past a learned table.
    pub fn forward(
        &self,
        x: Array2<F>,
        b: usize,
        t: usize,
        start: usize,
        rng: &mut impl Rng,
    ) -> Result<(Array3<F>, InputCache<F>)> {
        let x = self.add_positions(x, t, start)?;
        let (y, dropout) = self.dropout.forward(x.view(), rng);
        Ok((unrows(y, b, t), InputCache { b, t, start, dropout }))
    }

    /// As [`InputStage::forward`], without dropout.
    ///
    /// # Errors
    /// As [`InputStage::forward`].
    pub fn infer(&self, x: Array2<F>, b: usize, t: usize, start: usize) -> Result<Array3<F>> {
        Ok(unrows(self.add_positions(x, t, start)?, b, t))
    }

    fn add_positions(&self, mut x: Array2<F>, t: usize, start: usize) -> Result<Array2<F>> {
        match &self.learned {
            Some(table) => table.forward(x.view(), t, start),
            None => {
                self.sinusoidal.add_to(x.view_mut(), t, start);
                Ok(x)
            }
        }
    }

    /// Backward: adds the learned table's gradient into `g` and returns the gradient at the
    /// embedded rows, `[B·T, d]`.
    pub fn backward(&self, cache: &InputCache<F>, grad_y: ArrayView3<F>, g: &mut InputStage<F>) -> Array2<F> {
        // One copy of the gradient (from the workspace), the dropout's mask applied in place.
        let mut grad = flat(crate::kernels::workspace::owned(grad_y));
        cache.dropout.apply_inplace(grad.view_mut());
        match (&self.learned, &mut g.learned) {
            (Some(table), Some(gt)) => table.backward(grad.view(), cache.t, cache.start, &mut gt.p),
            _ => grad,
        }
    }

    /// The largest number of positions, if the table is learned.
    pub fn max_len(&self) -> Option<usize> {
        self.learned.as_ref().map(|l| l.cfg.max_len)
    }

    pub(crate) fn dims(cache: &InputCache<F>) -> (usize, usize) {
        (cache.b, cache.t)
    }
}
