//! The decoder-only language model: gradient checks through every parameter, causality,
//! padding, bad inputs, thread-count determinism and a learning test.

use std::time::Instant;

use ndarray::Array2;
use rand::{SeedableRng, rngs::StdRng};
use vaswani::blocks::BlockConfig;
use vaswani::gradcheck::{GradCheck, random_like};
use vaswani::infer::Sampling;
use vaswani::kernels::Activation;
use vaswani::models::{DecoderOnly, DecoderOnlyConfig, LmBatch, Positions, TokenBatch};
use vaswani::train::{AdamConfig, OptimizerConfig, Schedule, Trainable, Trainer, TrainerConfig};
use vaswani::{Error, Params};

/// Moves every parameter a little off its initial value (γ = 1, β = 0, zero biases) so that
/// the check runs at a generic point.
fn jitter<P: Params<f64>>(p: &mut P, rng: &mut StdRng) {
    p.visit_mut("", &mut |_, mut t| {
        let noise: ndarray::ArrayD<f64> = random_like(t.raw_dim(), rng);
        t.zip_mut_with(&noise, |a, n| *a += 0.05 * n);
    });
}

/// GELU rather than ReLU: a finite difference across a ReLU kink would fail the check
/// without any bug.
fn tiny_block(norm_first: bool) -> BlockConfig {
    BlockConfig::new(4, 2, 6)
        .with_p_drop(0.1)
        .with_norm_first(norm_first)
        .with_activation(Activation::Gelu)
}

/// Three sequences of different lengths: inputs of 4, 2 and 1 tokens, padded.
fn tiny_batch() -> LmBatch {
    LmBatch::from_sequences(&[vec![1, 2, 3, 4, 5], vec![6, 7, 8], vec![2, 5]], 0).unwrap()
}

/// The key bias of attention has a zero gradient by the mathematics: it adds q·b_k to every
/// score of a query row, and a softmax does not change when a constant is added to a row.
const EXEMPT: &[&str] = &["b_k"];

fn check_model(cfg: DecoderOnlyConfig) {
    let mut rng = StdRng::seed_from_u64(70);
    let mut model: DecoderOnly<f64> = cfg.init_as(&mut rng).unwrap();
    jitter(&mut model, &mut rng);
    let batch = tiny_batch();
    let mut grads = model.zeros_like();
    // Dropout is on (p = 0.1); the same seed gives the same masks in every evaluation.
    model
        .accumulate(&batch, 0.1, 1.0, &mut grads, &mut StdRng::seed_from_u64(5))
        .unwrap();
    let mut point = model.clone();
    let report = GradCheck::default().run(&mut point, &grads, |m| {
        let mut g = m.zeros_like();
        m.accumulate(&batch, 0.1, 1.0, &mut g, &mut StdRng::seed_from_u64(5))
            .unwrap()
            .loss
    });
    report.assert_ok();
    report.assert_all_nonzero_except(EXEMPT);
    // Every tensor of the model was checked.
    assert_eq!(report.tensors.len(), model.shapes().len());
}

fn all_variants(norm_first: bool) {
    for tied in [true, false] {
        for positions in [Positions::Sinusoidal, Positions::Learned { max_len: 6 }] {
            check_model(
                DecoderOnlyConfig::new(9, tiny_block(norm_first), 2)
                    .with_tie_output(tied)
                    .with_positions(positions),
            );
        }
    }
}

#[test]
fn gradients_post_norm_tied_and_untied_both_positions() {
    all_variants(false);
}

#[test]
fn gradients_pre_norm_tied_and_untied_both_positions() {
    all_variants(true);
}

