//! Scaled dot-product and multi-head attention: gradient checks and invariants.

use ndarray::{Array2, Array3, ArrayView3, Axis, s};
use rand::{SeedableRng, rngs::StdRng};
use vaswani::gradcheck::{GradCheck, random_like};
use vaswani::layers::{AttentionConfig, Mask, MultiHead, MultiHeadConfig};
use vaswani::{Params, Tensors};

fn view3<'a>(t: &'a Tensors<f64>, name: &str) -> ArrayView3<'a, f64> {
    t.get(name).view().into_dimensionality().unwrap()
}

/// Every kind of mask at once: causal, padding by length, padding by flags, explicit pairs.
fn busy_mask(b: usize, t: usize) -> Mask {
    assert_eq!((b, t), (2, 4));
    let mut pad = Array2::from_elem((2, 4), false);
    pad[[0, 2]] = true;
    let mut blocked = Array3::from_elem((2, 4, 4), false);
    blocked[[1, 3, 1]] = true;
    Mask::causal()
        .and(Mask::key_lengths(&[4, 3]))
        .and(Mask::key_padding(pad.view()))
        .and(Mask::blocked_pairs(blocked))
}

#[test]
fn sdpa_gradients_with_masks_and_dropout() {
    let mut rng = StdRng::seed_from_u64(30);
    let (b, t, dk, dv) = (2, 4, 3, 5);
    let attn = AttentionConfig::new().with_p_drop(0.25).init().unwrap();
    let q: Array3<f64> = random_like((b, t, dk), &mut rng);
    let k: Array3<f64> = random_like((b, t, dk), &mut rng);
    let v: Array3<f64> = random_like((b, t, dv), &mut rng);
    let r: Array3<f64> = random_like((b, t, dv), &mut rng);
    let mask = busy_mask(b, t);
    let (_, cache) = attn.forward(
        q.view(),
        k.view(),
        v.view(),
        &mask,
        &mut StdRng::seed_from_u64(99),
    );
    let (gq, gk, gv) = attn.backward(&cache, r.view());
    let mut point = Tensors::new().with("q", q).with("k", k).with("v", v);
    let analytic = Tensors::new().with("q", gq).with("k", gk).with("v", gv);
    let report = GradCheck::default().run(&mut point, &analytic, |p| {
        let (y, _) = attn.forward(
            view3(p, "q"),
            view3(p, "k"),
            view3(p, "v"),
            &mask,
            &mut StdRng::seed_from_u64(99),
        );
        (&y * &r).sum()
    });
    report.assert_ok();
    report.assert_all_nonzero();
}

fn mha_check(memory_len: Option<usize>, mask: Mask, p_drop: f32, bias: bool) {
    let mut rng = StdRng::seed_from_u64(31);
    let (b, t, d, h) = (2, 4, 6, 3);
    let mha: MultiHead<f64> = MultiHeadConfig::new(d, h)
        .with_p_drop(p_drop)
        .with_bias(bias)
        .init_as(&mut rng)
        .unwrap();
    // Non-zero biases so that their gradients are tested against a non-trivial point.
    let mut p = mha.p.clone();
    p.visit_mut("", &mut |_, mut t| t.mapv_inplace(|v| v + 0.1));
    let mha = MultiHead {
        cfg: mha.cfg.clone(),
        p,
    };
    let x: Array3<f64> = random_like((b, t, d), &mut rng);
    let m: Option<Array3<f64>> = memory_len.map(|s| random_like((b, s, d), &mut rng));
    let r: Array3<f64> = random_like((b, t, d), &mut rng);
    let (_, cache) = mha.forward(
        x.view(),
        m.as_ref().map(|m| m.view()),
        &mask,
        &mut StdRng::seed_from_u64(7),
    );
    let mut g = mha.p.zeros_like();
    let (gx, gm) = mha.backward(&cache, r.view(), &mut g);
    assert_eq!(gm.is_some(), m.is_some());
    let mut inputs = Tensors::new().with("x", x);
    let mut grads = Tensors::new().with("x", gx);
    if let (Some(m), Some(gm)) = (m, gm) {
        inputs = inputs.with("memory", m);
        grads = grads.with("memory", gm);
    }
    let mut point = (inputs, mha.p.clone());
    let report = GradCheck::default().run(&mut point, &(grads, g), |(inp, p)| {
        let layer = MultiHead {
            cfg: mha.cfg.clone(),
            p: p.clone(),
        };
        let memory = inp
            .0
            .iter()
            .any(|(n, _)| n == "memory")
            .then(|| view3(inp, "memory"));
        let (y, _) = layer.forward(view3(inp, "x"), memory, &mask, &mut StdRng::seed_from_u64(7));
        (&y * &r).sum()
    });
    report.assert_ok();
    // The key bias adds q·b_k to every score of a row, and a softmax does not change when a
    // constant is added to a whole row: its gradient is zero by the mathematics.
    report.assert_all_nonzero_except(&["b_k"]);
}

