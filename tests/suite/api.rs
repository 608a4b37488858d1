//! The API a newcomer meets: `f32` without annotations, defaults, one builder name per field.

use std::fs;
use std::path::Path;

use vaswani::blocks::{BlockConfig, DecoderConfig, EncoderConfig};
use vaswani::io::TorchTransformerConfig;
use vaswani::layers::DropoutConfig;
use vaswani::models::{DecoderOnlyConfig, EncoderDecoder, EncoderDecoderConfig};
use vaswani::rand::{SeedableRng, rngs::StdRng};
use vaswani::train::{AdamConfig, OptimizerConfig, Schedule, Trainer, TrainerConfig};

/// `let model = cfg.init(&mut rng)?;` is an `f32` model, and what takes a model (the trainer,
/// the loader) needs no float type either.
#[test]
fn f32_needs_no_annotation() -> vaswani::Result<()> {
    let mut rng = StdRng::seed_from_u64(0);
    let cfg = EncoderDecoderConfig::new(9, 9, BlockConfig::new(8, 2, 16), 1, 1);
    let model = cfg.init(&mut rng)?;
    let same: &EncoderDecoder<f32> = &model;
    let src = vaswani::models::TokenBatch::from_sequences(&[vec![3, 4]], 0)?;
    let greedy = vaswani::infer::greedy(same.begin_decode(&src, 3)?, 1, Some(2), 3)?;
    assert_eq!(greedy.len(), 1);
    let trainer = Trainer::new(model, TrainerConfig::default())?;
    let path = std::env::temp_dir().join(format!("vaswani-api-{}.safetensors", std::process::id()));
    vaswani::io::save_model(&path, &trainer.model)?;
    let loaded = vaswani::io::load_model::<EncoderDecoder>(&path)?;
    assert_eq!(loaded, trainer.model);
    let lm = DecoderOnlyConfig::new(9, BlockConfig::new(8, 2, 16), 1).init(&mut rng)?;
    let _: &vaswani::models::DecoderOnly<f32> = &lm;
    // f64 is the opt-in.
    let m64 = cfg.init_as::<f64>(&mut rng)?;
    let _: Trainer<EncoderDecoder<f64>> = Trainer::new(m64, TrainerConfig::default())?;
    fs::remove_file(&path).ok();
    Ok(())
}

#[test]
fn defaults_are_the_papers() {
    assert_eq!(BlockConfig::default(), BlockConfig::new(512, 8, 2048));
    assert_eq!(BlockConfig::default().p_drop, 0.1);
    assert_eq!(
        EncoderConfig::default(),
        EncoderConfig::new(BlockConfig::new(512, 8, 2048), 6)
    );
    assert_eq!(
        DecoderConfig::default(),
        DecoderConfig::new(BlockConfig::new(512, 8, 2048), 6)
    );
    assert_eq!(DropoutConfig::default(), DropoutConfig::new(0.1));
    assert_eq!(AdamConfig::default(), AdamConfig::paper());
    assert_eq!(
        OptimizerConfig::default(),
        OptimizerConfig::Adam(AdamConfig::paper())
    );
    let t = TrainerConfig::default();
    assert_eq!(t, TrainerConfig::paper(512, 4000));
    assert_eq!(t.schedule, Schedule::paper(512, 4000));
    assert_eq!(t.label_smoothing, 0.1);
    let torch = TorchTransformerConfig::default();
    assert_eq!(
        (
            torch.d_model,
            torch.nhead,
            torch.num_encoder_layers,
            torch.dim_feedforward
        ),
        (512, 8, 6, 2048)
    );
    // The base preset is built from the default block.
    assert_eq!(EncoderDecoderConfig::base(100).block, BlockConfig::default());
}

/// Every `with_x` builder of every config sets the field `x`: one name per field, the same
/// in every config (`with_p_drop` sets `p_drop` in all of them).
#[test]
fn one_builder_name_per_field() {
    fn walk(dir: &Path, out: &mut Vec<(String, String)>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = fs::read_to_string(&path).unwrap();
                let lines: Vec<&str> = text.lines().collect();
                for (i, line) in lines.iter().enumerate() {
                    let Some(rest) = line.trim().strip_prefix("pub fn with_") else {
                        continue;
                    };
                    if !rest.contains("(mut self") {
                        continue;
                    }
                    let name = rest.split('(').next().unwrap().to_string();
                    let set = lines[i + 1..]
                        .iter()
                        .find_map(|l| l.trim().strip_prefix("self."))
                        .map(|l| l.split(' ').next().unwrap().to_string())
                        .unwrap_or_default();
                    out.push((
                        format!("{}:{} with_{name}", path.display(), i + 1),
                        set + "|" + &name,
                    ));
                }
            }
        }
    }
    let mut builders = Vec::new();
    walk(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut builders);
    assert!(builders.len() > 20, "{builders:?}");
    let bad: Vec<&String> = builders
        .iter()
        .filter(|(_, pair)| {
            let (field, name) = pair.split_once('|').unwrap();
            field != name
        })
        .map(|(at, _)| at)
        .collect();
    assert!(bad.is_empty(), "builders named unlike their field: {bad:?}");
}

