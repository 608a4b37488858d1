//! Bad values from users and files, through the public API: each answer is an `Err` that
//! names what is wrong, never a panic and never an answer computed from values that mean
//! nothing.

use ndarray::{Array2, array};
use rand::{SeedableRng, rngs::StdRng};
use vaswani::blocks::BlockConfig;
use vaswani::infer::Sampling;
use vaswani::models::{
    DecoderOnlyConfig, EncoderDecoderConfig, EncoderOnlyConfig, Head, InputKind, LmBatch, Positions,
    TokenBatch,
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
        .init(&mut rng)
        .unwrap();
    assert!(
        model
            .begin_decode(&src, 4)
            .and_then(|state| vaswani::infer::greedy(state, 1, Some(2), 4))
            .is_ok()
    );
    assert!(poison(&mut model, "decoder") > 0);
    for result in [
        model
            .begin_decode(&src, 4)
            .and_then(|state| vaswani::infer::greedy(state, 1, Some(2), 4)),
        vaswani::infer::greedy_uncached(&model, &src, 1, Some(2), 4),
        model
            .packed()
            .begin_decode(&src, 4)
            .and_then(|state| vaswani::infer::greedy(state, 1, Some(2), 4)),
    ] {
        let err = result.unwrap_err();
        assert!(matches!(err, Error::NonFinite { .. }), "{err}");
        assert!(err.to_string().contains("logits of the next token"), "{err}");
    }

    let head = Head::Classify { classes: 3 };
    let mut model = EncoderOnlyConfig::new(InputKind::Tokens { vocab: 9 }, block(), 1, head)
        .init(&mut rng)
        .unwrap();
    assert!(model.predict(&src).is_ok());
    assert!(poison(&mut model, "head") > 0);
    let err = model.predict(&src).unwrap_err();
    assert!(matches!(err, Error::NonFinite { .. }), "{err}");
    assert!(err.to_string().contains("class logits of batch row 0"), "{err}");

    let mut model = DecoderOnlyConfig::new(9, block(), 1).init(&mut rng).unwrap();
    assert!(poison(&mut model, "blocks") > 0);
    let err = vaswani::infer::continue_prompt(&model, &[1, 2], 3, Sampling::Greedy, &mut rng).unwrap_err();
    assert!(matches!(err, Error::NonFinite { .. }), "{err}");
}

