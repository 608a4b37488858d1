//! Encoder and decoder layers and stacks: gradient checks through every input and parameter,
//! both norm placements, with masks and dropout on a fixed mask.

use ndarray::{Array3, ArrayView3};
use rand::{SeedableRng, rngs::StdRng};
use vaswani::blocks::{
    BlockConfig, DecoderConfig, DecoderLayer, DecoderLayerConfig, EncoderConfig, EncoderLayer,
    EncoderLayerConfig, FinalNorm,
};
use vaswani::gradcheck::{GradCheck, random_like};
use vaswani::kernels::Activation;
use vaswani::layers::Mask;
use vaswani::{Params, Tensors};

fn view3<'a>(t: &'a Tensors<f64>, name: &str) -> ArrayView3<'a, f64> {
    t.get(name).view().into_dimensionality().unwrap()
}

/// Moves every parameter a little off its initial value (γ = 1, β = 0, zero biases) so that
/// the check runs at a generic point.
fn jitter<P: Params<f64>>(p: &mut P, rng: &mut StdRng) {
    p.visit_mut("", &mut |_, mut t| {
        let noise: ndarray::ArrayD<f64> = random_like(t.raw_dim(), rng);
        t.zip_mut_with(&noise, |a, n| *a += 0.1 * n);
    });
}

fn block(norm_first: bool, activation: Activation) -> BlockConfig {
    BlockConfig::new(4, 2, 6)
        .with_p_drop(0.2)
        .with_norm_first(norm_first)
        .with_activation(activation)
}

/// The key bias of attention has a zero gradient by the mathematics (a softmax ignores a
/// constant added to a whole row).
const EXEMPT: &[&str] = &["b_k"];

#[test]
fn encoder_layer_gradients_both_norm_placements() {
    for (norm_first, act) in [(false, Activation::Relu), (true, Activation::Gelu)] {
        let mut rng = StdRng::seed_from_u64(54);
        let mut layer: EncoderLayer<f64> = EncoderLayerConfig::new(block(norm_first, act))
            .init_as(&mut rng)
            .unwrap();
        jitter(&mut layer, &mut rng);
        let x: Array3<f64> = random_like((2, 3, 4), &mut rng);
        let r: Array3<f64> = random_like((2, 3, 4), &mut rng);
        let mask = Mask::key_lengths(&[3, 2]);
        let (_, cache) = layer.forward(x.view(), &mask, &mut StdRng::seed_from_u64(9));
        let mut g = layer.zeros_like();
        let gx = layer.backward(&cache, r.view(), &mut g);
        let mut point = (Tensors::new().with("x", x), layer.clone());
        let report = GradCheck::default().run(&mut point, &(Tensors::new().with("x", gx), g), |(inp, l)| {
            let (y, _) = l.forward(view3(inp, "x"), &mask, &mut StdRng::seed_from_u64(9));
            (&y * &r).sum()
        });
        report.assert_ok();
        report.assert_all_nonzero_except(EXEMPT);
    }
}

#[test]
fn decoder_layer_gradients_both_norm_placements() {
    for (norm_first, act) in [(false, Activation::GeluTanh), (true, Activation::Relu)] {
        let mut rng = StdRng::seed_from_u64(51);
        let mut layer: DecoderLayer<f64> = DecoderLayerConfig::new(block(norm_first, act))
            .init_as(&mut rng)
            .unwrap();
        jitter(&mut layer, &mut rng);
        let x: Array3<f64> = random_like((2, 3, 4), &mut rng);
        let m: Array3<f64> = random_like((2, 5, 4), &mut rng);
        let r: Array3<f64> = random_like((2, 3, 4), &mut rng);
        let self_mask = Mask::causal().and(Mask::key_lengths(&[3, 2]));
        let memory_mask = Mask::key_lengths(&[5, 3]);
        let (_, cache) = layer.forward(
            x.view(),
            m.view(),
            &self_mask,
            &memory_mask,
            &mut StdRng::seed_from_u64(9),
        );
        let mut g = layer.zeros_like();
        let (gx, gm) = layer.backward(&cache, r.view(), &mut g);
        let mut point = (Tensors::new().with("x", x).with("memory", m), layer.clone());
        let analytic = (Tensors::new().with("x", gx).with("memory", gm), g);
        let report = GradCheck::default().run(&mut point, &analytic, |(inp, l)| {
            let (y, _) = l.forward(
                view3(inp, "x"),
                view3(inp, "memory"),
                &self_mask,
                &memory_mask,
                &mut StdRng::seed_from_u64(9),
            );
            (&y * &r).sum()
        });
        report.assert_ok();
        report.assert_all_nonzero_except(EXEMPT);
    }
}

