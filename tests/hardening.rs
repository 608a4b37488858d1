//! Bad values from users and files, through the public API: each answer is an `Err` that
//! names what is wrong, never a panic and never an answer computed from values that mean
//! nothing.

use ndarray::{Array2, array};
use rand::{SeedableRng, rngs::StdRng};
use vaswani::blocks::BlockConfig;
use vaswani::models::{
    DecoderOnlyConfig, EncoderDecoderConfig, EncoderOnlyConfig, Head, InputKind, LmBatch, Positions,
    Sampling, TokenBatch,
};
use vaswani::{Error, Params};

fn block() -> BlockConfig {
    BlockConfig::new(8, 2, 16)
}

/// Every weight of every tensor whose name contains `part` set to NaN; how many tensors.
fn poison<P: Params<f32>>(model: &mut P, part: &str) -> usize {
    let mut n = 0;
    model.visit_mut("", &mut |name, mut t| {
        if name.contains(part) {
            t.fill(f32::NAN);
            n += 1;
        }
    });
    n
}

#[test]
fn a_decision_over_non_finite_logits_is_an_error_in_every_model() {
    let mut rng = StdRng::seed_from_u64(1);
    let src = TokenBatch::from_sequences(&[vec![3, 4, 5], vec![6, 7]], 0).unwrap();

    let mut model = EncoderDecoderConfig::new(9, 9, block(), 1, 1)
        .init::<f32>(&mut rng)
        .unwrap();
    assert!(model.greedy(&src, 1, 2, 4).is_ok());
    assert!(poison(&mut model, "decoder") > 0);
    for result in [
        model.greedy(&src, 1, 2, 4),
        model.greedy_uncached(&src, 1, 2, 4),
        model.packed().greedy(&src, 1, 2, 4),
    ] {
        let err = result.unwrap_err();
        assert!(matches!(err, Error::NonFinite { .. }), "{err}");
        assert!(err.to_string().contains("logits of the next token"), "{err}");
    }

    let head = Head::Classify { classes: 3 };
    let mut model = EncoderOnlyConfig::new(InputKind::Tokens { vocab: 9 }, block(), 1, head)
        .init::<f32>(&mut rng)
        .unwrap();
    assert!(model.predict(&src.clone().into()).is_ok());
    assert!(poison(&mut model, "head") > 0);
    let err = model.predict(&src.into()).unwrap_err();
    assert!(matches!(err, Error::NonFinite { .. }), "{err}");
    assert!(err.to_string().contains("class logits of batch row 0"), "{err}");

    let mut model = DecoderOnlyConfig::new(9, block(), 1)
        .init::<f32>(&mut rng)
        .unwrap();
    assert!(poison(&mut model, "blocks") > 0);
    let err = model
        .generate(&[1, 2], 3, Sampling::Greedy, &mut rng)
        .unwrap_err();
    assert!(matches!(err, Error::NonFinite { .. }), "{err}");
}

#[test]
fn generate_checks_the_whole_prompt_at_its_own_positions() {
    let mut rng = StdRng::seed_from_u64(2);
    // A learned position table of 4: a prompt of 6 is cropped to its last 4 tokens.
    let model = DecoderOnlyConfig::new(9, block(), 1)
        .with_positions(Positions::Learned { max_len: 4 })
        .init::<f32>(&mut rng)
        .unwrap();
    assert!(
        model
            .generate(&[1, 2, 3, 4, 5, 6], 2, Sampling::Greedy, &mut rng)
            .is_ok()
    );
    // An id out of range before the window, then inside it.
    for (t, prompt) in [(0, [99, 2, 3, 4, 5, 6]), (4, [1, 2, 3, 4, 99, 6])] {
        match model.generate(&prompt, 2, Sampling::Greedy, &mut rng) {
            Err(Error::TokenOutOfRange { id, position, vocab }) => {
                assert_eq!((id, position, vocab), (99, (0, t), 9))
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn a_target_of_another_length_names_the_lengths() {
    let mut rng = StdRng::seed_from_u64(3);
    let model = DecoderOnlyConfig::new(9, block(), 1)
        .init::<f32>(&mut rng)
        .unwrap();
    let ids: Array2<usize> = array![[1, 2, 3]];
    let batch = LmBatch {
        input: TokenBatch::full(ids.clone()).unwrap(),
        target: TokenBatch::new(ids, vec![2]).unwrap(),
    };
    let mut grads = model.zeros_like();
    let err = vaswani::train::Trainable::accumulate(&model, &batch, 0.0, 1.0, &mut grads, &mut rng)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("sequence 0 has 2 real target tokens but 3 real input tokens"),
        "{err}"
    );
}