#[test]
fn pre_norm_ends_with_a_layer_norm_and_post_norm_does_not() {
    let mut rng = StdRng::seed_from_u64(71);
    let pre: DecoderOnly = DecoderOnlyConfig::new(9, tiny_block(true), 2)
        .init(&mut rng)
        .unwrap();
    let post: DecoderOnly = DecoderOnlyConfig::new(9, tiny_block(false), 2)
        .init(&mut rng)
        .unwrap();
    let names = |m: &DecoderOnly| m.shapes().into_iter().map(|(n, _)| n).collect::<Vec<_>>();
    assert!(names(&pre).contains(&"blocks.norm.gamma".to_string()));
    assert!(!names(&post).iter().any(|n| n.starts_with("blocks.norm")));
    // Tied: no head; untied: head.weight [V, d_model].
    assert!(!names(&pre).iter().any(|n| n.starts_with("head")));
    let untied: DecoderOnly = DecoderOnlyConfig::new(9, tiny_block(false), 1)
        .with_tie_output(false)
        .init(&mut rng)
        .unwrap();
    assert!(untied.shapes().contains(&("head.weight".to_string(), vec![9, 4])));
}

#[test]
fn cost_counts_match_the_built_model() {
    let mut rng = StdRng::seed_from_u64(72);
    for cfg in [
        DecoderOnlyConfig::new(30, BlockConfig::new(16, 4, 24), 2),
        DecoderOnlyConfig::new(30, BlockConfig::new(16, 4, 24).with_norm_first(true), 3)
            .with_tie_output(false)
            .with_positions(Positions::Learned { max_len: 7 }),
        DecoderOnlyConfig::new(11, BlockConfig::new(8, 2, 12).with_bias(false), 1),
    ] {
        let model = cfg.init(&mut rng).unwrap();
        assert_eq!(cfg.cost(1, 1).params, model.num_params() as u64);
    }
    // WORKLOADS.md's FLOP model for the "tiny" sizes, by hand: per layer and sequence
    // 2·64·192·16 + 4·16·16·64 + 2·64·64·16 + 2·(2·64·256·16) = 1,638,400; two layers and the
    // output projection 2·64·100·16 = 204,800, for 16 sequences.
    let c = DecoderOnlyConfig::new(100, BlockConfig::new(64, 4, 256), 2).cost(16, 16);
    assert_eq!(c.forward_flops, 16 * (2 * 1_638_400 + 204_800));
    assert_eq!(c.train_flops, 3 * c.forward_flops);
}

fn small_model(positions: Positions, seed: u64) -> DecoderOnly<f32> {
    DecoderOnlyConfig::new(20, BlockConfig::new(16, 2, 32), 2)
        .with_positions(positions)
        .init(&mut StdRng::seed_from_u64(seed))
        .unwrap()
}

#[test]
fn changing_a_token_changes_no_earlier_logits() {
    let model = small_model(Positions::Sinusoidal, 73);
    let base = vec![3, 1, 4, 1, 5, 9, 2, 6];
    let t_len = base.len();
    let run_infer = |seq: &[usize]| {
        model
            .infer(&TokenBatch::from_sequences(&[seq], 0).unwrap())
            .unwrap()
    };
    // The training forward with dropout on: the masks depend on the seed only.
    let run_forward = |seq: &[usize]| {
        model
            .forward(
                &TokenBatch::from_sequences(&[seq], 0).unwrap(),
                &mut StdRng::seed_from_u64(3),
            )
            .unwrap()
            .0
    };
    for run in [&run_infer as &dyn Fn(&[usize]) -> Array2<f32>, &run_forward] {
        let before = run(&base);
        for t in 0..t_len {
            let mut changed = base.clone();
            changed[t] = 17;
            let after = run(&changed);
            for i in 0..t {
                assert_eq!(before.row(i), after.row(i), "position {i} saw token {t}");
            }
            assert_ne!(
                before.row(t),
                after.row(t),
                "position {t} did not see its own token"
            );
        }
    }
}

