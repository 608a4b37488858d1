//! The decoding floor: the step interface of both model families, greedy decoding, sampling
//! and beam search over it, in batches of different lengths.

use ndarray::{Array2, s};
use rand::{SeedableRng, rngs::StdRng};
use vaswani::blocks::BlockConfig;
use vaswani::infer::{BeamSearch, Sampling, Step, beam_search, generate, greedy};
use vaswani::models::{DecoderOnly, DecoderOnlyConfig, EncoderDecoder, EncoderDecoderConfig, TokenBatch};
use vaswani::{Error, Params};

const BOS: usize = 1;
const EOS: usize = 2;

fn seq2seq(norm_first: bool, tgt_vocab: usize, seed: u64) -> EncoderDecoder {
    EncoderDecoderConfig::new(
        11,
        tgt_vocab,
        BlockConfig::new(16, 4, 24).with_norm_first(norm_first),
        2,
        2,
    )
    .init(&mut StdRng::seed_from_u64(seed))
    .unwrap()
}

fn lm(norm_first: bool, seed: u64) -> DecoderOnly {
    DecoderOnlyConfig::new(13, BlockConfig::new(16, 4, 24).with_norm_first(norm_first), 2)
        .init(&mut StdRng::seed_from_u64(seed))
        .unwrap()
}

fn sources() -> TokenBatch {
    TokenBatch::from_sequences(&[vec![3, 4, 5, 6, 7], vec![8, 9], vec![5, 3, 10]], 0).unwrap()
}

fn bos(b: usize) -> Vec<Vec<usize>> {
    vec![vec![BOS]; b]
}

fn max_abs_diff(a: ndarray::ArrayView1<f32>, b: ndarray::ArrayView1<f32>) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn cached_decoding_equals_full_re_decoding_for_both_families() {
    for norm_first in [false, true] {
        // Encoder-decoder: greedy through the step interface against the uncached reference.
        let m = seq2seq(norm_first, 19, 1);
        let src = sources();
        let state = m.begin_decode(&src, 8).unwrap();
        let got = generate(
            state,
            &bos(3),
            Sampling::Greedy,
            Some(EOS),
            8,
            &mut StdRng::seed_from_u64(0),
        )
        .unwrap();
        assert_eq!(
            got,
            vaswani::infer::greedy_uncached(&m, &src, BOS, Some(EOS), 8).unwrap(),
            "norm_first {norm_first}"
        );

        // Decoder-only: every step's logits against the last row of a full pass.
        let m = lm(norm_first, 2);
        let prompts = [vec![3, 4, 5], vec![6, 7, 8]];
        let mut state = m.begin_generate(2, 4);
        let mut seqs: Vec<Vec<usize>> = prompts.to_vec();
        let ids = Array2::from_shape_fn((2, 3), |(i, t)| prompts[i][t]);
        let mut logits = state.feed(ids.view()).unwrap();
        for step in 0..6 {
            let full = m
                .infer(
                    &TokenBatch::full(Array2::from_shape_fn((2, seqs[0].len()), |(i, t)| seqs[i][t]))
                        .unwrap(),
                )
                .unwrap();
            let t = seqs[0].len();
            for i in 0..2 {
                let diff = max_abs_diff(logits.row(i), full.row(i * t + t - 1));
                assert!(diff < 1e-5, "norm_first {norm_first}, step {step}: {diff}");
            }
            let next: Vec<usize> = (0..2).map(|i| (step * 5 + i * 3) % 13).collect();
            for i in 0..2 {
                seqs[i].push(next[i]);
            }
            logits = state
                .feed(Array2::from_shape_vec((2, 1), next).unwrap().view())
                .unwrap();
        }
    }
}

