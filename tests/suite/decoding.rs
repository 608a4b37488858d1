//! Decoding with the key/value cache gives what decoding without it gives.

use crate::common::on_threads;
use ndarray::{Array2, s};
use rand::{Rng, SeedableRng, rngs::StdRng};
use vaswani::Error;
use vaswani::blocks::BlockConfig;
use vaswani::models::{EncoderDecoder, EncoderDecoderConfig, Positions, TokenBatch};

fn model(norm_first: bool, positions: Positions) -> EncoderDecoder {
    EncoderDecoderConfig::new(
        17,
        19,
        BlockConfig::new(16, 4, 24).with_norm_first(norm_first),
        2,
        3,
    )
    .with_positions(positions)
    .init(&mut StdRng::seed_from_u64(70))
    .unwrap()
}

#[test]
fn each_cached_step_equals_the_full_prefix_decode() {
    for (norm_first, positions) in [
        (false, Positions::Sinusoidal),
        (true, Positions::Learned { max_len: 12 }),
    ] {
        let m = model(norm_first, positions);
        let src = TokenBatch::from_sequences(&[vec![3, 4, 5, 6, 7], vec![8, 9]], 0).unwrap();
        let memory = m.encode(&src).unwrap();
        let mut rng = StdRng::seed_from_u64(71);
        let tokens: Array2<usize> = Array2::from_shape_fn((2, 8), |_| rng.random_range(0..19));
        let mut state = m.begin_decode(&src, 3).unwrap(); // grows past 3
        for t in 0..8 {
            let step = m.decode_step(&mut state, &tokens.column(t).to_vec()).unwrap();
            let prefix = TokenBatch::full(tokens.slice(s![.., ..=t]).to_owned()).unwrap();
            let full = m
                .decode(&memory, &src, &prefix)
                .unwrap()
                .into_shape_with_order((2, t + 1, 19))
                .unwrap();
            let last = full.slice(s![.., t, ..]);
            // Equal to rounding: a step multiplies a few rows, which the small-row GEMM kernels
            // take, while the full pass may go through matrixmultiply, which rounds otherwise.
            let scale = last.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let err = (&step - &last).iter().fold(0.0f32, |m, e| m.max(e.abs()));
            assert!(
                err <= 1e-5 * scale,
                "step {t}: max difference {err} for logits up to {scale}"
            );
        }
        assert_eq!(state.len(), 8);
    }
}

#[test]
fn cached_greedy_equals_uncached_greedy() {
    let m = model(false, Positions::Sinusoidal);
    let mut rng = StdRng::seed_from_u64(72);
    let seqs: Vec<Vec<usize>> = (0..6)
        .map(|_| {
            (0..rng.random_range(1..8))
                .map(|_| rng.random_range(3..17))
                .collect()
        })
        .collect();
    let src = TokenBatch::from_sequences(&seqs, 0).unwrap();
    assert_eq!(
        m.begin_decode(&src, 10)
            .and_then(|state| vaswani::infer::greedy(state, 1, Some(2), 10))
            .unwrap(),
        vaswani::infer::greedy_uncached(&m, &src, 1, Some(2), 10).unwrap()
    );
}

#[test]
fn decode_errors() {
    let m = model(false, Positions::Learned { max_len: 3 });
    let src = TokenBatch::from_sequences(&[vec![3, 4]], 0).unwrap();
    let mut state = m.begin_decode(&src, 4).unwrap();
    assert!(matches!(
        m.decode_step(&mut state, &[1, 2]),
        Err(Error::ShapeMismatch { .. })
    ));
    assert_eq!(
        m.decode_step(&mut state, &[19]).unwrap_err(),
        Error::TokenOutOfRange {
            id: 19,
            position: (0, 0),
            vocab: 19
        }
    );
    for _ in 0..3 {
        m.decode_step(&mut state, &[1]).unwrap();
    }
    assert_eq!(
        m.decode_step(&mut state, &[1]).unwrap_err(),
        Error::SequenceTooLong { len: 4, max: 3 }
    );
    // A state carries its model's packed weights: another model refuses it.
    let other = model(false, Positions::Learned { max_len: 3 });
    let mut state = m.begin_decode(&src, 4).unwrap();
    assert!(matches!(
        other.decode_step(&mut state, &[1]),
        Err(Error::InvalidInput { .. })
    ));
    assert!(m.decode_step(&mut state, &[1]).is_ok());
}