#[test]
fn padding_does_not_change_real_logits() {
    for positions in [Positions::Sinusoidal, Positions::Learned { max_len: 8 }] {
        let model = small_model(positions, 74);
        let alone = model
            .infer(&TokenBatch::from_sequences(&[vec![3, 4, 5]], 0).unwrap())
            .unwrap();
        // The same sequence second in a batch, padded (with an id outside the vocabulary,
        // which is never read) beside a longer one and an empty one.
        let batch = TokenBatch::from_sequences(&[vec![7, 7, 7, 7, 7, 7], vec![3, 4, 5], vec![]], 99).unwrap();
        let batched = model.infer(&batch).unwrap();
        let t = batch.seq_len();
        for i in 0..3 {
            for v in 0..20 {
                let (a, b) = (alone[[i, v]], batched[[t + i, v]]);
                assert!((a - b).abs() < 1e-5, "position {i}, token {v}: {a} vs {b}");
            }
        }
        // The empty sequence gives finite (meaningless) rows, not NaN.
        assert!(batched.iter().all(|v| v.is_finite()));
    }
}

#[test]
fn log_likelihood_and_bits_agree_with_the_logits() {
    let model = small_model(Positions::Sinusoidal, 75);
    let tokens = TokenBatch::from_sequences(&[vec![3, 4, 5, 6], vec![8, 9], vec![2]], 0).unwrap();
    let logits = model.infer(&tokens).unwrap();
    let lp = vaswani::train::log_softmax(logits.view());
    // Predicted: 4, 5, 6 after row 0's positions 0..3, and 9 after row 1's position 0.
    let t = tokens.seq_len();
    let expected = lp[[0, 4]] + lp[[1, 5]] + lp[[2, 6]] + lp[[t, 9]];
    let ll = model.log_likelihood(&tokens).unwrap();
    // The same terms in the same order: the same bits.
    assert_eq!(ll.to_bits(), expected.to_bits(), "{ll} vs {expected}");
    let bits = model.bits_per_token(&tokens).unwrap();
    assert!((bits - (-expected / 4.0 / std::f64::consts::LN_2)).abs() < 1e-9);
}

#[test]
fn lm_batch_shifts_by_one() {
    let b = LmBatch::from_sequences(&[vec![1, 2, 3, 4], vec![5, 6]], 0).unwrap();
    assert_eq!(b.input.sequence(0), vec![1, 2, 3]);
    assert_eq!(b.target.sequence(0), vec![2, 3, 4]);
    assert_eq!((b.input.sequence(1), b.target.sequence(1)), (vec![5], vec![6]));
    assert_eq!(DecoderOnly::<f32>::batch_tokens(&b), 4);
}

#[test]
fn sampling_is_seeded_and_respects_top_k() {
    let logits = ndarray::arr1(&[0.5_f32, 2.0, 2.0, -1.0, 1.0]);
    assert_eq!(
        Sampling::Greedy
            .pick(logits.view(), &mut StdRng::seed_from_u64(0))
            .unwrap(),
        1
    );
    let draws = |s: Sampling, seed: u64| {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..200)
            .map(|_| s.pick(logits.view(), &mut rng).unwrap())
            .collect::<Vec<_>>()
    };
    let t = Sampling::Temperature(1.0);
    assert_eq!(draws(t, 1), draws(t, 1));
    assert!(
        (0..5).all(|j| draws(t, 1).contains(&j)),
        "every token has a chance"
    );
    // k = 2 keeps the two tied highest logits (ids 1 and 2) and nothing else.
    let k2 = draws(
        Sampling::TopK {
            k: 2,
            temperature: 1.0,
        },
        2,
    );
    assert!(k2.iter().all(|&j| j == 1 || j == 2) && k2.contains(&1) && k2.contains(&2));
    // A tiny temperature is greedy in effect; k ≥ V keeps everything.
    assert!(
        draws(Sampling::Temperature(1e-3), 3)
            .iter()
            .all(|&j| j == 1 || j == 2)
    );
    assert_eq!(
        draws(
            Sampling::TopK {
                k: 99,
                temperature: 1.0
            },
            4
        ),
        draws(t, 4)
    );
    let nan = ndarray::arr1(&[0.0_f32, f32::NAN]);
    assert!(matches!(
        Sampling::Greedy.pick(nan.view(), &mut StdRng::seed_from_u64(0)),
        Err(Error::NonFinite { .. })
    ));
}