#[test]
fn mha_self_attention_gradients_with_all_masks_and_dropout() {
    mha_check(None, busy_mask(2, 4), 0.3, true);
}

#[test]
fn mha_cross_attention_gradients_with_padded_memory() {
    mha_check(Some(5), Mask::key_lengths(&[5, 2]), 0.2, true);
    mha_check(Some(3), Mask::none(), 0.0, false);
}

#[test]
fn weights_rows_sum_to_one_and_masked_keys_get_exactly_zero() {
    let mut rng = StdRng::seed_from_u64(32);
    let mha: MultiHead<f32> = MultiHeadConfig::new(8, 2).init(&mut rng).unwrap();
    let x: Array3<f32> = random_like((2, 5, 8), &mut rng);
    let mask = Mask::causal().and(Mask::key_lengths(&[5, 3]));
    let (_, w) = mha.infer_with_weights(x.view(), None, &mask);
    let resolved = mask.resolve(2, 5, 5).unwrap();
    for b in 0..2 {
        for h in 0..2 {
            for i in 0..5 {
                let row = w.slice(s![b, h, i, ..]);
                if (0..5).any(|j| resolved.allows(b, i, j)) {
                    assert!((row.sum() - 1.0).abs() < 1e-6, "row sum {}", row.sum());
                }
                for j in 0..5 {
                    if !resolved.allows(b, i, j) {
                        assert_eq!(row[j], 0.0);
                    }
                }
            }
        }
    }
}

#[test]
fn padded_keys_change_nothing_even_when_nan() {
    let mut rng = StdRng::seed_from_u64(33);
    let mha: MultiHead<f32> = MultiHeadConfig::new(8, 2).init(&mut rng).unwrap();
    let x: Array3<f32> = random_like((2, 3, 8), &mut rng);
    let memory: Array3<f32> = random_like((2, 6, 8), &mut rng);
    let mut pad = Array2::from_elem((2, 6), false);
    pad[[0, 1]] = true;
    pad[[1, 5]] = true;
    for mask in [Mask::key_lengths(&[4, 6]), Mask::key_padding(pad.view())] {
        let resolved = mask.resolve(2, 3, 6).unwrap();
        let clean = mha.infer(x.view(), Some(memory.view()), &mask);
        for value in [123.0, f32::NAN, f32::INFINITY] {
            let mut dirty = memory.clone();
            for b in 0..2 {
                for j in 0..6 {
                    if !resolved.allows(b, 0, j) {
                        dirty.slice_mut(s![b, j, ..]).fill(value);
                    }
                }
            }
            let got = mha.infer(x.view(), Some(dirty.view()), &mask);
            assert_eq!(got, clean, "padded memory set to {value} changed the output");
            // Input gradients at real positions are unchanged and padded ones are zero; with
            // finite padding the parameter gradients are bit-identical too (padded rows add
            // exact zeros). Non-finite padding reaches parameter gradients through 0·NaN in
            // ∂L/∂W = Σ_rows grad ⊗ input, so models zero padded input rows on entry.
            let (_, c1) = mha.forward(
                x.view(),
                Some(memory.view()),
                &mask,
                &mut StdRng::seed_from_u64(1),
            );
            let (_, c2) = mha.forward(x.view(), Some(dirty.view()), &mask, &mut StdRng::seed_from_u64(1));
            let r: Array3<f32> = random_like((2, 3, 8), &mut StdRng::seed_from_u64(2));
            let (mut g1, mut g2) = (mha.p.zeros_like(), mha.p.zeros_like());
            let (gx1, gm1) = mha.backward(&c1, r.view(), &mut g1);
            let (gx2, gm2) = mha.backward(&c2, r.view(), &mut g2);
            assert_eq!(gx1, gx2);
            if value.is_finite() {
                assert_eq!(g1, g2);
            }
            let (gm1, gm2) = (gm1.unwrap(), gm2.unwrap());
            for b in 0..2 {
                for j in 0..6 {
                    if resolved.allows(b, 0, j) {
                        assert_eq!(gm1.slice(s![b, j, ..]), gm2.slice(s![b, j, ..]));
                    } else {
                        assert!(gm2.slice(s![b, j, ..]).iter().all(|&v| v == 0.0));
                    }
                }
            }
        }
    }
}