#[test]
fn stacks_gradients_with_final_norms() {
    for (norm_first, final_norm) in [
        (false, FinalNorm::Auto),
        (false, FinalNorm::Always),
        (true, FinalNorm::Auto),
    ] {
        let mut rng = StdRng::seed_from_u64(52);
        let cfg = block(norm_first, Activation::Relu);
        let mut enc = EncoderConfig::new(cfg.clone(), 2)
            .with_final_norm(final_norm)
            .init_as::<f64>(&mut rng)
            .unwrap();
        let mut dec = DecoderConfig::new(cfg, 2)
            .with_final_norm(final_norm)
            .init_as::<f64>(&mut rng)
            .unwrap();
        assert_eq!(enc.norm.is_some(), norm_first || final_norm == FinalNorm::Always);
        jitter(&mut enc, &mut rng);
        jitter(&mut dec, &mut rng);
        let src: Array3<f64> = random_like((2, 4, 4), &mut rng);
        let tgt: Array3<f64> = random_like((2, 3, 4), &mut rng);
        let r: Array3<f64> = random_like((2, 3, 4), &mut rng);
        let src_mask = Mask::key_lengths(&[4, 2]);
        let tgt_mask = Mask::causal();
        let run = |enc: &vaswani::blocks::Encoder<f64>,
                   dec: &vaswani::blocks::Decoder<f64>,
                   src: ArrayView3<f64>,
                   tgt: ArrayView3<f64>| {
            let mut rng = StdRng::seed_from_u64(3);
            let (m, ec) = enc.forward(src, &src_mask, &mut rng);
            let (y, dc) = dec.forward(tgt, m.view(), &tgt_mask, &src_mask, &mut rng);
            (y, ec, dc)
        };
        let (_, ec, dc) = run(&enc, &dec, src.view(), tgt.view());
        let (mut ge, mut gd) = (enc.zeros_like(), dec.zeros_like());
        let (g_tgt, g_mem) = dec.backward(&dc, r.view(), &mut gd);
        let g_src = enc.backward(&ec, g_mem.view(), &mut ge);
        let mut point = (
            Tensors::new().with("src", src).with("tgt", tgt),
            (enc.clone(), dec.clone()),
        );
        let analytic = (Tensors::new().with("src", g_src).with("tgt", g_tgt), (ge, gd));
        let report = GradCheck::default().run(&mut point, &analytic, |(inp, (e, d))| {
            let (y, _, _) = run(e, d, view3(inp, "src"), view3(inp, "tgt"));
            (&y * &r).sum()
        });
        report.assert_ok();
        report.assert_all_nonzero_except(EXEMPT);
    }
}

#[test]
fn infer_equals_forward_without_dropout_and_names_follow_pytorch_layout() {
    let mut rng = StdRng::seed_from_u64(53);
    let cfg = BlockConfig::new(8, 2, 16).with_p_drop(0.0);
    let dec = DecoderConfig::new(cfg, 2).init(&mut rng).unwrap();
    let x: Array3<f32> = random_like((2, 3, 8), &mut rng);
    let m: Array3<f32> = random_like((2, 4, 8), &mut rng);
    let (y, _) = dec.forward(x.view(), m.view(), &Mask::causal(), &Mask::none(), &mut rng);
    assert_eq!(y, dec.infer(x.view(), m.view(), &Mask::causal(), &Mask::none()));
    let names: Vec<String> = dec.shapes().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        &names[..3],
        [
            "layers.0.self_attn.w_q",
            "layers.0.self_attn.b_q",
            "layers.0.self_attn.w_k"
        ]
    );
    assert!(names.contains(&"layers.1.cross_attn.w_o".to_string()));
    assert!(names.contains(&"layers.1.norm3.gamma".to_string()));
    assert!(names.contains(&"layers.1.ffn.w2".to_string()));
    assert!(
        !names.iter().any(|n| n.starts_with("norm.")),
        "post-norm stacks have no final norm by default"
    );
}

#[test]
fn bad_block_configs_are_errors() {
    let mut rng = StdRng::seed_from_u64(0);
    assert!(
        EncoderLayerConfig::new(BlockConfig::new(10, 3, 8))
            .init(&mut rng)
            .is_err()
    );
    assert!(
        EncoderLayerConfig::new(BlockConfig::new(8, 2, 0))
            .init(&mut rng)
            .is_err()
    );
    assert!(
        EncoderLayerConfig::new(BlockConfig::new(8, 2, 8).with_eps(0.0))
            .init(&mut rng)
            .is_err()
    );
    assert!(
        EncoderLayerConfig::new(BlockConfig::new(8, 2, 8).with_p_drop(-0.5))
            .init(&mut rng)
            .is_err()
    );
    assert!(
        EncoderConfig::new(BlockConfig::new(8, 2, 8), 0)
            .init(&mut rng)
            .is_err()
    );
}