#[test]
fn generation_is_seeded_and_crops_to_a_learned_table() {
    let model = small_model(Positions::Learned { max_len: 5 }, 76);
    // A prompt longer than the table, and generation far past it: the context is cropped.
    let prompt = [1, 2, 3, 4, 5, 6, 7];
    let sample = |seed| {
        vaswani::infer::continue_prompt(
            &model,
            &prompt,
            12,
            Sampling::Temperature(0.8),
            &mut StdRng::seed_from_u64(seed),
        )
        .unwrap()
    };
    let (a, b) = (sample(8), sample(8));
    assert_eq!(a.len(), 12);
    assert_eq!(a, b);
    assert!(a.iter().all(|&id| id < 20));
    // Cropping: the prompt reads as its last max_len = 5 tokens.
    let greedy = |p: &[usize]| {
        vaswani::infer::continue_prompt(&model, p, 3, Sampling::Greedy, &mut StdRng::seed_from_u64(0))
            .unwrap()
    };
    assert_eq!(greedy(&prompt), greedy(&prompt[2..]));
    // Greedy: the first token is the arg-max of the last position's logits.
    let g = vaswani::infer::continue_prompt(
        &model,
        &[3, 4],
        1,
        Sampling::Greedy,
        &mut StdRng::seed_from_u64(0),
    )
    .unwrap();
    let logits = model
        .infer(&TokenBatch::from_sequences(&[vec![3, 4]], 0).unwrap())
        .unwrap();
    let best = (0..20)
        .max_by(|&i, &j| logits[[1, i]].total_cmp(&logits[[1, j]]).then(j.cmp(&i)))
        .unwrap();
    assert_eq!(g, vec![best]);
    assert_eq!(
        vaswani::infer::continue_prompt(&model, &[3], 0, Sampling::Greedy, &mut StdRng::seed_from_u64(0))
            .unwrap(),
        Vec::<usize>::new()
    );
}

