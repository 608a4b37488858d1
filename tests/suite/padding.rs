//! What padding holds never reaches the outputs or the gradients of real positions: a NaN in
//! an embedding row that only the padding looks up, in padded feature rows, or in the padded
//! rows given to an encoder or decoder stack, for every model family and both norm placements.
//! Each case is compared with the same model and batch with a finite value there: the loss,
//! every gradient and every real output must be the same, bit for bit.

use ndarray::{Array2, Array3, s};
use rand::{SeedableRng, rngs::StdRng};
use vaswani::Params;
use vaswani::blocks::{BlockConfig, DecoderConfig, EncoderConfig};
use vaswani::gradcheck::random_like;
use vaswani::layers::Mask;
use vaswani::models::{
    DecoderOnlyConfig, EncoderDecoderConfig, EncoderOnlyConfig, FeatureBatch, Head, InputKind, LabeledBatch,
    LmBatch, Seq2SeqBatch, Targets, TokenBatch,
};
use vaswani::train::Trainable;

/// Every element of every tensor, with its tensor's name.
fn values<P: Params<f32>>(p: &P) -> Vec<(String, Vec<u32>)> {
    let mut out = Vec::new();
    p.visit("", &mut |name, t| {
        out.push((name.to_string(), t.iter().map(|v| v.to_bits()).collect()))
    });
    out
}

fn assert_finite<P: Params<f32>>(p: &P, what: &str) {
    p.visit("", &mut |name, t| {
        assert!(
            t.iter().all(|v| v.is_finite()),
            "{what}: {name} holds a non-finite value"
        );
    });
}

/// Sets element `[0, 0]` (row 0: the id the padding is looked up as) of every embedding table.
fn set_pad_row<P: Params<f32>>(model: &mut P, value: f32) -> usize {
    let mut tables = 0;
    model.visit_mut("", &mut |name, mut t| {
        if name.contains("embed") && t.ndim() == 2 {
            t[[0, 0]] = value;
            tables += 1;
        }
    });
    tables
}

/// The gradients (and loss) of one batch, once with a NaN in the padding's row of every
/// embedding and once with 0.25 there: they must be equal and finite.
fn check_model<M: Trainable<Float = f32>>(mut model: M, batch: &M::Batch, what: &str) {
    let mut run = |value: f32| {
        assert!(set_pad_row(&mut model, value) > 0, "{what}: no embedding table");
        let mut grads = model.zeros_like();
        let stats = model
            .accumulate(batch, 0.1, 1.0, &mut grads, &mut StdRng::seed_from_u64(3))
            .unwrap();
        (stats.loss, grads)
    };
    let (loss_nan, grads_nan) = run(f32::NAN);
    let (loss, grads) = run(0.25);
    assert!(loss_nan.is_finite(), "{what}: loss {loss_nan}");
    assert_eq!(
        loss_nan.to_bits(),
        loss.to_bits(),
        "{what}: the loss depends on the padding"
    );
    assert_finite(&grads_nan, what);
    assert_eq!(
        values(&grads_nan),
        values(&grads),
        "{what}: a gradient depends on the padding"
    );
}

fn block(norm_first: bool) -> BlockConfig {
    BlockConfig::new(8, 2, 16)
        .with_p_drop(0.1)
        .with_norm_first(norm_first)
}

#[test]
fn a_nan_in_the_padding_row_of_an_embedding_reaches_no_gradient() {
    for norm_first in [false, true] {
        let mut rng = StdRng::seed_from_u64(1);
        // Ids 1.. are real, 0 is the padding; the output projection is not tied to the
        // embedding (tied, row 0 would be a real logit in every position).
        let pairs = [(vec![3, 4, 5, 6], vec![6, 5, 4]), (vec![7, 3], vec![3])];
        let batch = Seq2SeqBatch::from_pairs(&pairs, 1, 2, 0).unwrap();
        for shared in [false, true] {
            let model = EncoderDecoderConfig::new(9, 9, block(norm_first), 2, 2)
                .with_share_embeddings(shared)
                .with_tie_output(false)
                .init(&mut rng)
                .unwrap();
            check_model(
                model,
                &batch,
                &format!("encoder-decoder, norm_first {norm_first}, shared {shared}"),
            );
        }

        let model = DecoderOnlyConfig::new(9, block(norm_first), 2)
            .with_tie_output(false)
            .init(&mut rng)
            .unwrap();
        let batch = LmBatch::from_sequences(&[vec![1, 3, 4, 5, 6], vec![1, 7, 2]], 0).unwrap();
        check_model(model, &batch, &format!("decoder-only, norm_first {norm_first}"));

        let head = Head::Classify { classes: 3 };
        let model = EncoderOnlyConfig::new(InputKind::Tokens { vocab: 9 }, block(norm_first), 2, head)
            .init(&mut rng)
            .unwrap();
        let tokens = TokenBatch::from_sequences(&[vec![3, 4, 5, 6], vec![7, 3]], 0).unwrap();
        let batch = LabeledBatch::new(tokens, Targets::Classes(vec![0, 2]));
        check_model(model, &batch, &format!("encoder-only, norm_first {norm_first}"));
    }
}

