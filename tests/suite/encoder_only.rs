//! The encoder-only model: gradient checks through every parameter, padding invariance,
//! input errors (BAD_INPUTS.md), determinism across thread counts, and a learning test.

use std::f64::consts::PI;
use std::time::Instant;

use ndarray::{Array2, Array3, ArrayD};
use rand::{Rng, SeedableRng, rngs::StdRng};
use vaswani::blocks::{BlockConfig, FinalNorm};
use vaswani::gradcheck::{GradCheck, random_like};
use vaswani::kernels::Activation;
use vaswani::models::{
    EncoderInput, EncoderOnly, EncoderOnlyConfig, FeatureBatch, Head, InputKind, LabeledBatch, Pooling,
    Positions, Targets, TokenBatch,
};
use vaswani::train::{AdamConfig, OptimizerConfig, Schedule, Trainable, Trainer, TrainerConfig};
use vaswani::{Error, Float, Params};

fn jitter<P: Params<f64>>(p: &mut P, rng: &mut StdRng) {
    p.visit_mut("", &mut |_, mut t| {
        let noise: ndarray::ArrayD<f64> = random_like(t.raw_dim(), rng);
        t.zip_mut_with(&noise, |a, n| *a += 0.05 * n);
    });
}

/// GELU, not ReLU: the finite differences must not straddle a kink.
fn tiny_block(norm_first: bool) -> BlockConfig {
    BlockConfig::new(4, 2, 6)
        .with_p_drop(0.1)
        .with_norm_first(norm_first)
        .with_activation(Activation::Gelu)
}

/// Checks the gradient of the training loss (with label smoothing 0.1 for classifiers)
/// against central differences for every parameter, with dropout on a fixed seed.
fn check_model(cfg: EncoderOnlyConfig, batch: &LabeledBatch<f64>) {
    let mut rng = StdRng::seed_from_u64(70);
    let mut model: EncoderOnly<f64> = cfg.init_as(&mut rng).unwrap();
    // Away from the initial values (zero biases, unit gains), where some gradients vanish by
    // symmetry.
    jitter(&mut model, &mut rng);
    let mut grads = model.zeros_like();
    model
        .accumulate(batch, 0.1, 1.0, &mut grads, &mut StdRng::seed_from_u64(5))
        .unwrap();
    let mut point = model.clone();
    let report = GradCheck::default().run(&mut point, &grads, |m| {
        let mut g = m.zeros_like();
        m.accumulate(batch, 0.1, 1.0, &mut g, &mut StdRng::seed_from_u64(5))
            .unwrap()
            .loss
    });
    report.assert_ok();
    // b_k adds q·b_k to every score of a query row; softmax is invariant to that, so its
    // gradient is exactly zero.
    report.assert_all_nonzero_except(&["b_k"]);
}

/// Three sequences of different lengths: rows 1 and 2 are padded.
fn tiny_tokens() -> TokenBatch {
    TokenBatch::from_sequences(&[vec![3, 4, 5, 6], vec![7, 3], vec![1, 8, 2]], 0).unwrap()
}

fn tiny_features(d_in: usize, rng: &mut StdRng) -> FeatureBatch<f64> {
    FeatureBatch::new(random_like((3, 4, d_in), rng), vec![4, 2, 3]).unwrap()
}

#[test]
fn gradients_tokens_mean_pooling_classification_post_norm() {
    let cfg = EncoderOnlyConfig::new(
        InputKind::Tokens { vocab: 9 },
        tiny_block(false),
        2,
        Head::Classify { classes: 3 },
    );
    check_model(
        cfg,
        &LabeledBatch::new(tiny_tokens(), Targets::Classes(vec![2, 0, 1])),
    );
}

#[test]
fn gradients_features_first_pooling_regression_pre_norm_learned_positions() {
    let mut rng = StdRng::seed_from_u64(71);
    let cfg = EncoderOnlyConfig::new(
        InputKind::Features { d_in: 3 },
        tiny_block(true),
        2,
        Head::Regress { outputs: 2 },
    )
    .with_pooling(Pooling::First)
    .with_positions(Positions::Learned { max_len: 5 });
    let x = tiny_features(3, &mut rng);
    let y: Array2<f64> = random_like((3, 2), &mut rng);
    check_model(cfg, &LabeledBatch::new(x, Targets::Values(y)));
}