#[test]
fn bad_inputs_are_typed_errors() {
    let model = small_model(Positions::Learned { max_len: 6 }, 77);
    let mut rng = StdRng::seed_from_u64(78);
    // 1: a token id out of range, with its position and the vocabulary size.
    let bad = TokenBatch::from_sequences(&[vec![1, 2], vec![3, 20]], 0).unwrap();
    let oor = Error::TokenOutOfRange {
        id: 20,
        position: (1, 1),
        vocab: 20,
    };
    assert_eq!(model.infer(&bad).unwrap_err(), oor);
    assert_eq!(model.forward(&bad, &mut rng).unwrap_err(), oor);
    assert_eq!(model.log_likelihood(&bad).unwrap_err(), oor);
    assert_eq!(
        vaswani::infer::continue_prompt(&model, &[1, 2, 25], 3, Sampling::Greedy, &mut rng).unwrap_err(),
        Error::TokenOutOfRange {
            id: 25,
            position: (0, 2),
            vocab: 20
        }
    );
    // ... in a target too.
    let batch = LmBatch::from_sequences(&[vec![1, 2, 21]], 0).unwrap();
    let mut g = model.zeros_like();
    assert_eq!(
        model.accumulate(&batch, 0.0, 1.0, &mut g, &mut rng).unwrap_err(),
        Error::TokenOutOfRange {
            id: 21,
            position: (0, 1),
            vocab: 20
        }
    );
    // Targets that do not line up with the inputs.
    let skewed = LmBatch {
        input: TokenBatch::from_sequences(&[vec![1, 2]], 0).unwrap(),
        target: TokenBatch::from_sequences(&[vec![1, 2, 3]], 0).unwrap(),
    };
    assert!(matches!(
        model.accumulate(&skewed, 0.0, 1.0, &mut g, &mut rng),
        Err(Error::ShapeMismatch { .. })
    ));

    // 8: longer than the learned table, naming both lengths; in training too.
    let long = TokenBatch::from_sequences(&[vec![1; 7]], 0).unwrap();
    assert_eq!(
        model.infer(&long).unwrap_err(),
        Error::SequenceTooLong { len: 7, max: 6 }
    );
    // Scoring reads all but the last token: max_len + 1 tokens fit, one more does not.
    assert!(model.log_likelihood(&long).is_ok());
    let longer = TokenBatch::from_sequences(&[vec![1; 8]], 0).unwrap();
    assert_eq!(
        model.log_likelihood(&longer).unwrap_err(),
        Error::SequenceTooLong { len: 8, max: 7 }
    );
    let long = LmBatch::from_sequences(&[vec![1; 8]], 0).unwrap();
    assert_eq!(
        model.accumulate(&long, 0.0, 1.0, &mut g, &mut rng).unwrap_err(),
        Error::SequenceTooLong { len: 7, max: 6 }
    );
    // Nothing was added to the gradients by the refused batches.
    assert!(g.sq_norm() == 0.0);

    // 7: empty batches and sequences.
    assert!(matches!(
        LmBatch::from_sequences::<Vec<usize>>(&[], 0),
        Err(Error::InvalidInput { .. })
    ));
    assert!(matches!(
        LmBatch::from_sequences(&[vec![1, 2], vec![3]], 0),
        Err(Error::InvalidInput { .. })
    ));
    assert!(matches!(
        vaswani::infer::continue_prompt(&model, &[], 3, Sampling::Greedy, &mut rng),
        Err(Error::InvalidInput { .. })
    ));
    let short = TokenBatch::from_sequences(&[vec![4], vec![]], 0).unwrap();
    assert!(matches!(
        model.bits_per_token(&short),
        Err(Error::InvalidInput { .. })
    ));
    assert_eq!(model.log_likelihood(&short).unwrap(), 0.0);
    // A batch whose every sequence is empty (T = 0) has no logits at all.
    let empty = TokenBatch::from_sequences(&[Vec::<usize>::new(), vec![]], 0).unwrap();
    assert_eq!(model.infer(&empty).unwrap().dim(), (0, 20));

    // 3: zero sizes.
    let block = || BlockConfig::new(8, 2, 8);
    let field = |cfg: DecoderOnlyConfig| match cfg.init(&mut StdRng::seed_from_u64(0)) {
        Err(Error::InvalidConfig { field, .. }) => field,
        other => panic!("expected a config error, got {other:?}"),
    };
    assert_eq!(field(DecoderOnlyConfig::new(0, block(), 1)), "vocab");
    assert_eq!(field(DecoderOnlyConfig::new(10, block(), 0)), "n_layers");
    assert_eq!(
        field(DecoderOnlyConfig::new(10, block(), 1).with_positions(Positions::Learned { max_len: 0 })),
        "max_len"
    );
    assert_eq!(
        field(DecoderOnlyConfig::new(10, BlockConfig::new(0, 2, 8), 1)),
        "d_model"
    );
    assert_eq!(
        field(DecoderOnlyConfig::new(10, BlockConfig::new(8, 0, 8), 1)),
        "n_heads"
    );
    assert_eq!(
        field(DecoderOnlyConfig::new(10, BlockConfig::new(8, 2, 0), 1)),
        "d_ff"
    );
    // 4: out-of-range hyper-parameters.
    for p in [1.0, -0.1, f32::NAN] {
        assert_eq!(
            field(DecoderOnlyConfig::new(10, block().with_p_drop(p), 1)),
            "p_drop"
        );
    }
    for eps in [0.0, -1e-5, f32::NAN] {
        assert_eq!(field(DecoderOnlyConfig::new(10, block().with_eps(eps), 1)), "eps");
    }
    for t in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        for s in [Sampling::Temperature(t), Sampling::TopK { k: 3, temperature: t }] {
            assert!(matches!(
                vaswani::infer::continue_prompt(&model, &[1], 2, s, &mut rng),
                Err(Error::InvalidConfig {
                    field: "temperature",
                    ..
                })
            ));
        }
    }
    assert!(matches!(
        vaswani::infer::continue_prompt(
            &model,
            &[1],
            2,
            Sampling::TopK {
                k: 0,
                temperature: 1.0
            },
            &mut rng
        ),
        Err(Error::InvalidConfig { field: "top_k", .. })
    ));
    let mut cfg = TrainerConfig::paper(8, 10);
    cfg.label_smoothing = 1.0;
    assert!(matches!(
        Trainer::new(model.clone(), cfg),
        Err(Error::InvalidConfig {
            field: "label_smoothing",
            ..
        })
    ));
}