#[test]
fn nan_in_padded_features_reaches_no_gradient() {
    for norm_first in [false, true] {
        let mut rng = StdRng::seed_from_u64(2);
        let head = Head::Classify { classes: 3 };
        let model = EncoderOnlyConfig::new(InputKind::Features { d_in: 3 }, block(norm_first), 2, head)
            .init(&mut rng)
            .unwrap();
        let x: Array3<f32> = random_like((2, 4, 3), &mut rng);
        let run = |pad: f32| {
            let mut x = x.clone();
            x.slice_mut(s![1, 2.., ..]).fill(pad);
            let batch = LabeledBatch::new(
                FeatureBatch::new(x, vec![4, 2]).unwrap(),
                Targets::Classes(vec![1, 2]),
            );
            let mut grads = model.zeros_like();
            let stats = model
                .accumulate(&batch, 0.0, 1.0, &mut grads, &mut StdRng::seed_from_u64(3))
                .unwrap();
            (stats.loss, grads)
        };
        let (loss_nan, grads_nan) = run(f32::NAN);
        let (loss, grads) = run(0.0);
        assert_eq!(loss_nan.to_bits(), loss.to_bits(), "norm_first {norm_first}");
        assert_finite(&grads_nan, "features");
        assert_eq!(values(&grads_nan), values(&grads), "norm_first {norm_first}");
    }
}

/// Padded rows of `x` `[B, T, d]` (positions at or past `lengths`) set to `value`.
fn pad_rows(x: &Array3<f32>, lengths: &[usize], value: f32) -> Array3<f32> {
    let mut x = x.clone();
    for (b, &len) in lengths.iter().enumerate() {
        x.slice_mut(s![b, len.., ..]).fill(value);
    }
    x
}

/// `grad` with the padded positions' rows zeroed: a loss of the real positions only.
fn real_only(grad: &Array3<f32>, lengths: &[usize]) -> Array3<f32> {
    pad_rows(grad, lengths, 0.0)
}

fn same_real_rows(a: &Array3<f32>, b: &Array3<f32>, lengths: &[usize], what: &str) {
    for (bi, &len) in lengths.iter().enumerate() {
        let (ra, rb) = (a.slice(s![bi, ..len, ..]), b.slice(s![bi, ..len, ..]));
        assert!(
            ra.iter().zip(rb.iter()).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{what}: real rows of sequence {bi} differ"
        );
    }
}

#[test]
fn nan_in_the_padded_rows_of_a_stack_reaches_no_gradient() {
    let lengths = [4, 2];
    for norm_first in [false, true] {
        for by_flags in [false, true] {
            let mut rng = StdRng::seed_from_u64(4);
            let mask = if by_flags {
                let flags = Array2::from_shape_fn((2, 4), |(b, t)| t >= lengths[b]);
                Mask::key_padding(flags.view())
            } else {
                Mask::key_lengths(&lengths)
            };
            let what = format!("norm_first {norm_first}, flags {by_flags}");

            let encoder = EncoderConfig::new(block(norm_first), 2).init(&mut rng).unwrap();
            let x: Array3<f32> = random_like((2, 4, 8), &mut rng);
            let r = real_only(&random_like((2, 4, 8), &mut rng), &lengths);
            let run = |pad: f32| {
                let x = pad_rows(&x, &lengths, pad);
                let (y, cache) = encoder.forward(x.view(), &mask, &mut StdRng::seed_from_u64(5));
                let mut g = encoder.zeros_like();
                let gx = encoder.backward(&cache, r.view(), &mut g);
                (y, gx, g)
            };
            let (y_nan, gx_nan, g_nan) = run(f32::NAN);
            let (y, gx, g) = run(0.0);
            same_real_rows(&y_nan, &y, &lengths, &format!("encoder output, {what}"));
            same_real_rows(&gx_nan, &gx, &lengths, &format!("encoder ∂x, {what}"));
            assert_finite(&g_nan, &format!("encoder, {what}"));
            assert_eq!(values(&g_nan), values(&g), "encoder gradients, {what}");

            // The decoder: padded target rows and padded memory rows.
            let decoder = DecoderConfig::new(block(norm_first), 2).init(&mut rng).unwrap();
            let memory: Array3<f32> = random_like((2, 4, 8), &mut rng);
            let self_mask = Mask::causal().and(mask.clone());
            let run = |pad: f32| {
                let (x, memory) = (pad_rows(&x, &lengths, pad), pad_rows(&memory, &lengths, pad));
                let (y, cache) = decoder.forward(
                    x.view(),
                    memory.view(),
                    &self_mask,
                    &mask,
                    &mut StdRng::seed_from_u64(6),
                );
                let mut g = decoder.zeros_like();
                let (gx, gm) = decoder.backward(&cache, r.view(), &mut g);
                (y, gx, gm, g)
            };
            let (y_nan, gx_nan, gm_nan, g_nan) = run(f32::NAN);
            let (y, gx, gm, g) = run(0.0);
            same_real_rows(&y_nan, &y, &lengths, &format!("decoder output, {what}"));
            same_real_rows(&gx_nan, &gx, &lengths, &format!("decoder ∂x, {what}"));
            same_real_rows(&gm_nan, &gm, &lengths, &format!("decoder ∂memory, {what}"));
            assert_finite(&g_nan, &format!("decoder, {what}"));
            assert_eq!(values(&g_nan), values(&g), "decoder gradients, {what}");
        }
    }
}