#[test]
fn causal_output_is_blind_to_the_future_bit_for_bit() {
    let mut rng = StdRng::seed_from_u64(34);
    let mha: MultiHead<f32> = MultiHeadConfig::new(12, 3).init(&mut rng).unwrap();
    let x: Array3<f32> = random_like((2, 7, 12), &mut rng);
    let y = mha.infer(x.view(), None, &Mask::causal());
    for t in 0..7 {
        let mut changed = x.clone();
        changed
            .slice_mut(s![.., t.., ..])
            .mapv_inplace(|v| v * -3.0 + 1.0);
        let y2 = mha.infer(changed.view(), None, &Mask::causal());
        assert_eq!(
            y.slice(s![.., ..t, ..]),
            y2.slice(s![.., ..t, ..]),
            "changing position {t} changed an earlier output"
        );
        assert_ne!(y.slice(s![.., t, ..]), y2.slice(s![.., t, ..]));
    }
}

#[test]
fn fully_masked_rows_give_zeros_and_zero_gradients_never_nan() {
    let mut rng = StdRng::seed_from_u64(35);
    let (b, t, d) = (2, 3, 4);
    let mha: MultiHead<f64> = MultiHeadConfig::new(d, 2)
        .with_p_drop(0.0)
        .init_as(&mut rng)
        .unwrap();
    let x: Array3<f64> = random_like((b, t, d), &mut rng);
    // Sequence 1 has no real key at all; query 0 of sequence 0 is blocked from everything.
    let mut blocked = Array3::from_elem((b, t, t), false);
    blocked.slice_mut(s![0, 0, ..]).fill(true);
    let mask = Mask::key_lengths(&[3, 0]).and(Mask::blocked_pairs(blocked));
    let (_, cache) = mha.forward(x.view(), None, &mask, &mut rng);
    let w = cache.weights();
    assert!(w.slice(s![1, .., .., ..]).iter().all(|&v| v == 0.0));
    assert!(w.slice(s![0, .., 0, ..]).iter().all(|&v| v == 0.0));
    let r: Array3<f64> = random_like((b, t, d), &mut rng);
    let mut g = mha.p.zeros_like();
    let (gx, _) = mha.backward(&cache, r.view(), &mut g);
    assert!(gx.iter().all(|v| v.is_finite()));
    let mut all_finite = true;
    g.visit("", &mut |_, t| all_finite &= t.iter().all(|v| v.is_finite()));
    assert!(all_finite);
    // The SDPA core alone: a fully masked row's output is exactly zero.
    let attn = AttentionConfig::new().init().unwrap();
    let q: Array3<f64> = random_like((1, 2, 3), &mut rng);
    let out = attn.infer(q.view(), q.view(), q.view(), &Mask::key_lengths(&[0]));
    assert!(out.iter().all(|&v| v == 0.0));
}