#[test]
fn a_sequence_decodes_the_same_alone_and_in_a_batch() {
    let m = seq2seq(false, 19, 3);
    let src = sources();
    let rng = &mut StdRng::seed_from_u64(0);
    let beam = BeamSearch::paper().with_n_best(2);
    let batch_greedy = greedy(m.begin_decode(&src, 8).unwrap(), BOS, Some(EOS), 8).unwrap();
    let batch_beam = beam_search(m.begin_decode(&src, 8).unwrap(), &bos(3), &beam, Some(EOS), 8).unwrap();
    for (i, seq) in [vec![3, 4, 5, 6, 7], vec![8, 9], vec![5, 3, 10]]
        .into_iter()
        .enumerate()
    {
        let alone = TokenBatch::from_sequences(&[seq], 0).unwrap();
        let greedy = greedy(m.begin_decode(&alone, 8).unwrap(), BOS, Some(EOS), 8).unwrap();
        assert_eq!(greedy[0], batch_greedy[i], "greedy, sequence {i}");
        let hyps = beam_search(m.begin_decode(&alone, 8).unwrap(), &bos(1), &beam, Some(EOS), 8).unwrap();
        assert_eq!(hyps[0].len(), batch_beam[i].len());
        for (a, b) in hyps[0].iter().zip(&batch_beam[i]) {
            assert_eq!(a.tokens, b.tokens, "beam, sequence {i}");
            assert!((a.score - b.score).abs() < 1e-4, "beam, sequence {i}");
        }
    }

    // Decoder-only prompts of different lengths, generated side by side.
    let m = lm(true, 4);
    let prompts = [vec![3, 4, 5, 6, 7, 8], vec![9], vec![10, 11, 3]];
    let batch = generate(
        m.begin_generate(3, 16),
        &prompts,
        Sampling::Greedy,
        Some(EOS),
        7,
        rng,
    )
    .unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let alone = generate(
            m.begin_generate(1, 16),
            std::slice::from_ref(p),
            Sampling::Greedy,
            Some(EOS),
            7,
            rng,
        )
        .unwrap();
        assert_eq!(alone[0], batch[i], "prompt {i}");
        // And the model's own generate, which runs the prompt in one pass.
        let own = vaswani::infer::continue_prompt(&m, p, alone[0].len(), Sampling::Greedy, rng).unwrap();
        assert_eq!(own, alone[0], "prompt {i}");
    }
}

#[test]
fn beam_width_one_is_greedy_and_top_k_one_is_greedy() {
    for norm_first in [false, true] {
        let m = seq2seq(norm_first, 19, 5);
        let src = sources();
        let rng = &mut StdRng::seed_from_u64(0);
        let greedy = greedy(m.begin_decode(&src, 8).unwrap(), BOS, Some(EOS), 8).unwrap();
        let beam = beam_search(
            m.begin_decode(&src, 8).unwrap(),
            &bos(3),
            &BeamSearch::new(1),
            Some(EOS),
            8,
        )
        .unwrap();
        let beam: Vec<Vec<usize>> = beam.into_iter().map(|h| h[0].tokens.clone()).collect();
        assert_eq!(beam, greedy, "norm_first {norm_first}");
        let top1 = Sampling::TopK {
            k: 1,
            temperature: 0.7,
        };
        let sampled = generate(m.begin_decode(&src, 8).unwrap(), &bos(3), top1, Some(EOS), 8, rng).unwrap();
        assert_eq!(sampled, greedy);
        let tiny_p = Sampling::TopP {
            p: 1e-9,
            temperature: 1.0,
        };
        let sampled = generate(
            m.begin_decode(&src, 8).unwrap(),
            &bos(3),
            tiny_p,
            Some(EOS),
            8,
            rng,
        )
        .unwrap();
        assert_eq!(sampled, greedy);

        let m = lm(norm_first, 6);
        let prompts = [vec![3, 4], vec![5, 6, 7]];
        let greedy = generate(
            m.begin_generate(2, 8),
            &prompts,
            Sampling::Greedy,
            Some(EOS),
            6,
            rng,
        )
        .unwrap();
        let beam = beam_search(
            m.begin_generate(2, 8),
            &prompts,
            &BeamSearch::new(1),
            Some(EOS),
            6,
        )
        .unwrap();
        let beam: Vec<Vec<usize>> = beam.into_iter().map(|h| h[0].tokens.clone()).collect();
        assert_eq!(beam, greedy, "decoder-only, norm_first {norm_first}");
    }
}

/// `log P(tokens, then EOS if ended | src)` by a teacher-forced pass.
fn log_prob(m: &EncoderDecoder, src: &TokenBatch, tokens: &[usize], ended: bool) -> f64 {
    let mut tgt_in = vec![BOS];
    tgt_in.extend_from_slice(tokens);
    let mut targets = tokens.to_vec();
    if ended {
        targets.push(EOS);
    } else {
        tgt_in.pop();
    }
    let logits = m
        .infer(
            src,
            &TokenBatch::full(Array2::from_shape_vec((1, tgt_in.len()), tgt_in).unwrap()).unwrap(),
        )
        .unwrap();
    let lsm = vaswani::train::log_softmax(logits.view());
    targets.iter().enumerate().map(|(t, &y)| lsm[[t, y]]).sum()
}

