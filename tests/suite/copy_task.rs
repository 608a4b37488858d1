//! The learning test: an encoder-decoder learns to copy random sequences, to 100% exact
//! match on 1,000 held-out sequences, in seconds.

use std::time::Instant;

use crate::common::copy_task::{batch, exact_matches, held_out, model, trainer_config};
use vaswani::Precision;
use vaswani::rand::{SeedableRng, rngs::StdRng};
use vaswani::train::Trainer;

/// Training steps of 64 sequences; the learning rate decays to 0 over them.
const STEPS: u64 = 600;

#[test]
fn copy_task_reaches_exact_match_on_held_out_sequences() {
    let start = Instant::now();
    let mut rng = StdRng::seed_from_u64(2017);
    let model = model(&mut rng);
    let mut trainer = Trainer::new(model, trainer_config(STEPS, Precision::F32)).unwrap();
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
    let exact = exact_matches(&trainer.model, &held_out(1000));
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "copy task: final loss {last:.4}, {exact}/1000 exact, {secs:.1} s ({train_secs:.1} s training)"
    );
    assert_eq!(exact, 1000, "final loss {last}");
    assert!(secs < 30.0, "took {secs:.1} s");
}