#[test]
fn gradients_features_mean_pooling_classification_final_norm_always() {
    let mut rng = StdRng::seed_from_u64(72);
    let cfg = EncoderOnlyConfig::new(
        InputKind::Features { d_in: 2 },
        tiny_block(false),
        1,
        Head::Classify { classes: 4 },
    )
    .with_final_norm(FinalNorm::Always);
    let x = tiny_features(2, &mut rng);
    check_model(cfg, &LabeledBatch::new(x, Targets::Classes(vec![3, 0, 3])));
}

#[test]
fn cost_counts_match_the_built_model() {
    let mut rng = StdRng::seed_from_u64(73);
    for cfg in [
        EncoderOnlyConfig::new(
            InputKind::Tokens { vocab: 30 },
            BlockConfig::new(16, 4, 24),
            2,
            Head::Classify { classes: 5 },
        ),
        EncoderOnlyConfig::new(
            InputKind::Features { d_in: 6 },
            BlockConfig::new(16, 4, 24).with_norm_first(true).with_bias(false),
            3,
            Head::Regress { outputs: 2 },
        )
        .with_positions(Positions::Learned { max_len: 7 })
        .with_pooling(Pooling::First),
        EncoderOnlyConfig::new(
            InputKind::Features { d_in: 1 },
            BlockConfig::new(8, 2, 8),
            1,
            Head::Classify { classes: 1 },
        )
        .with_final_norm(FinalNorm::Always),
    ] {
        let model = cfg.init(&mut rng).unwrap();
        assert_eq!(cfg.cost(1, 1).params, model.num_params() as u64, "{cfg:?}");
    }
    // By hand: d = 8, d_ff = 16, d_in = 3, 2 outputs, 1 layer, B = 2, T = 5.
    // projection 2·3·8·5 = 240; layer 2·8·24·5 + 4·5·5·8 + 2·8·8·5 + 2·8·16·5 + 2·16·8·5
    // = 1920 + 800 + 640 + 1280 + 1280 = 5920; head 2·8·2 = 32; per sequence 6192.
    let cfg = EncoderOnlyConfig::new(
        InputKind::Features { d_in: 3 },
        BlockConfig::new(8, 2, 16),
        1,
        Head::Regress { outputs: 2 },
    );
    let c = cfg.cost(2, 5);
    assert_eq!((c.forward_flops, c.train_flops), (2 * 6192, 6 * 6192));
}

fn small_model(input: InputKind, pooling: Pooling, rng: &mut StdRng) -> EncoderOnly<f32> {
    EncoderOnlyConfig::new(
        input,
        BlockConfig::new(8, 2, 16),
        2,
        Head::Classify { classes: 3 },
    )
    .with_pooling(pooling)
    .init(rng)
    .unwrap()
}

#[test]
fn a_sequence_alone_and_padded_in_a_batch_give_the_same_output() {
    let mut rng = StdRng::seed_from_u64(74);
    for pooling in [Pooling::Mean, Pooling::First] {
        let model = small_model(InputKind::Tokens { vocab: 12 }, pooling, &mut rng);
        let alone = model
            .infer(TokenBatch::from_sequences(&[vec![3, 4, 5]], 0).unwrap())
            .unwrap();
        let batch = TokenBatch::from_sequences(&[vec![7, 7, 7, 7, 7, 7], vec![3, 4, 5]], 9).unwrap();
        let batched = model.infer(batch).unwrap();
        for (a, b) in alone.row(0).iter().zip(batched.row(1)) {
            assert!((a - b).abs() < 1e-5, "{pooling:?}: {a} vs {b}");
        }

        let model = small_model(InputKind::Features { d_in: 3 }, pooling, &mut rng);
        let x: Array3<f32> = random_like((1, 4, 3), &mut rng);
        let alone = model
            .infer(FeatureBatch::new(x.clone(), vec![4]).unwrap())
            .unwrap();
        let mut padded: Array3<f32> = random_like((2, 7, 3), &mut rng);
        padded
            .slice_mut(ndarray::s![1, ..4, ..])
            .assign(&x.slice(ndarray::s![0, .., ..]));
        let batched = model
            .infer(FeatureBatch::new(padded, vec![7, 4]).unwrap())
            .unwrap();
        for (a, b) in alone.row(0).iter().zip(batched.row(1)) {
            assert!((a - b).abs() < 1e-5, "{pooling:?}: {a} vs {b}");
        }
    }
}