#[test]
fn heads_are_concatenated_not_averaged() {
    // With W_O = I and zero biases, output columns h·d_k.. are head h's own average of V.
    let mut rng = StdRng::seed_from_u64(36);
    let (d, h) = (6, 3);
    let mut mha: MultiHead<f64> = MultiHeadConfig::new(d, h)
        .with_p_drop(0.0)
        .init_as(&mut rng)
        .unwrap();
    mha.p.w_o = Array2::eye(d);
    let x: Array3<f64> = random_like((1, 4, d), &mut rng);
    let (y, w) = mha.infer_with_weights(x.view(), None, &Mask::none());
    let mut v = Array2::zeros((4, d));
    vaswani::kernels::gemm(1.0, x.index_axis(Axis(0), 0), mha.p.w_v.t(), 0.0, v.view_mut());
    for head in 0..h {
        let cols = s![.., head * 2..head * 2 + 2];
        let mut want = Array2::zeros((4, 2));
        vaswani::kernels::gemm(
            1.0,
            w.slice(s![0, head, .., ..]),
            v.slice(cols),
            0.0,
            want.view_mut(),
        );
        let got = y.index_axis(Axis(0), 0);
        assert!((&got.slice(cols) - &want).iter().all(|e| e.abs() < 1e-12));
    }
}

#[test]
fn bitwise_identical_with_one_and_two_threads() {
    let mut rng = StdRng::seed_from_u64(37);
    let (b, t, d, h) = (4, 33, 64, 4);
    let mha: MultiHead<f32> = MultiHeadConfig::new(d, h)
        .with_p_drop(0.1)
        .init(&mut rng)
        .unwrap();
    let x: Array3<f32> = random_like((b, t, d), &mut rng);
    let memory: Array3<f32> = random_like((b, 29, d), &mut rng);
    let r: Array3<f32> = random_like((b, t, d), &mut rng);
    let mask = Mask::key_lengths(&[29, 10, 1, 20]);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let (y, cache) = mha.forward(
                x.view(),
                Some(memory.view()),
                &mask,
                &mut StdRng::seed_from_u64(5),
            );
            let mut g = mha.p.zeros_like();
            let (gx, gm) = mha.backward(&cache, r.view(), &mut g);
            (y, gx, gm.unwrap(), g)
        })
    };
    let bits = |a: &Array3<f32>| a.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    let (one, two) = (run(1), run(2));
    assert_eq!(bits(&one.0), bits(&two.0));
    assert_eq!(bits(&one.1), bits(&two.1));
    assert_eq!(bits(&one.2), bits(&two.2));
    let flat = |p: &vaswani::layers::MultiHeadParams<f32>| {
        let mut v = vec![];
        p.visit("", &mut |_, t| v.extend(t.iter().map(|x| x.to_bits())));
        v
    };
    assert_eq!(flat(&one.3), flat(&two.3));
}

#[test]
fn config_errors_name_the_numbers() {
    let mut rng = StdRng::seed_from_u64(0);
    let err = MultiHeadConfig::new(10, 3)
        .init(&mut rng)
        .unwrap_err()
        .to_string();
    assert!(err.contains("10") && err.contains('3'), "{err}");
    assert!(MultiHeadConfig::new(0, 1).init(&mut rng).is_err());
    assert!(MultiHeadConfig::new(8, 0).init(&mut rng).is_err());
    assert!(
        MultiHeadConfig::new(8, 2)
            .with_p_drop(1.0)
            .init(&mut rng)
            .is_err()
    );
    assert!(
        MultiHeadConfig::new(8, 2)
            .with_p_drop(f32::NAN)
            .init(&mut rng)
            .is_err()
    );
    assert!(AttentionConfig::new().with_p_drop(-0.1).init().is_err());
}