#[test]
fn a_wide_beam_finds_the_best_scoring_output_of_a_model_small_enough_to_enumerate() {
    // Target vocabulary {0, BOS, EOS, 3}; at most 3 new tokens: 3⁰ + 3¹ + 3² outputs end in EOS,
    // 3³ reach the limit.
    let limit = 3;
    for (seed, alpha) in [(7, 0.0), (8, 0.6), (9, 1.5)] {
        let m = seq2seq(seed % 2 == 0, 4, seed);
        let src = TokenBatch::from_sequences(&[vec![3, 4, 5]], 0).unwrap();
        let mut all: Vec<(Vec<usize>, bool)> = vec![(vec![], true)];
        let mut frontier: Vec<Vec<usize>> = vec![vec![]];
        for len in 1..=limit {
            let mut next = Vec::new();
            for p in &frontier {
                for v in [0, 1, 3] {
                    let mut q = p.clone();
                    q.push(v);
                    all.push((q.clone(), len < limit));
                    next.push(q);
                }
            }
            frontier = next;
        }
        let search = BeamSearch::new(27).with_alpha(alpha).with_n_best(3);
        let scored: Vec<(f64, Vec<usize>)> = all
            .iter()
            .map(|(t, ended)| {
                let len = t.len() + usize::from(*ended);
                (
                    log_prob(&m, &src, t, *ended) / search.length_penalty(len),
                    t.clone(),
                )
            })
            .collect();
        let mut best = scored.clone();
        best.sort_by(|a, b| b.0.total_cmp(&a.0));
        let hyps = beam_search(
            m.begin_decode(&src, 4).unwrap(),
            &bos(1),
            &search,
            Some(EOS),
            limit,
        )
        .unwrap();
        for (k, h) in hyps[0].iter().enumerate() {
            assert_eq!(h.tokens, best[k].1, "alpha {alpha}: rank {k}");
            assert!(
                (h.score - best[k].0).abs() < 1e-4,
                "alpha {alpha}: {} vs {}",
                h.score,
                best[k].0
            );
        }
        // The paper's width finds no better output than the exhaustive search.
        let paper = beam_search(
            m.begin_decode(&src, 4).unwrap(),
            &bos(1),
            &BeamSearch::new(4).with_alpha(alpha),
            Some(EOS),
            limit,
        )
        .unwrap();
        assert!(paper[0][0].score <= hyps[0][0].score + 1e-9);
    }
}

#[test]
fn a_seeded_sample_is_reproducible_and_thread_count_independent() {
    let run = || {
        let m = lm(false, 10);
        let prompts = [vec![3, 4], vec![5], vec![6, 7, 8]];
        let mut out = Vec::new();
        for sampling in [
            Sampling::Temperature(1.0),
            Sampling::TopK {
                k: 4,
                temperature: 0.8,
            },
            Sampling::TopP {
                p: 0.9,
                temperature: 1.2,
            },
        ] {
            let mut rng = StdRng::seed_from_u64(11);
            out.push(
                generate(
                    m.begin_generate(3, 8),
                    &prompts,
                    sampling,
                    Some(EOS),
                    10,
                    &mut rng,
                )
                .unwrap(),
            );
        }
        out
    };
    let pool = |n| rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap();
    let one = pool(1).install(run);
    assert_eq!(one, pool(1).install(run));
    assert_eq!(one, pool(2).install(run));
    assert_ne!(one[0], one[1], "different samplings drew the same tokens");
}

#[test]
fn until_eos_allocates_as_it_goes() {
    // An output projection of zeros: every logit equal, so the lowest id, 0, wins; with eos = 0 every
    // sequence ends at once, and "no maximum length" (usize::MAX) is fine.
    let mut m = EncoderDecoderConfig::new(11, 7, BlockConfig::new(16, 4, 24), 1, 1)
        .with_tie_output(false)
        .init(&mut StdRng::seed_from_u64(12))
        .unwrap();
    m.head.as_mut().unwrap().p.weight.fill(0.0);
    let src = sources();
    let state = m.begin_decode(&src, usize::MAX).unwrap();
    let out = generate(
        state,
        &bos(3),
        Sampling::Greedy,
        Some(0),
        usize::MAX,
        &mut StdRng::seed_from_u64(0),
    )
    .unwrap();
    assert_eq!(out, vec![Vec::<usize>::new(); 3]);
    let state = m.begin_decode(&src, usize::MAX).unwrap();
    let hyps = beam_search(state, &bos(3), &BeamSearch::paper(), Some(0), usize::MAX).unwrap();
    assert!(hyps.iter().all(|h| h[0].tokens.is_empty() && h[0].ended));
}