#[test]
fn causal_encoder_steps_equal_the_full_causal_pass() {
    use ndarray::Array3;
    use vaswani::blocks::EncoderConfig;
    use vaswani::gradcheck::random_like;
    use vaswani::layers::Mask;
    for norm_first in [false, true] {
        let enc = EncoderConfig::new(BlockConfig::new(16, 4, 32).with_norm_first(norm_first), 2)
            .init(&mut StdRng::seed_from_u64(73))
            .unwrap();
        let x: Array3<f32> = random_like((3, 7, 16), &mut StdRng::seed_from_u64(74));
        let full = enc.infer(x.view(), &Mask::causal());
        let mut caches = enc.begin(3, 2);
        // Two positions, then one, then four: any split gives the same rows.
        let mut start = 0;
        for len in [2, 1, 4] {
            let step = enc.infer_step(x.slice(s![.., start..start + len, ..]), &mut caches);
            let want = full.slice(s![.., start..start + len, ..]);
            let err = (&step - &want).iter().fold(0.0f32, |a, e| a.max(e.abs()));
            assert!(err < 1e-5, "positions {start}..{}: {err}", start + len);
            start += len;
        }
    }
}

#[test]
fn cached_generation_equals_the_uncached_reference() {
    use vaswani::infer::Sampling;
    use vaswani::models::{DecoderOnly, DecoderOnlyConfig};
    // Sinusoidal positions take the cached path; a learned table too small for prompt and output
    // takes the cropping path. With the same sampling draws, a cached run and a run that
    // re-scores the whole sequence at each step agree.
    let lm: DecoderOnly = DecoderOnlyConfig::new(23, BlockConfig::new(16, 4, 32).with_norm_first(true), 2)
        .init(&mut StdRng::seed_from_u64(75))
        .unwrap();
    let prompt = [3, 7, 7, 1];
    let cached =
        vaswani::infer::continue_prompt(&lm, &prompt, 12, Sampling::Greedy, &mut StdRng::seed_from_u64(0))
            .unwrap();
    // Reference: greedy by hand over the whole sequence.
    let mut seq = prompt.to_vec();
    for _ in 0..12 {
        let logits = lm
            .infer(
                &TokenBatch::full(ndarray::Array2::from_shape_vec((1, seq.len()), seq.clone()).unwrap())
                    .unwrap(),
            )
            .unwrap();
        seq.push(vaswani::kernels::argmax(logits.row(seq.len() - 1)));
    }
    assert_eq!(cached, seq[prompt.len()..]);
    let sampled = vaswani::infer::continue_prompt(
        &lm,
        &prompt,
        12,
        Sampling::Temperature(0.9),
        &mut StdRng::seed_from_u64(1),
    )
    .unwrap();
    assert_eq!(sampled.len(), 12);
    let small: DecoderOnly = DecoderOnlyConfig::new(23, BlockConfig::new(16, 4, 32), 1)
        .with_positions(Positions::Learned { max_len: 6 })
        .init(&mut StdRng::seed_from_u64(76))
        .unwrap();
    assert_eq!(
        vaswani::infer::continue_prompt(
            &small,
            &prompt,
            10,
            Sampling::Greedy,
            &mut StdRng::seed_from_u64(0)
        )
        .unwrap()
        .len(),
        10
    );
}

#[test]
fn packed_model_gives_the_models_results() {
    for norm_first in [false, true] {
        let m = model(norm_first, Positions::Sinusoidal);
        let packed = m.packed();
        let src = TokenBatch::from_sequences(&[vec![3, 4, 5, 6, 7], vec![8, 9]], 0).unwrap();
        let tgt = TokenBatch::from_sequences(&[vec![1, 2, 3, 4], vec![1, 5]], 0).unwrap();
        // Teacher-forced logits: the same to rounding (the projections are fused and packed).
        let want = m.infer(&src, &tgt).unwrap();
        let got = packed.infer(&src, &tgt).unwrap();
        let scale = want.iter().fold(0.0f32, |s, v| s.max(v.abs()));
        let err = (&got - &want).iter().fold(0.0f32, |s, e| s.max(e.abs()));
        assert!(
            err <= 1e-5 * scale,
            "infer differs by {err} (logits up to {scale})"
        );
        // Decoding: the same tokens, and the steps of a packed decode equal the model's.
        assert_eq!(
            packed
                .begin_decode(&src, 6)
                .and_then(|state| vaswani::infer::greedy(state, 1, Some(2), 6))
                .unwrap(),
            m.begin_decode(&src, 6)
                .and_then(|state| vaswani::infer::greedy(state, 1, Some(2), 6))
                .unwrap()
        );
        let mut a = packed.begin_decode(&src, 4).unwrap();
        let mut b = m.begin_decode(&src, 4).unwrap();
        for tok in [1, 7, 3] {
            let x = m.decode_step(&mut a, &[tok, tok]).unwrap();
            let y = m.decode_step(&mut b, &[tok, tok]).unwrap();
            let err = (&x - &y).iter().fold(0.0f32, |s, e| s.max(e.abs()));
            assert!(err <= 1e-5 * scale.max(1.0), "step differs by {err}");
        }
    }
}