#[test]
#[should_panic(expected = "expected [B, Tq, d_model = 8]")]
fn wrong_width_panics_with_both_shapes() {
    let mha: MultiHead<f32> = MultiHeadConfig::new(8, 2)
        .init(&mut StdRng::seed_from_u64(0))
        .unwrap();
    mha.infer(Array3::zeros((1, 2, 6)).view(), None, &Mask::none());
}

#[test]
#[should_panic(expected = "mask does not fit")]
fn wrong_mask_panics() {
    let mha: MultiHead<f32> = MultiHeadConfig::new(8, 2)
        .init(&mut StdRng::seed_from_u64(0))
        .unwrap();
    mha.infer(Array3::zeros((2, 2, 8)).view(), None, &Mask::key_lengths(&[1]));
}

/// The core's backward writes every element of its three gradients whatever they held (the
/// model passes it arrays from the workspace, unzeroed): keys past a sequence's length get
/// zeros, the rest the same bits as into zeroed arrays. `f32` heads take the register path,
/// `f64` the GEMMs.
#[test]
fn core_backward_overwrites_stale_gradients() {
    use ndarray::Array4;
    use vaswani::layers::attention::{attention_backward, attention_forward};
    fn check<F: vaswani::kernels::Float>(seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        let (b, h, t, d) = (3, 2, 12, 8);
        let q: Array4<F> = random_like((b, h, t, d), &mut rng);
        let k: Array4<F> = random_like((b, h, t, d), &mut rng);
        let v: Array4<F> = random_like((b, h, t, d), &mut rng);
        let g: Array4<F> = random_like((b, h, t, d), &mut rng);
        let lengths = [12, 5, 1];
        let mask = Mask::key_lengths(&lengths).resolve(b, t, t).unwrap();
        let mut out = Array4::<F>::zeros((b, h, t, d));
        let cache = attention_forward(
            q.view(),
            k.view(),
            v.view(),
            mask,
            0.0,
            None::<&mut StdRng>,
            out.view_mut(),
        );
        let run = |fill: F| {
            let mut grads = [(); 3].map(|_| Array4::<F>::from_elem((b, h, t, d), fill));
            let [gq, gk, gv] = &mut grads;
            attention_backward(
                q.view(),
                k.view(),
                v.view(),
                &cache,
                g.view(),
                gq.view_mut(),
                gk.view_mut(),
                gv.view_mut(),
            );
            grads
        };
        let (stale, zeroed) = (run(F::from_f64(f64::NAN)), run(F::ZERO));
        for (s, z) in stale.iter().zip(&zeroed) {
            let bits = |a: &Array4<F>| a.iter().map(|x| x.to_f64().to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(s), bits(z));
        }
        for (bi, &len) in lengths.iter().enumerate() {
            for grad in &stale[1..] {
                let past = grad.slice(s![bi, .., len.., ..]);
                assert!(
                    past.iter().all(|&x| x == F::ZERO),
                    "sequence {bi}: keys past {len}"
                );
                // (One key alone has probability 1 whatever its score: no key gradient.)
                let kept = grad.slice(s![bi, .., ..len, ..]);
                assert!(len == 1 || kept.iter().any(|&x| x != F::ZERO));
            }
        }
    }
    check::<f32>(51);
    check::<f64>(52);
}

/// The attention core forward, then backward from `g`, over `q` `[B, H, Tq, d_k]`, `k`
/// `[B, H, Tk, d_k]` and `v` `[B, H, Tk, d_v]`, with dropout `p_drop` drawn from `seed`: the
/// cache and `[out, ∂Q, ∂K, ∂V]`.
fn forward_backward<F: vaswani::kernels::Float>(
    [q, k, v, g]: [&ndarray::Array4<F>; 4],
    mask: vaswani::layers::mask::ResolvedMask,
    p_drop: f32,
    seed: u64,
) -> (
    vaswani::layers::attention::AttentionCoreCache<F>,
    [ndarray::Array4<F>; 4],
) {
    use ndarray::Array4;
    use vaswani::layers::attention::{attention_backward, attention_forward};
    let mut out = Array4::<F>::zeros(g.dim());
    let cache = attention_forward(
        q.view(),
        k.view(),
        v.view(),
        mask,
        p_drop,
        Some(&mut StdRng::seed_from_u64(seed)),
        out.view_mut(),
    );
    let [mut gq, mut gk, mut gv] = [q, k, v].map(|x| Array4::<F>::zeros(x.dim()));
    attention_backward(
        q.view(),
        k.view(),
        v.view(),
        &cache,
        g.view(),
        gq.view_mut(),
        gk.view_mut(),
        gv.view_mut(),
    );
    (cache, [out, gq, gk, gv])
}