/// Feature windows of different lengths become one padded batch, and the encoder-only model
/// takes a batch of either kind by reference or by value, without `.into()`.
#[test]
fn feature_batches_from_sequences_and_inputs_without_into() -> vaswani::Result<()> {
    use vaswani::models::{EncoderOnlyConfig, FeatureBatch, Head, InputKind, TokenBatch};
    use vaswani::ndarray::{Array2, Array3, s};
    let windows = vec![
        Array2::from_shape_fn((4, 3), |(t, c)| (t * 3 + c) as f32),
        Array2::from_shape_fn((2, 3), |(t, c)| -((t * 3 + c) as f32)),
    ];
    let batch = FeatureBatch::from_sequences(&windows)?;
    let mut x = Array3::<f32>::zeros((2, 4, 3));
    x.slice_mut(s![0, .., ..]).assign(&windows[0]);
    x.slice_mut(s![1, ..2, ..]).assign(&windows[1]);
    assert_eq!(batch, FeatureBatch::new(x, vec![4, 2])?);
    // Views work as well as arrays; widths must agree; an empty list is an error.
    let views = [windows[0].view(), windows[1].view()];
    assert_eq!(FeatureBatch::from_sequences(views)?, batch);
    let wrong = [Array2::<f32>::zeros((2, 3)), Array2::zeros((2, 4))];
    assert!(matches!(
        FeatureBatch::from_sequences(&wrong),
        Err(vaswani::Error::ShapeMismatch { .. })
    ));
    assert!(FeatureBatch::<f32>::from_sequences(Vec::<Array2<f32>>::new().iter()).is_err());

    let mut rng = StdRng::seed_from_u64(1);
    let cfg = EncoderOnlyConfig::new(
        InputKind::Features { d_in: 3 },
        BlockConfig::new(8, 2, 16),
        1,
        Head::Classify { classes: 3 },
    );
    let model = cfg.init(&mut rng)?;
    let by_ref = model.infer(&batch)?;
    assert_eq!(model.infer(batch.clone())?, by_ref);
    let alone = model.infer(&FeatureBatch::from_sequences(&windows[1..])?)?;
    for (a, b) in alone.row(0).iter().zip(by_ref.row(1)) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
    assert_eq!(model.predict(&batch)?.len(), 2);
    assert_eq!(model.pooled(&batch)?.dim(), (2, 8));
    let tokens = EncoderOnlyConfig::new(
        InputKind::Tokens { vocab: 10 },
        BlockConfig::new(8, 2, 16),
        1,
        Head::Classify { classes: 3 },
    )
    .init(&mut rng)?;
    let ids = TokenBatch::from_sequences(&[vec![1, 2, 3], vec![4]], 0)?;
    assert_eq!(tokens.infer(&ids)?, tokens.infer(ids.clone())?);
    Ok(())
}

/// `EncoderOnly::loss` evaluates a batch as training would score it, without dropout and
/// without touching any gradient, for classifiers and regressors.
#[test]
fn encoder_only_loss_for_evaluation() -> vaswani::Result<()> {
    use vaswani::Params;
    use vaswani::models::{EncoderOnlyConfig, FeatureBatch, Head, InputKind, LabeledBatch, Targets};
    use vaswani::ndarray::{Array2, Array3};
    use vaswani::train::Trainable;
    let mut rng = StdRng::seed_from_u64(2);
    let input = FeatureBatch::new(
        Array3::from_shape_fn((3, 4, 2), |(b, t, c)| (b + t * c) as f32 * 0.1),
        vec![4, 3, 1],
    )?;
    for (head, targets) in [
        (Head::Classify { classes: 3 }, Targets::Classes(vec![0, 2, 1])),
        (
            Head::Regress { outputs: 2 },
            Targets::Values(Array2::from_shape_fn((3, 2), |(b, o)| (b as f32) - o as f32)),
        ),
    ] {
        let cfg = EncoderOnlyConfig::new(
            InputKind::Features { d_in: 2 },
            BlockConfig::new(8, 2, 16).with_p_drop(0.0),
            1,
            head,
        );
        let model = cfg.init(&mut rng)?;
        let batch = LabeledBatch::new(&input, targets);
        let eval = model.loss(&batch, 0.1)?;
        // Training's loss with dropout off is the same number.
        let mut grads = model.zeros_like();
        let train = model.accumulate(&batch, 0.1, 1.0, &mut grads, &mut rng)?;
        assert!(
            (eval.loss - train.loss).abs() < 1e-6,
            "{head:?}: {eval:?} vs {train:?}"
        );
        assert_eq!((eval.tokens, eval.correct), (train.tokens, train.correct));
        assert!(eval.loss.is_finite() && eval.loss > 0.0);
    }
    // Targets that do not fit the head are refused, as in training.
    let model = EncoderOnlyConfig::new(
        InputKind::Features { d_in: 2 },
        BlockConfig::new(8, 2, 16),
        1,
        Head::Classify { classes: 3 },
    )
    .init(&mut rng)?;
    assert!(
        model
            .loss(&LabeledBatch::new(&input, Targets::Classes(vec![0, 5, 1])), 0.0)
            .is_err()
    );
    assert!(
        model
            .loss(&LabeledBatch::new(&input, Targets::Classes(vec![0])), 0.0)
            .is_err()
    );
    Ok(())
}