/// A packed model keeps a decode's key/value caches' memory for its next decode (the buffers
/// handed on, zeroed): decodes one after another on it, of one batch, of a smaller one, then
/// of the first again, give the first's logits bit for bit.
#[test]
fn decodes_one_after_another_on_a_packed_model_give_the_same_bits() {
    let m = model(false, Positions::Sinusoidal);
    let packed = m.packed();
    // 20 sequences of 16 features, room for 16 positions: buffers the workspace keeps.
    let src = TokenBatch::from_sequences(
        &(0..20)
            .map(|i| (0..3 + i % 5).map(|j| 3 + (i + j) % 14).collect())
            .collect::<Vec<Vec<usize>>>(),
        0,
    )
    .unwrap();
    let small = TokenBatch::from_sequences(&[vec![3, 4, 5]], 0).unwrap();
    let steps = |src: &TokenBatch| {
        let mut state = packed.begin_decode(src, 16).unwrap();
        (0..5)
            .map(|step| {
                let tokens: Vec<usize> = (0..src.batch_size()).map(|i| 1 + (i * 3 + step) % 17).collect();
                m.decode_step(&mut state, &tokens).unwrap()
            })
            .collect::<Vec<_>>()
    };
    let first = steps(&src);
    steps(&small);
    for again in [steps(&src), steps(&src)] {
        for (a, b) in first.iter().zip(&again) {
            assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()));
        }
    }
}

/// A decoding step of many sequences on a team runs in runs of sequences, one a thread, each
/// through every layer on its own; the logits keep the bits of one thread's whole step: for
/// runs of uneven length (27 sequences: 14 + 13 on two threads, 9 + 9 + 9 on three), sources
/// of different lengths (each run's memory mask cut from the batch's), one position a step and
/// a forced prefix of two, on the model's weights and on its packed ones.
#[test]
fn decoding_steps_have_the_same_bits_on_one_two_and_three_threads() {
    let m = model(false, Positions::Sinusoidal);
    let packed = m.packed();
    let b = 27;
    let src = TokenBatch::from_sequences(
        &(0..b)
            .map(|i| (0..1 + (i * 5) % 9).map(|j| 3 + (i + 2 * j) % 14).collect())
            .collect::<Vec<Vec<usize>>>(),
        0,
    )
    .unwrap();
    let prefix = Array2::from_shape_fn((b, 2), |(i, j)| 1 + (i + 3 * j) % 18);
    let run = || {
        let mut out = Vec::new();
        for state in [m.begin_decode(&src, 2), packed.begin_decode(&src, 2)] {
            let mut state = state.unwrap();
            out.push(m.decode_steps(&mut state, prefix.view()).unwrap());
            for step in 0..4 {
                let tokens: Vec<usize> = (0..b).map(|i| (i * 7 + step) % 19).collect();
                out.push(m.decode_step(&mut state, &tokens).unwrap());
            }
            assert_eq!(state.len(), 6);
        }
        out
    };
    let one = on_threads(1, run);
    for threads in [2, 3] {
        let many = on_threads(threads, run);
        for (i, (a, b)) in one.iter().zip(&many).enumerate() {
            assert!(
                a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "call {i}: logits on {threads} threads differ from one thread's"
            );
        }
    }
    // 5 sequences fed 8 positions at once on four threads: runs of 2 + 2 + 1, three runs
    // where the threads would allow four.
    let few = TokenBatch::from_sequences(&(0..5).map(|i| vec![3 + i; 2 + i]).collect::<Vec<_>>(), 0).unwrap();
    let prefix = Array2::from_shape_fn((5, 8), |(i, j)| 1 + (2 * i + j) % 18);
    let run = || {
        let mut state = m.begin_decode(&few, 8).unwrap();
        m.decode_steps(&mut state, prefix.view()).unwrap()
    };
    let one = on_threads(1, run);
    assert!(
        one.iter()
            .zip(&on_threads(4, run))
            .all(|(x, y)| x.to_bits() == y.to_bits()),
        "a forced prefix on four threads differs from one thread's"
    );
}