#[test]
fn bad_decoding_input_is_an_error() {
    let m = seq2seq(false, 19, 13);
    let src = sources();
    let rng = &mut StdRng::seed_from_u64(0);
    let greedy = |prefixes: &[Vec<usize>], sampling, eos, max_new| {
        generate(
            m.begin_decode(&src, 4).unwrap(),
            prefixes,
            sampling,
            eos,
            max_new,
            &mut StdRng::seed_from_u64(0),
        )
    };
    let field = |e: Error| match e {
        Error::InvalidConfig { field, .. } => field,
        e => panic!("{e}"),
    };
    for (search, name) in [
        (BeamSearch::new(0), "width"),
        (BeamSearch::new(2).with_n_best(3), "n_best"),
        (BeamSearch::new(2).with_n_best(0), "n_best"),
        (BeamSearch::new(2).with_alpha(f64::NAN), "alpha"),
        (BeamSearch::new(2).with_alpha(-0.5), "alpha"),
    ] {
        let err = beam_search(m.begin_decode(&src, 4).unwrap(), &bos(3), &search, Some(EOS), 4).unwrap_err();
        assert_eq!(field(err), name);
    }
    for (sampling, name) in [
        (
            Sampling::TopP {
                p: 0.0,
                temperature: 1.0,
            },
            "top_p",
        ),
        (
            Sampling::TopP {
                p: 1.5,
                temperature: 1.0,
            },
            "top_p",
        ),
        (
            Sampling::TopP {
                p: f64::NAN,
                temperature: 1.0,
            },
            "top_p",
        ),
        (Sampling::Temperature(0.0), "temperature"),
        (Sampling::Temperature(f64::NAN), "temperature"),
        (
            Sampling::TopK {
                k: 0,
                temperature: 1.0,
            },
            "top_k",
        ),
    ] {
        assert_eq!(field(greedy(&bos(3), sampling, Some(EOS), 4).unwrap_err()), name);
    }
    assert!(matches!(
        greedy(&[vec![BOS], vec![19], vec![BOS]], Sampling::Greedy, Some(EOS), 4),
        Err(Error::TokenOutOfRange {
            id: 19,
            position: (1, 0),
            ..
        })
    ));
    assert!(matches!(
        greedy(&bos(3), Sampling::Greedy, Some(19), 4),
        Err(Error::InvalidInput { .. })
    ));
    assert!(matches!(
        greedy(&[vec![BOS], vec![], vec![BOS]], Sampling::Greedy, Some(EOS), 4),
        Err(Error::InvalidInput { .. })
    ));
    assert!(matches!(
        greedy(&bos(2), Sampling::Greedy, Some(EOS), 4),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        greedy(&bos(3), Sampling::Greedy, None, usize::MAX),
        Err(Error::InvalidInput { .. })
    ));
    // A used state.
    let mut state = m.begin_decode(&src, 4).unwrap();
    state.feed(Array2::from_elem((3, 1), BOS).view()).unwrap();
    assert!(generate(state, &bos(3), Sampling::Greedy, Some(EOS), 4, rng).is_err());
    // An empty source.
    let empty = TokenBatch::from_sequences(&[vec![3, 4], vec![]], 0).unwrap();
    assert!(matches!(
        m.begin_decode(&empty, 4),
        Err(Error::InvalidInput { .. })
    ));
    assert!(matches!(
        m.begin_decode(&empty, 4)
            .and_then(|state| vaswani::infer::greedy(state, BOS, Some(EOS), 4)),
        Err(Error::InvalidInput { .. })
    ));
    assert!(matches!(
        vaswani::infer::greedy_uncached(&m, &empty, BOS, Some(EOS), 4),
        Err(Error::InvalidInput { .. })
    ));
    // NaN logits during a decode.
    let mut poisoned = m.clone();
    poisoned.visit_mut("", &mut |name, mut t| {
        if name.starts_with("decoder") {
            t.fill(f32::NAN);
        }
    });
    for result in [
        generate(
            poisoned.begin_decode(&src, 4).unwrap(),
            &bos(3),
            Sampling::Greedy,
            Some(EOS),
            4,
            rng,
        )
        .map(|_| ()),
        generate(
            poisoned.begin_decode(&src, 4).unwrap(),
            &bos(3),
            Sampling::Temperature(1.0),
            Some(EOS),
            4,
            rng,
        )
        .map(|_| ()),
        beam_search(
            poisoned.begin_decode(&src, 4).unwrap(),
            &bos(3),
            &BeamSearch::paper(),
            Some(EOS),
            4,
        )
        .map(|_| ()),
    ] {
        assert!(matches!(result, Err(Error::NonFinite { .. })), "{result:?}");
    }
    // A row past the batch.
    let mut state = m.begin_decode(&src, 4).unwrap();
    assert!(state.select(&[0, 3]).is_err());
    assert!(state.select(&[2, 2, 0]).is_ok());
    assert_eq!(Step::<f32>::batch_size(&state), 3);
    let _ = s![..];
}