#[test]
fn generate_checks_the_whole_prompt_at_its_own_positions() {
    let mut rng = StdRng::seed_from_u64(2);
    // A learned position table of 4: a prompt of 6 is cropped to its last 4 tokens.
    let model = DecoderOnlyConfig::new(9, block(), 1)
        .with_positions(Positions::Learned { max_len: 4 })
        .init(&mut rng)
        .unwrap();
    assert!(
        vaswani::infer::continue_prompt(&model, &[1, 2, 3, 4, 5, 6], 2, Sampling::Greedy, &mut rng).is_ok()
    );
    // An id out of range before the window, then inside it.
    for (t, prompt) in [(0, [99, 2, 3, 4, 5, 6]), (4, [1, 2, 3, 4, 99, 6])] {
        match vaswani::infer::continue_prompt(&model, &prompt, 2, Sampling::Greedy, &mut rng) {
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
    let model = DecoderOnlyConfig::new(9, block(), 1).init(&mut rng).unwrap();
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

/// A safetensors file of the given header tensors (JSON), each with no data.
fn safetensors(header: &str) -> Vec<u8> {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes
}

#[test]
fn a_tensor_of_zero_elements_with_a_vast_shape_is_an_error_in_every_loader() {
    let vast = r#"{"src":{"dtype":"F32","shape":[0,9223372036854775808,4],"data_offsets":[0,0]},"src_key_padding_mask":{"dtype":"BOOL","shape":[0,9223372036854775808],"data_offsets":[0,0]}}"#;
    let err = vaswani::io::TensorFile::from_bytes("vast.safetensors", safetensors(vast)).unwrap_err();
    assert!(matches!(err, Error::Checkpoint { .. }), "{err}");
    assert!(err.to_string().contains("too large to address"), "{err}");

    let dir = std::env::temp_dir().join(format!("vaswani-hardening-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("vast.safetensors");
    std::fs::write(&path, safetensors(vast)).unwrap();
    let err = vaswani::io::parity(&path, dir.join("out.safetensors")).unwrap_err();
    assert!(err.to_string().contains("too large to address"), "{err}");
    let err = vaswani::io::load_model::<vaswani::models::DecoderOnly>(&path).unwrap_err();
    assert!(err.to_string().contains("too large to address"), "{err}");
    // A small zero-element tensor is a tensor like any other.
    let empty = r#"{"x":{"dtype":"F32","shape":[0,3],"data_offsets":[0,0]}}"#;
    let file = vaswani::io::TensorFile::from_bytes("empty.safetensors", safetensors(empty)).unwrap();
    assert_eq!(file.float::<f32>("x").unwrap().shape(), &[0, 3]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The config error of `result`, as `(field, message)`.
fn config_error<T: std::fmt::Debug>(result: vaswani::Result<T>) -> (&'static str, String) {
    match result {
        Err(e @ Error::InvalidConfig { field, .. }) => (field, e.to_string()),
        other => panic!("expected a config error, got {other:?}"),
    }
}

#[test]
fn a_bad_clip_norm_is_refused_naming_the_value() {
    use vaswani::train::{Trainer, TrainerConfig};
    let model = DecoderOnlyConfig::new(9, block(), 1)
        .init(&mut StdRng::seed_from_u64(4))
        .unwrap();
    for bad in [-1.0, 0.0, f64::NAN, f64::INFINITY] {
        let mut cfg = TrainerConfig::paper(8, 10);
        cfg.clip_norm = Some(bad);
        let (field, msg) = config_error(Trainer::new(model.clone(), cfg));
        assert_eq!(field, "clip_norm");
        assert!(msg.contains(&format!("got {bad}")), "{msg}");
    }
    let mut cfg = TrainerConfig::paper(8, 10);
    cfg.clip_norm = Some(1.0);
    assert!(Trainer::new(model, cfg).is_ok());
}

#[test]
fn a_step_count_past_the_bound_is_refused_from_a_file_with_a_valid_checksum() {
    use vaswani::io::{inspect, load_trainer, save_trainer};
    use vaswani::models::DecoderOnly;
    use vaswani::train::{Trainer, TrainerConfig};
    let model = DecoderOnlyConfig::new(9, block(), 1)
        .init(&mut StdRng::seed_from_u64(5))
        .unwrap();
    let mut trainer = Trainer::new(model, TrainerConfig::paper(8, 10)).unwrap();
    let dir = std::env::temp_dir().join(format!("vaswani-steps-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("trainer.safetensors");
    for (t, ok) in [
        (vaswani::train::MAX_STEPS, true),
        (vaswani::train::MAX_STEPS + 1, false),
        (u64::MAX, false),
    ] {
        match &mut trainer.optimizer {
            vaswani::train::OptimizerState::Adam(adam) => adam.t = t,
            other => panic!("the paper's trainer has Adam, got {other:?}"),
        }
        save_trainer(&path, &trainer).unwrap();
        let loaded = load_trainer::<DecoderOnly>(&path);
        assert_eq!(loaded.is_ok(), ok, "step {t}: {:?}", loaded.err());
        if !ok {
            let err = loaded.unwrap_err().to_string();
            assert!(err.contains(&format!("step {t}")), "{err}");
            assert!(inspect(&path).is_err());
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_vast_config_is_a_config_error_not_a_panic() {
    let mut rng = StdRng::seed_from_u64(6);
    let (field, msg) = config_error(DecoderOnlyConfig::new(1_000_000_000_000, block(), 1).init(&mut rng));
    assert_eq!(field, "vocab");
    assert!(msg.contains("1000000000000"), "{msg}");
    // Addressable, but far more than any machine holds: 2⁴⁰ × 8 × 4 bytes = 32 TiB. (A
    // system set to promise every allocation, `vm.overcommit_memory = 1`, cannot refuse it.)
    let promises_all =
        std::fs::read_to_string("/proc/sys/vm/overcommit_memory").is_ok_and(|s| s.trim() == "1");
    if !promises_all {
        let (field, msg) = config_error(EncoderDecoderConfig::new(9, 1 << 40, block(), 1, 1).init(&mut rng));
        assert_eq!(field, "vocab");
        assert!(msg.contains("more than can be allocated"), "{msg}");
    }
    let head = Head::Classify {
        classes: usize::MAX / 2,
    };
    let (field, _) =
        config_error(EncoderOnlyConfig::new(InputKind::Tokens { vocab: 9 }, block(), 1, head).init(&mut rng));
    assert_eq!(field, "d_out");
    let (field, _) = config_error(
        DecoderOnlyConfig::new(9, BlockConfig::new(8, 2, usize::MAX / 4), 1).init_as::<f64>(&mut rng),
    );
    assert_eq!(field, "d_ff");
    let (field, _) = config_error(
        DecoderOnlyConfig::new(9, block(), 1)
            .with_positions(Positions::Learned {
                max_len: usize::MAX / 8,
            })
            .init(&mut rng),
    );
    assert_eq!(field, "max_len");
}