/// Outputs and every gradient of one training pass, as bit patterns.
fn outputs_and_grads<F: Float>(model: &EncoderOnly<F>, batch: &LabeledBatch<F>) -> (Vec<u64>, Vec<u64>) {
    let (y, cache) = model
        .forward(&batch.input, &mut StdRng::seed_from_u64(9))
        .unwrap();
    let r: Array2<F> = random_like(y.dim(), &mut StdRng::seed_from_u64(10));
    let mut g = model.zeros_like();
    model.backward(&cache, r.view(), &mut g);
    let mut grads = Vec::new();
    g.visit("", &mut |_, t| {
        grads.extend(t.iter().map(|v| v.to_f64().to_bits()))
    });
    // Through the trainer's path too.
    model
        .accumulate(batch, 0.1, 0.5, &mut g, &mut StdRng::seed_from_u64(11))
        .unwrap();
    g.visit("", &mut |_, t| {
        grads.extend(t.iter().map(|v| v.to_f64().to_bits()))
    });
    (y.iter().map(|v| v.to_f64().to_bits()).collect(), grads)
}

#[test]
fn nan_in_padded_feature_rows_changes_no_output_and_no_gradient() {
    let mut rng = StdRng::seed_from_u64(75);
    for pooling in [Pooling::Mean, Pooling::First] {
        let model: EncoderOnly<f32> = EncoderOnlyConfig::new(
            InputKind::Features { d_in: 3 },
            BlockConfig::new(8, 2, 16).with_p_drop(0.1),
            2,
            Head::Classify { classes: 3 },
        )
        .with_pooling(pooling)
        .init(&mut rng)
        .unwrap();
        let clean: Array3<f32> = random_like((3, 5, 3), &mut rng);
        let lengths = vec![5, 2, 0];
        let mut dirty = clean.clone();
        dirty.slice_mut(ndarray::s![1, 2.., ..]).fill(f32::NAN);
        dirty.slice_mut(ndarray::s![2, .., ..]).fill(f32::INFINITY);
        let targets = Targets::Classes(vec![0, 1, 2]);
        let a = LabeledBatch::new(
            FeatureBatch::new(clean, lengths.clone()).unwrap(),
            targets.clone(),
        );
        let b = LabeledBatch::new(FeatureBatch::new(dirty, lengths).unwrap(), targets);
        let (ya, ga) = outputs_and_grads(&model, &a);
        let (yb, gb) = outputs_and_grads(&model, &b);
        assert!(ya == yb, "{pooling:?}: outputs differ");
        assert!(ga == gb, "{pooling:?}: gradients differ");
        assert!(ga.iter().all(|&v| f64::from_bits(v).is_finite()));
    }
}

#[test]
fn bitwise_identical_for_one_and_two_threads() {
    let mut rng = StdRng::seed_from_u64(76);
    // Big enough that the GEMMs and row loops are split across the pool.
    let model: EncoderOnly<f32> = EncoderOnlyConfig::new(
        InputKind::Features { d_in: 6 },
        BlockConfig::new(64, 4, 128).with_p_drop(0.1),
        2,
        Head::Classify { classes: 5 },
    )
    .init(&mut rng)
    .unwrap();
    let lengths: Vec<usize> = (0..16).map(|i| 20 + i % 9).collect();
    let x: Array3<f32> = random_like((16, 28, 6), &mut rng);
    let labels = (0..16).map(|i| i % 5).collect();
    let batch = LabeledBatch::new(FeatureBatch::new(x, lengths).unwrap(), Targets::Classes(labels));
    let run = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| outputs_and_grads(&model, &batch))
    };
    let (y1, g1) = run(1);
    let (y2, g2) = run(2);
    assert!(y1 == y2, "outputs differ between 1 and 2 threads");
    assert!(g1 == g2, "gradients differ between 1 and 2 threads");
}