/// Under a causal mask the core skips what the mask blocks, by blocks of queries (the keys
/// past the last one a block sees) and of keys (the queries before the first that sees one).
/// Its outputs, weights and gradients are those of the same pairs kept by explicit flags,
/// which computes every pair and zeroes the blocked ones: over enough positions for several
/// blocks, with padding by length, dropout, and more keys than queries (the queries are then
/// the last positions). `f32` heads of at most 64 keys take the register path, the rest the
/// GEMMs.
#[test]
fn causal_core_skips_the_blocked_half_with_the_results_of_explicit_pairs() {
    use ndarray::{Array4, Zip};
    fn check<F: vaswani::kernels::Float>(seed: u64, (tq, tk): (usize, usize), tol: f64) {
        let mut rng = StdRng::seed_from_u64(seed);
        let (b, h, dk, dv) = (2, 2, 8, 6);
        let q: Array4<F> = random_like((b, h, tq, dk), &mut rng);
        let k: Array4<F> = random_like((b, h, tk, dk), &mut rng);
        let v: Array4<F> = random_like((b, h, tk, dv), &mut rng);
        let g: Array4<F> = random_like((b, h, tq, dv), &mut rng);
        let lengths = [tk, tk - 9];
        let kept = Array2::from_shape_fn((tq, tk), |(i, j)| j <= i + tk - tq);
        let run = |mask: Mask| {
            let mask = mask.and(Mask::key_lengths(&lengths)).resolve(b, tq, tk).unwrap();
            let (cache, [out, gq, gk, gv]) = forward_backward([&q, &k, &v, &g], mask, 0.1, 7);
            let w = cache.weights().to_owned();
            [out, w, gq, gk, gv]
        };
        let (causal, flagged) = (run(Mask::causal()), run(Mask::kept_pairs(kept)));
        for (name, (c, f)) in ["output", "weights", "∂Q", "∂K", "∂V"]
            .iter()
            .zip(causal.iter().zip(&flagged))
        {
            assert!(f.iter().any(|&x| x != F::ZERO), "{name}: all zero");
            Zip::from(c).and(f).for_each(|&c, &f| {
                let (c, f) = (c.to_f64(), f.to_f64());
                assert!(
                    (c - f).abs() <= tol * (1.0 + f.abs()),
                    "{name} ({tq} queries, {tk} keys): {c} against {f}"
                );
            });
        }
        // Blocked pairs get weight exactly 0 either way.
        let w = &causal[1];
        for (bi, &len) in lengths.iter().enumerate() {
            for i in 0..tq {
                let limit = (i + 1 + tk - tq).min(len);
                assert!(w.slice(s![bi, .., i, limit..]).iter().all(|&x| x == F::ZERO));
            }
        }
    }
    for shape in [(80, 80), (70, 100), (40, 64)] {
        check::<f64>(53, shape, 1e-12);
        check::<f32>(54, shape, 2e-5);
    }
}

