//! Whole models: gradient checks through every parameter, input errors, learning.

use rand::{SeedableRng, rngs::StdRng};
use vaswani::blocks::BlockConfig;
use vaswani::gradcheck::{GradCheck, random_like};
use vaswani::kernels::Activation;
use vaswani::models::{EncoderDecoder, EncoderDecoderConfig, Positions, Seq2SeqBatch, TokenBatch};
use vaswani::train::Trainable;
use vaswani::{Error, Params};

fn jitter<P: Params<f64>>(p: &mut P, rng: &mut StdRng) {
    p.visit_mut("", &mut |_, mut t| {
        let noise: ndarray::ArrayD<f64> = random_like(t.raw_dim(), rng);
        t.zip_mut_with(&noise, |a, n| *a += 0.05 * n);
    });
}

/// Padded pairs: the second source and target are shorter than the first.
fn tiny_batch() -> Seq2SeqBatch {
    Seq2SeqBatch::from_pairs(
        &[(vec![3, 4, 5, 6], vec![6, 5, 4]), (vec![7, 3], vec![3])],
        1,
        2,
        0,
    )
    .unwrap()
}

fn check_model(cfg: EncoderDecoderConfig) {
    let mut rng = StdRng::seed_from_u64(60);
    let mut model: EncoderDecoder<f64> = cfg.init_as(&mut rng).unwrap();
    jitter(&mut model, &mut rng);
    let batch = tiny_batch();
    let mut grads = model.zeros_like();
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
    report.assert_all_nonzero_except(&["b_k"]);
}

fn tiny_block(norm_first: bool) -> BlockConfig {
    BlockConfig::new(4, 2, 6)
        .with_p_drop(0.1)
        .with_norm_first(norm_first)
        .with_activation(Activation::Gelu)
}

#[test]
fn encoder_decoder_gradients_post_norm_shared_and_tied() {
    check_model(
        EncoderDecoderConfig::new(9, 9, tiny_block(false), 2, 2)
            .with_share_embeddings(true)
            .with_tie_output(true),
    );
}

#[test]
fn encoder_decoder_gradients_pre_norm_separate_learned_positions() {
    check_model(
        EncoderDecoderConfig::new(9, 10, tiny_block(true), 1, 2)
            .with_positions(Positions::Learned { max_len: 6 }),
    );
}

#[test]
fn table_3_parameter_counts_within_5_percent() {
    // The paper's shared source-target vocabulary of about 37,000 tokens (§5.1).
    let base = EncoderDecoderConfig::base(37_000).cost(1, 1, 1).params as f64;
    let big = EncoderDecoderConfig::big(37_000).cost(1, 1, 1).params as f64;
    assert!((base / 65e6 - 1.0).abs() < 0.05, "base: {base}");
    assert!((big / 213e6 - 1.0).abs() < 0.05, "big: {big}");
}

#[test]
fn cost_counts_match_the_built_model() {
    let mut rng = StdRng::seed_from_u64(61);
    for cfg in [
        EncoderDecoderConfig::new(30, 40, BlockConfig::new(16, 4, 24), 2, 3),
        EncoderDecoderConfig::new(30, 30, BlockConfig::new(16, 4, 24).with_norm_first(true), 1, 1)
            .with_share_embeddings(true)
            .with_tie_output(true)
            .with_positions(Positions::Learned { max_len: 7 }),
    ] {
        let model = cfg.init(&mut rng).unwrap();
        assert_eq!(cfg.cost(1, 1, 1).params, model.num_params() as u64);
    }
    // The FLOP model of WORKLOADS.md, as `model_flops` in torch_baseline.py computes it
    // (eval_forward and train_step of the three workloads).
    for (d, h, f, layers, v, b, len, forward, train) in [
        (64, 4, 256, 2, 100, 16, 16, 127_008_768_u64, 381_026_304_u64),
        (256, 8, 1024, 2, 1000, 32, 32, 8_241_807_360, 24_725_422_080),
        (512, 8, 2048, 6, 8000, 8, 64, 50_499_420_160, 151_498_260_480),
    ] {
        let cfg =
            EncoderDecoderConfig::new(v, v, BlockConfig::new(d, h, f), layers, layers).with_tie_output(true);
        let c = cfg.cost(b, len, len);
        assert_eq!((c.forward_flops, c.train_flops), (forward, train));
    }
}