#[test]
fn same_bits_with_one_two_and_three_threads() {
    let cfg = DecoderOnlyConfig::new(50, BlockConfig::new(64, 4, 128).with_norm_first(true), 2)
        .with_positions(Positions::Learned { max_len: 40 });
    let model: DecoderOnly = cfg.init(&mut StdRng::seed_from_u64(79)).unwrap();
    let seqs: Vec<Vec<usize>> = (0..4)
        .map(|b| (0..34 - 5 * b).map(|i| (i * 7 + b * 3) % 50).collect())
        .collect();
    let batch = LmBatch::from_sequences(&seqs, 0).unwrap();
    let run = || {
        let mut rng = StdRng::seed_from_u64(80);
        let (logits, cache) = model.forward(&batch.input, &mut rng).unwrap();
        let mut g = model.zeros_like();
        let stats = model.accumulate(&batch, 0.1, 0.5, &mut g, &mut rng).unwrap();
        model.backward(&cache, logits.view(), &mut g);
        let text =
            vaswani::infer::continue_prompt(&model, &[1, 2, 3], 8, Sampling::Temperature(1.0), &mut rng)
                .unwrap();
        let ll = model
            .log_likelihood(&TokenBatch::from_sequences(&seqs, 0).unwrap())
            .unwrap();
        (logits, g, stats.loss, text, ll)
    };
    let pool = |n| rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap();
    let one = pool(1).install(run);
    // Two threads run a layer's weight and input gradients side by side, each product offering
    // its blocks to the thread done first; three split every product between them.
    for threads in [2, 3] {
        let other = pool(threads).install(run);
        assert_eq!(one.0, other.0, "logits, {threads} threads");
        assert!(one.1 == other.1, "gradients differ, {threads} threads");
        assert_eq!(one.2.to_bits(), other.2.to_bits(), "loss, {threads} threads");
        assert_eq!(one.3, other.3, "generated tokens, {threads} threads");
        assert_eq!(
            one.4.to_bits(),
            other.4.to_bits(),
            "log-likelihood, {threads} threads"
        );
    }
}