/// The attention core computes in `f32` under bf16 precision too (bf16 is for the linear
/// layers' products): the same bits as outside it, forward and backward, for heads that run
/// in registers (on AVX-512) and heads too wide for them (`d_v` 80), which run as GEMM calls.
#[test]
fn core_stays_f32_under_bf16_precision() {
    use ndarray::Array4;
    use vaswani::kernels::precision::{Precision, with_precision};
    let mut rng = StdRng::seed_from_u64(55);
    for (t, d) in [(40, 32), (40, 80), (100, 96)] {
        let [q, k, v, g]: [Array4<f32>; 4] = std::array::from_fn(|_| random_like((2, 2, t, d), &mut rng));
        let run = || {
            let mask = Mask::causal().resolve(2, t, t).unwrap();
            let (_, results) = forward_backward([&q, &k, &v, &g], mask, 0.0, 0);
            results.map(|a| a.iter().map(|x| x.to_bits()).collect::<Vec<_>>())
        };
        assert!(
            run() == with_precision(Precision::Bf16, run),
            "{t} positions, d {d}"
        );
    }
}

/// Attention dropout multiplies each head's weights by its part of the mask that
/// `dropout_mask` draws for the whole `[B, H, Tq, Tk]` from the same RNG (the crate computes
/// the factors where it needs them and stores none): the output is `(P ⊙ M)·V` and `∂L/∂V =
/// (P ⊙ M)ᵀ·G` with that mask, for heads in registers (`f32` on AVX-512) and as GEMM calls
/// (`f64`), without and with a causal mask over several blocks of queries.
#[test]
fn dropout_is_the_mask_drawn_for_all_the_weights() {
    use ndarray::{Array4, Axis};
    use vaswani::kernels::dropout_mask;
    fn check<F: vaswani::kernels::Float>(seed: u64, (tq, tk): (usize, usize), causal: bool, tol: f64) {
        let mut rng = StdRng::seed_from_u64(seed);
        let (b, h, dk, dv) = (2, 3, 8, 6);
        let q: Array4<F> = random_like((b, h, tq, dk), &mut rng);
        let k: Array4<F> = random_like((b, h, tk, dk), &mut rng);
        let v: Array4<F> = random_like((b, h, tk, dv), &mut rng);
        let g: Array4<F> = random_like((b, h, tq, dv), &mut rng);
        let mask = || {
            let m = if causal { Mask::causal() } else { Mask::none() };
            m.and(Mask::key_lengths(&[tk, tk - 2]))
                .resolve(b, tq, tk)
                .unwrap()
        };
        let (plain, _) = forward_backward([&q, &k, &v, &g], mask(), 0.0, 0);
        let (_, [out, _, _, gv]) = forward_backward([&q, &k, &v, &g], mask(), 0.3, 9);
        let m: Array4<f64> = dropout_mask(0.3, (b, h, tq, tk), &mut StdRng::seed_from_u64(9));
        let kept = plain.weights().mapv(|x| x.to_f64()) * &m;
        assert!(m.iter().any(|&x| x == 0.0) && m.iter().any(|&x| x != 0.0));
        let (v, g) = (v.mapv(|x| x.to_f64()), g.mapv(|x| x.to_f64()));
        for bi in 0..b {
            for hi in 0..h {
                let p = kept.index_axis(Axis(0), bi).index_axis(Axis(0), hi).to_owned();
                let (vh, gh) = (v.slice(s![bi, hi, .., ..]), g.slice(s![bi, hi, .., ..]));
                for (name, want, got) in [
                    ("output", p.dot(&vh), out.slice(s![bi, hi, .., ..])),
                    ("∂V", p.t().dot(&gh), gv.slice(s![bi, hi, .., ..])),
                ] {
                    ndarray::Zip::from(&want).and(&got).for_each(|&w, &x| {
                        let x = x.to_f64();
                        assert!(
                            (w - x).abs() <= tol * (1.0 + w.abs()),
                            "{name} of sequence {bi}, head {hi} ({tq} × {tk}, causal {causal}): {x} against {w}"
                        );
                    });
                }
            }
        }
    }
    for (shape, causal) in [((5, 7), false), ((7, 5), true), ((70, 70), true)] {
        check::<f64>(56, shape, causal, 1e-12);
        check::<f32>(57, shape, causal, 2e-5);
    }
}
