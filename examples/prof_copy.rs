use rand::{Rng, SeedableRng, rngs::StdRng};
use std::time::Instant;
use vaswani::blocks::BlockConfig;
use vaswani::models::{EncoderDecoder, EncoderDecoderConfig, Seq2SeqBatch};
use vaswani::train::{AdamConfig, Schedule, Trainer, TrainerConfig};
fn main() {
    let mut rng = StdRng::seed_from_u64(2017);
    let block = BlockConfig::new(32, 4, 64).with_dropout(0.0);
    let model: EncoderDecoder = EncoderDecoderConfig::new(13, 13, block, 2, 2)
        .with_shared_embeddings(true)
        .with_tied_output(true)
        .init(&mut rng)
        .unwrap();
    let cfg = TrainerConfig {
        adam: AdamConfig::paper(),
        schedule: Schedule::Noam {
            d_model: 32,
            warmup: 100,
            scale: 0.5,
        },
        clip_norm: Some(1.0),
        label_smoothing: 0.0,
    };
    let mut trainer = Trainer::new(model, cfg).unwrap();
    let mut data_rng = StdRng::seed_from_u64(1);
    let t = Instant::now();
    for _ in 0..300 {
        let pairs: Vec<(Vec<usize>, Vec<usize>)> = (0..64)
            .map(|_| {
                let l = data_rng.random_range(1..=10);
                let s: Vec<usize> = (0..l).map(|_| data_rng.random_range(3..13)).collect();
                (s.clone(), s)
            })
            .collect();
        let b = Seq2SeqBatch::from_pairs(&pairs, 1, 2, 0).unwrap();
        trainer.step(&[b], &mut rng).unwrap();
    }
    eprintln!("{:.2} ms/step", t.elapsed().as_secs_f64() * 1e3 / 300.0);
}