/// Each row of each map sums to 1 over the keys it may see and is 0 elsewhere.
fn check_maps(maps: &[ndarray::Array4<f32>], allowed: impl Fn(usize, usize, usize) -> bool, what: &str) {
    for (l, m) in maps.iter().enumerate() {
        let (b, h, tq, tk) = m.dim();
        for bi in 0..b {
            for hi in 0..h {
                for i in 0..tq {
                    let row = m.slice(s![bi, hi, i, ..]);
                    let sees = (0..tk).any(|j| allowed(bi, i, j));
                    let sum: f32 = row.sum();
                    assert!(
                        !sees || (sum - 1.0).abs() < 1e-5,
                        "{what}: layer {l}, row sum {sum}"
                    );
                    for j in 0..tk {
                        assert!(
                            allowed(bi, i, j) || row[j] == 0.0,
                            "{what}: layer {l} sees a masked key"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn every_model_hands_back_its_attention_maps() {
    use vaswani::models::{EncoderOnlyConfig, Head, InputKind};
    let src = sources(); // lengths 5, 2, 3
    let src_len = src.lengths().to_vec();
    let m = seq2seq(true, 19, 14);
    let tgt = TokenBatch::from_sequences(&[vec![BOS, 3, 4, 5], vec![BOS], vec![BOS, 6]], 0).unwrap();
    let tgt_len = tgt.lengths().to_vec();
    let maps = m.attention(&src, &tgt).unwrap();
    assert_eq!(
        (maps.encoder.len(), maps.decoder.len(), maps.cross.len()),
        (2, 2, 2)
    );
    assert_eq!(maps.encoder[0].dim(), (3, 4, 5, 5));
    assert_eq!(maps.decoder[1].dim(), (3, 4, 4, 4));
    assert_eq!(maps.cross[1].dim(), (3, 4, 4, 5));
    check_maps(&maps.encoder, |b, _, j| j < src_len[b], "encoder");
    check_maps(&maps.decoder, |b, i, j| j <= i && j < tgt_len[b], "decoder");
    check_maps(&maps.cross, |b, _, j| j < src_len[b], "cross");
    // Heads are kept apart (§3.2.2: concatenated, not averaged).
    let heads = maps.cross[0].slice(s![0, .., 0, ..]);
    assert!(heads.row(0) != heads.row(1));

    let lm = lm(false, 15);
    let tokens = TokenBatch::from_sequences(&[vec![3, 4, 5], vec![6]], 0).unwrap();
    let maps = lm.attention(&tokens).unwrap();
    assert!(maps.encoder.is_empty() && maps.cross.is_empty());
    check_maps(&maps.decoder, |b, i, j| j <= i && j < [3, 1][b], "decoder-only");

    let enc = EncoderOnlyConfig::new(
        InputKind::Tokens { vocab: 11 },
        BlockConfig::new(16, 4, 24),
        3,
        Head::Classify { classes: 2 },
    )
    .init(&mut StdRng::seed_from_u64(16))
    .unwrap();
    let maps = enc.attention(&src.clone().into()).unwrap();
    assert_eq!(maps.encoder.len(), 3);
    check_maps(&maps.encoder, |b, _, j| j < src_len[b], "encoder-only");
}

/// Teacher-forced logits on two threads: with packed weights and small products the two
/// halves of the batch run one per thread, otherwise every product is cut between them.
/// Either way each sequence's logits have the bits of one thread's, for batches of uneven
/// halves and of padded sequences, on the model and on its packed weights, in `f32` and in
/// `f64` (whose weights never pack: its halves had taken other kernels than the whole batch,
/// as every model does on a CPU without the crate's vector kernels).
#[test]
fn teacher_forced_logits_have_the_same_bits_on_one_and_two_threads() {
    fn check<F: vaswani::kernels::Float>() {
        let on = |threads: usize, f: &(dyn Fn() -> (Array2<F>, Array2<F>) + Sync)| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(f)
        };
        // Products far below the split (widths 16 and 64), then 64 sequences of 48 positions
        // at width 128 (2 · 3072 · 128² FLOPs a product, above it).
        for (b, t, d) in [
            (1, 5, 16),
            (2, 5, 16),
            (3, 7, 16),
            (9, 4, 16),
            (2, 5, 64),
            (16, 16, 64),
            (4, 40, 64),
            (64, 48, 128),
        ] {
            let model: EncoderDecoder<F> =
                EncoderDecoderConfig::new(11, 13, BlockConfig::new(d, 4, 2 * d), 2, 2)
                    .init_as(&mut StdRng::seed_from_u64(b as u64))
                    .unwrap();
            let seqs = |len: usize, v: usize, shift: usize| -> Vec<Vec<usize>> {
                (0..b)
                    .map(|i| {
                        (0..1 + (i * 3 + shift) % len)
                            .map(|j| 3 + (i + j * 5) % (v - 3))
                            .collect()
                    })
                    .collect()
            };
            let src = TokenBatch::from_sequences(&seqs(t, 11, 2), 0).unwrap();
            let tgt = TokenBatch::from_sequences(&seqs(t, 13, 1), 0).unwrap();
            let run = || {
                let packed = model.packed();
                (
                    model.infer(&src, &tgt).unwrap(),
                    packed.infer(&src, &tgt).unwrap(),
                )
            };
            let bits = |a: &Array2<F>| a.iter().map(|v| v.to_f64().to_bits()).collect::<Vec<_>>();
            let (one, two) = (on(1, &run), on(2, &run));
            let name = std::any::type_name::<F>();
            assert_eq!(
                bits(&one.0),
                bits(&two.0),
                "{b} sequences of {t} at width {d}, the model, {name}"
            );
            assert_eq!(
                bits(&one.1),
                bits(&two.1),
                "{b} sequences of {t} at width {d}, packed, {name}"
            );
            assert_eq!(one.0.nrows(), b * tgt.seq_len());
        }
    }
    check::<f32>();
    check::<f64>();
}

/// A beam search over many sources on a team: its sequences extended side by side on the
/// threads, the caches reordered by the team at every step and the decoding steps in runs of
/// sequences. The hypotheses keep their tokens and the bits of their log-probabilities on
/// one, two and three threads.
#[test]
fn beam_search_gives_the_same_hypotheses_on_one_two_and_three_threads() {
    let m = seq2seq(false, 19, 5);
    let seqs: Vec<Vec<usize>> = (0..9)
        .map(|i| (0..2 + i % 5).map(|j| 3 + (i * 3 + j * 5) % 8).collect())
        .collect();
    let src = TokenBatch::from_sequences(&seqs, 0).unwrap();
    let search = BeamSearch::paper().with_n_best(3);
    let run = || beam_search(m.begin_decode(&src, 4).unwrap(), &bos(9), &search, Some(EOS), 9).unwrap();
    let pool = |n| rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap();
    let one = pool(1).install(run);
    for threads in [2, 3] {
        let other = pool(threads).install(run);
        for (i, (a, b)) in one.iter().zip(&other).enumerate() {
            assert_eq!(a.len(), b.len(), "sequence {i}, {threads} threads");
            for (x, y) in a.iter().zip(b) {
                assert_eq!(x.tokens, y.tokens, "sequence {i}, {threads} threads");
                assert_eq!(x.ended, y.ended, "sequence {i}, {threads} threads");
                assert_eq!(
                    x.log_prob.to_bits(),
                    y.log_prob.to_bits(),
                    "sequence {i}, {threads} threads"
                );
            }
        }
    }
}
