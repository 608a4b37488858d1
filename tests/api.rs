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
    let greedy = same.greedy(
        &vaswani::models::TokenBatch::from_sequences(&[vec![3, 4]], 0)?,
        1,
        2,
        3,
    )?;
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