#[test]
fn bad_inputs_are_typed_errors() {
    let mut rng = StdRng::seed_from_u64(77);
    let block = BlockConfig::new(8, 2, 8);
    let tokens: EncoderOnly<f32> = EncoderOnlyConfig::new(
        InputKind::Tokens { vocab: 10 },
        block.clone(),
        1,
        Head::Classify { classes: 3 },
    )
    .with_positions(Positions::Learned { max_len: 5 })
    .init(&mut rng)
    .unwrap();
    let features: EncoderOnly<f32> = EncoderOnlyConfig::new(
        InputKind::Features { d_in: 3 },
        block.clone(),
        1,
        Head::Regress { outputs: 2 },
    )
    .init(&mut rng)
    .unwrap();
    let ok_tokens: EncoderInput<f32> = TokenBatch::from_sequences(&[vec![1, 2], vec![3]], 0)
        .unwrap()
        .into();
    let ok_features: EncoderInput<f32> = FeatureBatch::new(Array3::zeros((2, 4, 3)), vec![4, 1])
        .unwrap()
        .into();

    // 1: a token id out of range, with its position.
    let bad = TokenBatch::from_sequences(&[vec![1, 2], vec![3, 10]], 0).unwrap();
    assert_eq!(
        tokens.infer(bad).unwrap_err(),
        Error::TokenOutOfRange {
            id: 10,
            position: (1, 1),
            vocab: 10
        }
    );

    // 3: zero sizes in the config.
    let zero = |cfg: EncoderOnlyConfig, field: &str| match cfg.init(&mut StdRng::seed_from_u64(0)) {
        Err(Error::InvalidConfig { field: f, .. }) => assert_eq!(f, field),
        other => panic!("{field}: expected a config error, got {other:?}"),
    };
    let classify = Head::Classify { classes: 3 };
    let feats = InputKind::Features { d_in: 3 };
    zero(
        EncoderOnlyConfig::new(InputKind::Tokens { vocab: 0 }, block.clone(), 1, classify),
        "vocab",
    );
    zero(
        EncoderOnlyConfig::new(InputKind::Features { d_in: 0 }, block.clone(), 1, classify),
        "d_in",
    );
    zero(
        EncoderOnlyConfig::new(feats, block.clone(), 0, classify),
        "n_layers",
    );
    zero(
        EncoderOnlyConfig::new(feats, block.clone(), 1, Head::Classify { classes: 0 }),
        "classes",
    );
    zero(
        EncoderOnlyConfig::new(feats, block.clone(), 1, Head::Regress { outputs: 0 }),
        "outputs",
    );
    zero(
        EncoderOnlyConfig::new(feats, BlockConfig::new(0, 2, 8), 1, classify),
        "d_model",
    );
    zero(
        EncoderOnlyConfig::new(feats, BlockConfig::new(8, 2, 0), 1, classify),
        "d_ff",
    );
    zero(
        EncoderOnlyConfig::new(feats, block.clone(), 1, classify)
            .with_positions(Positions::Learned { max_len: 0 }),
        "max_len",
    );
    // 2 and 4 come through the block's own checks.
    zero(
        EncoderOnlyConfig::new(feats, BlockConfig::new(10, 3, 8), 1, classify),
        "n_heads",
    );
    zero(
        EncoderOnlyConfig::new(feats, block.clone().with_p_drop(1.0), 1, classify),
        "p_drop",
    );

    // The wrong kind of input for the model.
    assert!(matches!(
        tokens.infer(&ok_features),
        Err(Error::InvalidInput { .. })
    ));
    assert!(matches!(
        features.infer(&ok_tokens),
        Err(Error::InvalidInput { .. })
    ));

    // 5: a feature width that is not d_in; targets for another batch size or width.
    let wide: EncoderInput<f32> = FeatureBatch::new(Array3::zeros((2, 4, 5)), vec![4, 1])
        .unwrap()
        .into();
    assert_eq!(
        features.infer(&wide).unwrap_err(),
        Error::ShapeMismatch {
            what: "features [B, T, d_in]".into(),
            expected: vec![2, 4, 3],
            got: vec![2, 4, 5]
        }
    );
    // Every refused batch leaves the gradients untouched.
    let mut g_tokens = tokens.zeros_like();
    let mut g_features = features.zeros_like();
    let mut run = |m: &EncoderOnly<f32>, batch: LabeledBatch<f32>| {
        let g = if m.embed.is_some() {
            &mut g_tokens
        } else {
            &mut g_features
        };
        m.accumulate(&batch, 0.0, 1.0, g, &mut StdRng::seed_from_u64(0))
    };
    let three_rows = LabeledBatch::new(ok_features.clone(), Targets::Values(Array2::zeros((3, 2))));
    assert!(matches!(
        run(&features, three_rows),
        Err(Error::ShapeMismatch { .. })
    ));
    let wrong_width = LabeledBatch::new(ok_features.clone(), Targets::Values(Array2::zeros((2, 3))));
    assert_eq!(
        run(&features, wrong_width).unwrap_err(),
        Error::ShapeMismatch {
            what: "regression targets [B, outputs]".into(),
            expected: vec![2, 2],
            got: vec![2, 3]
        }
    );
    let one_label = LabeledBatch::new(ok_tokens.clone(), Targets::Classes(vec![1]));
    assert!(matches!(
        run(&tokens, one_label),
        Err(Error::ShapeMismatch { .. })
    ));
    // A label that is not a class: named with the class count.
    let bad_label = LabeledBatch::new(ok_tokens.clone(), Targets::Classes(vec![1, 3]));
    let err = run(&tokens, bad_label).unwrap_err();
    assert!(matches!(err, Error::InvalidInput { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("label 3") && msg.contains("classes, 3"), "{msg}");
    // Targets of the wrong kind for the head.
    let values_for_classifier = LabeledBatch::new(ok_tokens.clone(), Targets::Values(Array2::zeros((2, 3))));
    assert!(matches!(
        run(&tokens, values_for_classifier),
        Err(Error::InvalidInput { .. })
    ));
    let labels_for_regressor = LabeledBatch::new(ok_features.clone(), Targets::Classes(vec![0, 1]));
    assert!(matches!(
        run(&features, labels_for_regressor),
        Err(Error::InvalidInput { .. })
    ));
    // predict on a regressor.
    assert!(matches!(
        features.predict(&ok_features),
        Err(Error::InvalidInput { .. })
    ));
    assert!(g_tokens.sq_norm() == 0.0 && g_features.sq_norm() == 0.0);

    // 6: features of the wrong rank.
    let err = FeatureBatch::<f32>::from_dyn(ArrayD::zeros(vec![2, 4]), vec![4, 4]).unwrap_err();
    assert!(matches!(err, Error::InvalidInput { .. }), "{err:?}");
    assert!(err.to_string().contains("[batch, length, features]"));

    // 7: an empty batch cannot be built; an empty sequence pools to zeros, so its output is
    // the head's bias, with either pooling; a batch of only empty sequences works too.
    assert!(matches!(
        FeatureBatch::<f32>::new(Array3::zeros((0, 4, 3)), vec![]),
        Err(Error::InvalidInput { .. })
    ));
    assert!(TokenBatch::from_sequences::<Vec<usize>>(&[], 0).is_err());
    let head_bias = tokens.head.p.bias.clone().unwrap();
    let with_empty: EncoderInput<f32> = TokenBatch::from_sequences(&[vec![], vec![4]], 0).unwrap().into();
    assert_eq!(tokens.infer(&with_empty).unwrap().row(0), head_bias);
    let all_empty: EncoderInput<f32> = FeatureBatch::new(Array3::zeros((2, 0, 3)), vec![0, 0])
        .unwrap()
        .into();
    for pooling in [Pooling::Mean, Pooling::First] {
        let mut m = features.clone();
        m.cfg.pooling = pooling;
        let y = m.infer(&all_empty).unwrap();
        let bias = m.head.p.bias.clone().unwrap();
        assert!(y.rows().into_iter().all(|r| r == bias), "{pooling:?}");
        // And training on it gives finite, defined gradients.
        let batch = LabeledBatch::new(all_empty.clone(), Targets::Values(Array2::ones((2, 2))));
        let mut g = m.zeros_like();
        let stats = m
            .accumulate(&batch, 0.0, 1.0, &mut g, &mut StdRng::seed_from_u64(0))
            .unwrap();
        assert!(stats.loss.is_finite() && g.sq_norm().is_finite());
    }

    // 8: longer than the learned position table.
    let long = TokenBatch::from_sequences(&[vec![1; 6], vec![2]], 0).unwrap();
    assert_eq!(
        tokens.infer(long).unwrap_err(),
        Error::SequenceTooLong { len: 6, max: 5 }
    );

    // 11: the opt-in finiteness check names the bad position; NaN left in a real position
    // propagates to that sequence's output only.
    let mut x = Array3::<f32>::zeros((2, 4, 3));
    x[[1, 0, 2]] = f32::NAN;
    let nan = FeatureBatch::new(x, vec![4, 1]).unwrap();
    assert_eq!(
        nan.check_finite().unwrap_err(),
        Error::NonFinite {
            what: "features at batch row 1, position 0".into()
        }
    );
    let y = features.infer(nan).unwrap();
    assert!(y.row(0).iter().all(|v| v.is_finite()));
    assert!(y.row(1).iter().all(|v| v.is_nan()));
}

/// A sequence of `len` samples of two channels, a sine and a cosine of one of `FREQS`
/// (cycles per sample) with a random phase, plus a weaker distractor at another frequency
/// and noise.
fn tone(class: usize, len: usize, rng: &mut StdRng) -> Vec<[f32; 2]> {
    const FREQS: [f64; 4] = [0.05, 0.11, 0.18, 0.26];
    let other = (class + rng.random_range(1..FREQS.len())) % FREQS.len();
    let (phase, phase2) = (rng.random_range(0.0..2.0 * PI), rng.random_range(0.0..2.0 * PI));
    let amp = rng.random_range(0.6..1.4);
    (0..len)
        .map(|t| {
            let a = 2.0 * PI * FREQS[class] * t as f64 + phase;
            let b = 2.0 * PI * FREQS[other] * t as f64 + phase2;
            let noise = |rng: &mut StdRng| rng.random_range(-0.2..0.2);
            [
                (amp * a.sin() + 0.3 * b.sin() + noise(rng)) as f32,
                (amp * a.cos() + 0.3 * b.cos() + noise(rng)) as f32,
            ]
        })
        .collect()
}

fn tone_batch(size: usize, rng: &mut StdRng) -> (FeatureBatch<f32>, Vec<usize>) {
    let classes: Vec<usize> = (0..size).map(|_| rng.random_range(0..4)).collect();
    let lengths: Vec<usize> = (0..size).map(|_| rng.random_range(12..=24)).collect();
    let t = *lengths.iter().max().unwrap();
    let mut x = Array3::from_elem((size, t, 2), f32::NAN); // padding is never read
    for (i, (&c, &len)) in classes.iter().zip(&lengths).enumerate() {
        for (j, v) in tone(c, len, rng).into_iter().enumerate() {
            x[[i, j, 0]] = v[0];
            x[[i, j, 1]] = v[1];
        }
    }
    (FeatureBatch::new(x, lengths).unwrap(), classes)
}

#[test]
fn learns_to_classify_sequences_by_their_dominant_frequency() {
    let start = Instant::now();
    let mut rng = StdRng::seed_from_u64(2017);
    let model: EncoderOnly = EncoderOnlyConfig::new(
        InputKind::Features { d_in: 2 },
        BlockConfig::new(32, 4, 64).with_p_drop(0.0),
        2,
        Head::Classify { classes: 4 },
    )
    .init(&mut rng)
    .unwrap();
    let cfg = TrainerConfig {
        optimizer: OptimizerConfig::Adam(AdamConfig::paper()),
        schedule: Schedule::Cosine {
            peak: 2e-3,
            warmup: 30,
            total: 450,
            min: 1e-4,
        },
        clip_norm: Some(1.0),
        label_smoothing: 0.0,
        precision: vaswani::Precision::F32,
    };
    let mut trainer = Trainer::new(model, cfg).unwrap();
    let mut data = StdRng::seed_from_u64(1);
    let mut last = 0.0;
    for _ in 0..450 {
        let (x, y) = tone_batch(32, &mut data);
        last = trainer
            .step(&[LabeledBatch::new(x, Targets::Classes(y))], &mut rng)
            .unwrap()
            .loss
            .loss;
    }
    let (x, y) = tone_batch(1000, &mut StdRng::seed_from_u64(99));
    let predicted = trainer.model.predict(x).unwrap();
    let correct = predicted.iter().zip(&y).filter(|(p, y)| p == y).count();
    let secs = start.elapsed().as_secs_f64();
    eprintln!("dominant frequency: final loss {last:.4}, {correct}/1000 held out, {secs:.1} s");
    assert!(correct >= 950, "{correct}/1000, final loss {last}");
    assert!(secs < 10.0, "took {secs:.1} s");
}