#[test]
fn bad_inputs_are_typed_errors() {
    let mut rng = StdRng::seed_from_u64(62);
    let model: EncoderDecoder<f32> = EncoderDecoderConfig::new(10, 10, BlockConfig::new(8, 2, 8), 1, 1)
        .with_positions(Positions::Learned { max_len: 5 })
        .init(&mut rng)
        .unwrap();
    let ok = TokenBatch::from_sequences(&[vec![1, 2], vec![3]], 0).unwrap();
    // 1: a token id out of range, with its position.
    let bad = TokenBatch::from_sequences(&[vec![1, 2], vec![3, 10]], 0).unwrap();
    assert_eq!(
        model.infer(&bad, &ok).unwrap_err(),
        Error::TokenOutOfRange {
            id: 10,
            position: (1, 1),
            vocab: 10
        }
    );
    // 5: source and target batch sizes differ.
    let one = TokenBatch::from_sequences(&[vec![1]], 0).unwrap();
    assert!(matches!(model.infer(&ok, &one), Err(Error::ShapeMismatch { .. })));
    // 8: longer than the learned position table.
    let long = TokenBatch::from_sequences(&[vec![1; 6], vec![2]], 0).unwrap();
    assert_eq!(
        model.infer(&long, &ok).unwrap_err(),
        Error::SequenceTooLong { len: 6, max: 5 }
    );
    // 7: an empty batch cannot be built; an empty sequence gives a defined result.
    assert!(TokenBatch::from_sequences::<Vec<usize>>(&[], 0).is_err());
    let empty_src = TokenBatch::from_sequences(&[vec![], vec![4]], 0).unwrap();
    let logits = model.infer(&empty_src, &ok).unwrap();
    assert!(logits.iter().all(|v| v.is_finite()));
    // 2, 3, 4: config errors.
    assert!(
        EncoderDecoderConfig::new(10, 10, BlockConfig::new(10, 3, 8), 1, 1)
            .init(&mut rng)
            .is_err()
    );
    assert!(
        EncoderDecoderConfig::new(0, 10, BlockConfig::new(8, 2, 8), 1, 1)
            .init(&mut rng)
            .is_err()
    );
    assert!(
        EncoderDecoderConfig::new(10, 10, BlockConfig::new(8, 2, 8), 0, 1)
            .init(&mut rng)
            .is_err()
    );
    assert!(
        EncoderDecoderConfig::new(10, 11, BlockConfig::new(8, 2, 8), 1, 1)
            .with_share_embeddings(true)
            .init(&mut rng)
            .is_err()
    );
    assert!(
        EncoderDecoderConfig::new(10, 10, BlockConfig::new(8, 2, 8).with_p_drop(1.0), 1, 1)
            .init(&mut rng)
            .is_err()
    );
}

#[test]
fn padding_does_not_change_real_outputs() {
    let mut rng = StdRng::seed_from_u64(63);
    let model: EncoderDecoder<f32> = EncoderDecoderConfig::new(12, 12, BlockConfig::new(8, 2, 16), 2, 2)
        .init(&mut rng)
        .unwrap();
    let src_a = TokenBatch::from_sequences(&[vec![3, 4, 5]], 0).unwrap();
    let tgt_a = TokenBatch::from_sequences(&[vec![1, 6]], 0).unwrap();
    let alone = model.infer(&src_a, &tgt_a).unwrap();
    // The same pair inside a batch with a longer neighbour: its rows are padded.
    let src_b = TokenBatch::from_sequences(&[vec![3, 4, 5], vec![7, 7, 7, 7, 7]], 9).unwrap();
    let tgt_b = TokenBatch::from_sequences(&[vec![1, 6], vec![1, 8, 8, 8]], 9).unwrap();
    let batched = model.infer(&src_b, &tgt_b).unwrap();
    for t in 0..2 {
        for v in 0..12 {
            assert!((alone[[t, v]] - batched[[t, v]]).abs() < 1e-5);
        }
    }
}

#[test]
fn accumulated_micro_batches_give_the_large_batch_gradient() {
    use vaswani::train::{AdamConfig, OptimizerConfig, Schedule, Trainer, TrainerConfig};
    let mut rng = StdRng::seed_from_u64(64);
    let model: EncoderDecoder<f64> =
        EncoderDecoderConfig::new(12, 12, BlockConfig::new(8, 2, 16).with_p_drop(0.0), 1, 1)
            .init_as(&mut rng)
            .unwrap();
    let pairs: Vec<(Vec<usize>, Vec<usize>)> = vec![
        (vec![3, 4, 5], vec![5, 4]),
        (vec![6], vec![6, 7, 8, 9]),
        (vec![7, 8], vec![10]),
        (vec![3, 3, 3, 3], vec![4, 5, 6]),
    ];
    let whole = Seq2SeqBatch::from_pairs(&pairs, 1, 2, 0).unwrap();
    let parts = [
        Seq2SeqBatch::from_pairs(&pairs[..1], 1, 2, 0).unwrap(),
        Seq2SeqBatch::from_pairs(&pairs[1..], 1, 2, 0).unwrap(),
    ];
    // The gradients, weighted by each micro-batch's share of the tokens as the Trainer does.
    let mut g_whole = model.zeros_like();
    model
        .accumulate(&whole, 0.1, 1.0, &mut g_whole, &mut StdRng::seed_from_u64(0))
        .unwrap();
    let mut g_parts = model.zeros_like();
    let total = whole.tgt_out.tokens() as f64;
    for part in &parts {
        model
            .accumulate(
                part,
                0.1,
                part.tgt_out.tokens() as f64 / total,
                &mut g_parts,
                &mut StdRng::seed_from_u64(0),
            )
            .unwrap();
    }
    let mut diff = g_whole.clone();
    diff.add_scaled(&g_parts, -1.0);
    assert!(
        diff.sq_norm().sqrt() < 1e-12 * g_whole.sq_norm().sqrt(),
        "{}",
        diff.sq_norm().sqrt()
    );
    // And the Trainer reports the same per-token mean loss either way.
    let cfg = TrainerConfig {
        optimizer: OptimizerConfig::Adam(AdamConfig::paper()),
        schedule: Schedule::Constant { lr: 1e-3 },
        clip_norm: None,
        label_smoothing: 0.1,
        precision: vaswani::Precision::F32,
    };
    let mut one = Trainer::new(model.clone(), cfg.clone()).unwrap();
    let mut two = Trainer::new(model, cfg).unwrap();
    let a = one
        .step(std::slice::from_ref(&whole), &mut StdRng::seed_from_u64(0))
        .unwrap();
    let b = two.step(&parts, &mut StdRng::seed_from_u64(0)).unwrap();
    assert_eq!(a.loss.tokens, b.loss.tokens);
    assert!(
        (a.loss.loss - b.loss.loss).abs() < 1e-12,
        "{} vs {}",
        a.loss.loss,
        b.loss.loss
    );
    assert!((a.grad_norm - b.grad_norm).abs() < 1e-12 * a.grad_norm);
}
