//! What a model costs before it runs: its parameters and the FLOPs of a step.

/// Parameter count and FLOPs of one forward pass and one training step, under the FLOP
/// model of `WORKLOADS.md` (dense m→n costs 2mn per token, attention 4·Tq·Tk·d per
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
    pub(crate) fn new(params: u64, forward_flops: u64) -> Self {
        Cost {
            params,
            forward_flops,
            train_flops: 3 * forward_flops,
        }
    }

    /// Bytes of the parameters in `f32`, and as much again for gradients and each of Adam's
    /// two moments: `(parameters, training state)`.
    pub fn memory_bytes(&self) -> (u64, u64) {
        (4 * self.params, 16 * self.params)
    }
}
