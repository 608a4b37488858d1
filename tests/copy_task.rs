//! The learning test: an encoder-decoder learns to copy random sequences, to 100% exact
//! match on 1,000 held-out sequences, in seconds.

use std::time::Instant;

use rand::{Rng, SeedableRng, rngs::StdRng};
use vaswani::blocks::BlockConfig;
use vaswani::models::{EncoderDecoder, EncoderDecoderConfig, Seq2SeqBatch, TokenBatch};
use vaswani::train::{AdamConfig, OptimizerConfig, Schedule, Trainer, TrainerConfig};

const PAD: usize = 0;
const BOS: usize = 1;
const EOS: usize = 2;
const VOCAB: usize = 13; // 10 symbols after PAD, BOS, EOS
const MAX_LEN: usize = 10;
/// Training steps of 64 sequences; the learning rate decays to 0 over them (cosine), which is
/// what takes the last few held-out sequences from almost right to exactly right.
const STEPS: u64 = 600;

fn random_sequence(rng: &mut StdRng) -> Vec<usize> {
    let len = rng.random_range(1..=MAX_LEN);
    (0..len).map(|_| rng.random_range(3..VOCAB)).collect()
}

fn batch(rng: &mut StdRng, size: usize) -> Seq2SeqBatch {
    let pairs: Vec<(Vec<usize>, Vec<usize>)> = (0..size)
        .map(|_| random_sequence(rng))
        .map(|s| (s.clone(), s))
        .collect();
    Seq2SeqBatch::from_pairs(&pairs, BOS, EOS, PAD).unwrap()
}

#[test]
fn copy_task_reaches_exact_match_on_held_out_sequences() {
    let start = Instant::now();
    let mut rng = StdRng::seed_from_u64(2017);
    let block = BlockConfig::new(32, 4, 64).with_p_drop(0.0);
    let model: EncoderDecoder = EncoderDecoderConfig::new(VOCAB, VOCAB, block, 2, 2)
        .with_share_embeddings(true)
        .with_tie_output(true)
        .init(&mut rng)
        .unwrap();
    let cfg = TrainerConfig {
        optimizer: OptimizerConfig::Adam(AdamConfig::paper()),
        schedule: Schedule::Cosine {
            peak: 8e-3,
            warmup: 100,
            total: STEPS,
            min: 0.0,
        },
        clip_norm: Some(1.0),
        label_smoothing: 0.0,
        precision: vaswani::Precision::F32,
    };
    let mut trainer = Trainer::new(model, cfg).unwrap();
    let mut data_rng = StdRng::seed_from_u64(1);
    let mut last = 0.0;
    for _ in 0..STEPS {
        last = trainer
            .step(&[batch(&mut data_rng, 64)], &mut rng)
            .unwrap()
            .loss
            .loss;
    }
    let train_secs = start.elapsed().as_secs_f64();
    let held_out: Vec<Vec<usize>> = {
        let mut r = StdRng::seed_from_u64(99);
        (0..1000).map(|_| random_sequence(&mut r)).collect()
    };
    let src = TokenBatch::from_sequences(&held_out, PAD).unwrap();
    let decoded = trainer
        .model
        .begin_decode(&src, MAX_LEN + 1)
        .and_then(|state| vaswani::infer::greedy(state, BOS, Some(EOS), MAX_LEN + 1))
        .unwrap();
    let exact = decoded.iter().zip(&held_out).filter(|(d, s)| d == s).count();
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "copy task: final loss {last:.4}, {exact}/1000 exact, {secs:.1} s ({train_secs:.1} s training)"
    );
    assert_eq!(exact, 1000, "final loss {last}");
    assert!(secs < 30.0, "took {secs:.1} s");
}