/// A generation step of many sequences on a team runs in runs of sequences, one a thread,
/// each through every layer, with the weights packed once for the generation: the logits keep
/// the bits of one thread's (27 sequences: 14 + 13 on two threads, 9 + 9 + 9 on three; a
/// prompt of five positions in one pass, then single positions, the caches growing past
/// their first capacity) and equal the whole sequences' logits to rounding.
#[test]
fn generation_steps_have_the_same_bits_on_one_two_and_three_threads() {
    let cfg = DecoderOnlyConfig::new(50, BlockConfig::new(32, 4, 64), 2);
    let model: DecoderOnly = cfg.init(&mut StdRng::seed_from_u64(81)).unwrap();
    let b = 27;
    let tokens = Array2::from_shape_fn((b, 9), |(i, j)| (i * 7 + j * 3 + i * j) % 50);
    let run = || {
        let mut state = model.begin_generate(b, 4);
        let mut out = vec![
            model
                .generate_steps(&mut state, tokens.slice(ndarray::s![.., ..5]))
                .unwrap(),
        ];
        for j in 5..9 {
            out.push(
                model
                    .generate_steps(&mut state, tokens.slice(ndarray::s![.., j..j + 1]))
                    .unwrap(),
            );
        }
        out
    };
    let pool = |n| rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap();
    let one = pool(1).install(run);
    for threads in [2, 3] {
        let other = pool(threads).install(run);
        for (k, (a, o)) in one.iter().zip(&other).enumerate() {
            assert!(
                a.iter().zip(o).all(|(x, y)| x.to_bits() == y.to_bits()),
                "call {k}: logits on {threads} threads differ from one thread's"
            );
        }
    }
    let full = model.infer(&TokenBatch::full(tokens).unwrap()).unwrap();
    for (k, step) in one.iter().enumerate() {
        let pos = 4 + k;
        for i in 0..b {
            let want = full.row(i * 9 + pos);
            let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let err = (&step.row(i) - &want).iter().fold(0.0f32, |m, e| m.max(e.abs()));
            assert!(
                err <= 1e-5 * scale,
                "position {pos} of sequence {i}: {err} from the whole sequence's logits (up to {scale})"
            );
        }
    }
}

/// The counting language: `x_t = (s + t·d) mod 10` for a start s and a step d ∈ {1, 2, 3}.
/// The first target (x₁ after x₀) is a guess among the 3 steps; every later token follows
/// from the two before it, which the model must find by attention.
fn counting(s: usize, d: usize, len: usize) -> Vec<usize> {
    (0..len).map(|t| (s + t * d) % 10).collect()
}

#[test]
fn learns_counting_sequences_and_generates_them() {
    let start = Instant::now();
    const LEN: usize = 16;
    let mut rng = StdRng::seed_from_u64(2017);
    let block = BlockConfig::new(32, 4, 64).with_p_drop(0.0).with_norm_first(true);
    let model: DecoderOnly = DecoderOnlyConfig::new(10, block, 2).init(&mut rng).unwrap();
    let cfg = TrainerConfig {
        optimizer: OptimizerConfig::Adam(AdamConfig::paper()),
        schedule: Schedule::Cosine {
            peak: 3e-3,
            warmup: 30,
            total: 300,
            min: 1e-4,
        },
        clip_norm: Some(1.0),
        label_smoothing: 0.0,
        precision: vaswani::Precision::F32,
    };
    let mut trainer = Trainer::new(model, cfg).unwrap();
    // Every sequence of the language, in every batch.
    let all: Vec<Vec<usize>> = (0..10)
        .flat_map(|s| (1..=3).map(move |d| counting(s, d, LEN)))
        .collect();
    let batch = LmBatch::from_sequences(&all, 0).unwrap();
    let mut last = f64::NAN;
    for _ in 0..300 {
        last = trainer
            .step(std::slice::from_ref(&batch), &mut rng)
            .unwrap()
            .loss
            .loss;
    }
    // The floor: ln 3 for the first target of each sequence, 0 for the other LEN − 2.
    let floor = 3f64.ln() / (LEN - 1) as f64;
    let model = &trainer.model;
    let mut exact = 0;
    for seq in &all {
        let generated =
            vaswani::infer::continue_prompt(model, &seq[..2], LEN - 2, Sampling::Greedy, &mut rng).unwrap();
        exact += usize::from(generated == seq[2..]);
    }
    // The deterministic part alone: bits per token of x₂… given x₀, x₁.
    let tokens = TokenBatch::from_sequences(&all, 0).unwrap();
    let ll_all = model.log_likelihood(&tokens).unwrap();
    let firsts = TokenBatch::from_sequences(&all.iter().map(|s| &s[..2]).collect::<Vec<_>>(), 0).unwrap();
    let ll_first = model.log_likelihood(&firsts).unwrap();
    let nats_after = -(ll_all - ll_first) / (all.len() * (LEN - 2)) as f64;
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "counting: final loss {last:.4} (floor {floor:.4}), {nats_after:.2e} nats/token after the \
         first two, {exact}/30 generated exactly, {secs:.1} s"
    );
    assert_eq!(exact, 30, "final loss {last}");
    assert!(nats_after < 0.01, "{nats_after}");
    assert!(last < floor + 0.02, "final loss {last}, floor {floor}");
    assert!(secs < 10.0, "took {secs:.1} s");
}

