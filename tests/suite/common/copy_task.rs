//! The copy task: an encoder-decoder learns to copy random sequences of 10 symbols, lengths 1
//! to 10. The model, the batches, the training settings and the held-out check of
//! `tests/suite/copy_task.rs` and `tests/suite/precision.rs`.

use vaswani::Precision;
use vaswani::blocks::BlockConfig;
use vaswani::models::{EncoderDecoder, EncoderDecoderConfig, Seq2SeqBatch, TokenBatch};
use vaswani::rand::{Rng, rngs::StdRng};
use vaswani::train::{AdamConfig, OptimizerConfig, Schedule, TrainerConfig};

pub const PAD: usize = 0;
pub const BOS: usize = 1;
pub const EOS: usize = 2;
/// 10 symbols after PAD, BOS and EOS.
pub const VOCAB: usize = 13;
pub const MAX_LEN: usize = 10;

pub fn random_sequence(rng: &mut StdRng) -> Vec<usize> {
    let len = rng.random_range(1..=MAX_LEN);
    (0..len).map(|_| rng.random_range(3..VOCAB)).collect()
}

/// `size` random sequences, each its own target.
pub fn batch(rng: &mut StdRng, size: usize) -> Seq2SeqBatch {
    let pairs: Vec<(Vec<usize>, Vec<usize>)> = (0..size)
        .map(|_| random_sequence(rng))
        .map(|s| (s.clone(), s))
        .collect();
    Seq2SeqBatch::from_pairs(&pairs, BOS, EOS, PAD).unwrap()
}

/// d_model 32, 4 heads, d_ff 64, 2 + 2 layers, no dropout, embeddings shared and tied.
pub fn model(rng: &mut StdRng) -> EncoderDecoder {
    let block = BlockConfig::new(32, 4, 64).with_p_drop(0.0);
    EncoderDecoderConfig::new(VOCAB, VOCAB, block, 2, 2)
        .with_share_embeddings(true)
        .with_tie_output(true)
        .init(rng)
        .unwrap()
}

/// Adam, a cosine schedule peaking at 8e-3 after 100 steps and decaying to 0 over `steps`
/// (which is what takes the last few held-out sequences from almost right to exactly
/// right), clipping at 1, no label smoothing.
pub fn trainer_config(steps: u64, precision: Precision) -> TrainerConfig {
    TrainerConfig {
        optimizer: OptimizerConfig::Adam(AdamConfig::paper()),
        schedule: Schedule::Cosine {
            peak: 8e-3,
            warmup: 100,
            total: steps,
            min: 0.0,
        },
        clip_norm: Some(1.0),
        label_smoothing: 0.0,
        precision,
    }
}

/// `count` held-out sequences (their own stream, seed 99).
pub fn held_out(count: usize) -> Vec<Vec<usize>> {
    use vaswani::rand::SeedableRng;
    let mut r = StdRng::seed_from_u64(99);
    (0..count).map(|_| random_sequence(&mut r)).collect()
}

/// How many of `held_out` the model copies exactly, decoded greedily.
pub fn exact_matches(model: &EncoderDecoder, held_out: &[Vec<usize>]) -> usize {
    let src = TokenBatch::from_sequences(held_out, PAD).unwrap();
    let decoded = model
        .begin_decode(&src, MAX_LEN + 1)
        .and_then(|state| vaswani::infer::greedy(state, BOS, Some(EOS), MAX_LEN + 1))
        .unwrap();
    decoded.iter().zip(held_out).filter(|(d, s)| d == s).count()
}
