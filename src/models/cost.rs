//! What a model costs before it runs: its parameters and the FLOPs of a step.

/// Parameter count and FLOPs of one forward pass and one training step, under the FLOP
/// model (dense m→n costs 2mn per token, attention 4·Tq·Tk·d per
/// sequence, embeddings, norms, softmax and biases are not counted, a training step is 3× the
/// forward).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cost {
    /// Scalar parameters.
    pub params: u64,
    /// FLOPs of one forward pass over the batch.
    pub forward_flops: u64,
    /// FLOPs of one training step (forward, backward, update) over the batch.
    pub train_flops: u64,
}

impl Cost {
    /// From counts computed in `f64` (so that absurd configs saturate instead of wrapping
    /// around): exact below 2⁵³, saturating at `u64::MAX` above.
    pub(crate) fn from_f64(params: f64, forward_flops: f64) -> Self {
        Cost {
            params: params as u64,
            forward_flops: forward_flops as u64,
            train_flops: (3.0 * forward_flops) as u64,
        }
    }

    /// Bytes of the parameters in `f32`, and as much again for gradients and each of Adam's
    /// two moments: `(parameters, training state)`.
    pub fn memory_bytes(&self) -> (u64, u64) {
        (self.params.saturating_mul(4), self.params.saturating_mul(16))
    }
}