/// A model packed once gives the model's results: teacher-forced logits and log-likelihoods
/// to rounding (its layers' products fused and packed), and generation step for step with
/// the same bits as a generation that packs its own weights, once and again from the same
/// packing; in bf16 as in `f32`.
#[test]
fn packed_model_gives_the_models_results() {
    use vaswani::kernels::precision::{Precision, with_precision};
    let model = small_model(Positions::Sinusoidal, 5);
    let tokens = TokenBatch::from_sequences(&[vec![3, 1, 4, 1, 5, 9], vec![2, 6, 5]], 0).unwrap();
    for precision in [Precision::F32, Precision::Bf16] {
        let packed = with_precision(precision, || model.packed());
        let want = with_precision(precision, || model.infer(&tokens)).unwrap();
        let got = packed.infer(&tokens).unwrap();
        let scale = want.iter().fold(0.0f32, |s, v| s.max(v.abs()));
        let err = (&got - &want).iter().fold(0.0f32, |s, e| s.max(e.abs()));
        let tol = if precision == Precision::F32 { 1e-5 } else { 1e-2 };
        assert!(
            err <= tol * scale,
            "{precision:?}: infer differs by {err} (logits up to {scale})"
        );
        let (ll, bits) = (
            packed.log_likelihood(&tokens).unwrap(),
            packed.bits_per_token(&tokens).unwrap(),
        );
        let want_ll = with_precision(precision, || model.log_likelihood(&tokens)).unwrap();
        assert!(
            (ll - want_ll).abs() <= tol as f64 * want_ll.abs(),
            "{precision:?}: {ll} vs {want_ll}"
        );
        assert!((bits + ll / (6.0 - 1.0 + 3.0 - 1.0) / std::f64::consts::LN_2).abs() < 1e-12);
        // Steps of a generation from the packing, twice, against one packing its own weights.
        let feed = Array2::from_shape_fn((2, 7), |(i, j)| (3 * i + 5 * j) % 20);
        let steps = |mut state: vaswani::models::GenerateState<'_, f32>| {
            let mut out = vec![
                model
                    .generate_steps(&mut state, feed.slice(ndarray::s![.., ..3]))
                    .unwrap(),
            ];
            for j in 3..7 {
                out.push(
                    model
                        .generate_steps(&mut state, feed.slice(ndarray::s![.., j..j + 1]))
                        .unwrap(),
                );
            }
            out
        };
        let own = with_precision(precision, || steps(model.begin_generate(2, 4)));
        for round in 0..2 {
            let from_packed = steps(packed.begin_generate(2, 4));
            for (k, (a, b)) in own.iter().zip(&from_packed).enumerate() {
                assert!(
                    a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{precision:?}, generation {round}, call {k}: logits differ"
                );
            }
        }
        let prompts = [vec![3, 1, 4], vec![2]];
        let generate = |state| {
            vaswani::infer::generate(
                state,
                &prompts,
                Sampling::Greedy,
                None,
                6,
                &mut StdRng::seed_from_u64(1),
            )
            .unwrap()
        };
        assert_eq!(
            generate(packed.begin_generate(2, 9)),
            with_precision(precision, || generate(model.begin_generate(2, 9)))
        );
    }
    // Bad input: the model's typed errors.
    let bad = TokenBatch::from_sequences(&[vec![3, 25]], 0).unwrap();
    assert!(matches!(
        model.packed().infer(&bad),
        Err(Error::TokenOutOfRange { .. })
    ));
}
