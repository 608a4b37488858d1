//! Checkpoints: round trips, exact resumption, and every bad file of BAD_INPUTS.md rows 12–19.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use rand::{Rng, SeedableRng, rngs::StdRng};
use vaswani::blocks::BlockConfig;
use vaswani::io::{inspect, load_into, load_model, load_trainer, save_model, save_trainer};
use vaswani::kernels::Activation;
use vaswani::models::{EncoderDecoder, EncoderDecoderConfig, Seq2SeqBatch};
use vaswani::train::{AdamConfig, OptimizerConfig, Schedule, Trainer, TrainerConfig};
use vaswani::{Error, Params};

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vaswani-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn config() -> EncoderDecoderConfig {
    EncoderDecoderConfig::new(11, 11, BlockConfig::new(8, 2, 12), 1, 1)
        .with_share_embeddings(true)
        .with_tie_output(true)
}

fn model(seed: u64) -> EncoderDecoder {
    config().init(&mut StdRng::seed_from_u64(seed)).unwrap()
}

fn checkpoint_error(r: Result<EncoderDecoder, Error>) -> String {
    match r {
        Err(Error::Checkpoint { why, .. }) => why,
        other => panic!("expected a checkpoint error, got {other:?}"),
    }
}

/// A raw safetensors file: header JSON and data bytes as given.
fn raw(header: &str, data: &[u8]) -> Vec<u8> {
    raw_bytes(header.as_bytes(), data)
}

fn raw_bytes(header: &[u8], data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend(header);
    out.extend(data);
    out
}

/// Every tensor's name and byte range in a header, by start offset.
fn by_offset(header: &serde_json::Value) -> Vec<(String, usize, usize)> {
    let range = |v: &serde_json::Value, i: usize| v["data_offsets"][i].as_u64().unwrap() as usize;
    let mut out: Vec<(String, usize, usize)> = header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| (k.clone(), range(v, 0), range(v, 1)))
        .collect();
    out.sort_by_key(|e| e.1);
    out
}

/// A hand-edited checkpoint with its checksum recomputed, so that the loader's deeper checks
/// (rather than the checksum) meet the edit.
fn resealed(bytes: Vec<u8>) -> Vec<u8> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = bytes[8 + n..].to_vec();
    let digest = vaswani::io::TensorFile::from_bytes("edit", bytes)
        .unwrap()
        .digest("checksum");
    header["__metadata__"]["checksum"] = serde_json::json!(format!("{digest:016x}"));
    raw(&header.to_string(), &data)
}

#[test]
fn round_trip_is_exact_for_f32_and_f64() {
    let path = temp("round_trip.safetensors");
    let m = model(1);
    save_model(&path, &m).unwrap();
    let loaded: EncoderDecoder = load_model(&path).unwrap();
    assert_eq!(loaded, m);
    let m64: EncoderDecoder<f64> = config().init_as(&mut StdRng::seed_from_u64(2)).unwrap();
    save_model(&path, &m64).unwrap();
    assert_eq!(load_model::<EncoderDecoder<f64>>(&path).unwrap(), m64);
    // An f64 file into an f32 model: refused, since most values would round.
    let why = checkpoint_error(load_model::<EncoderDecoder>(&path));
    assert!(why.contains("not exactly representable in f32"), "{why}");
    let info = inspect(&path).unwrap();
    assert_eq!(
        (info.kind.as_str(), info.dtype.as_str(), info.params),
        ("encoder_decoder", "f64", m64.num_params() as u64)
    );
}

fn trainer(seed: u64) -> Trainer<EncoderDecoder> {
    let cfg = TrainerConfig {
        optimizer: OptimizerConfig::Adam(AdamConfig::paper()),
        schedule: Schedule::Noam {
            d_model: 8,
            warmup: 4,
            scale: 1.0,
        },
        clip_norm: Some(1.0),
        label_smoothing: 0.1,
        precision: vaswani::Precision::F32,
    };
    let block = BlockConfig::new(8, 2, 12)
        .with_p_drop(0.1)
        .with_activation(Activation::Gelu);
    let m = EncoderDecoderConfig::new(11, 11, block, 1, 1)
        .init(&mut StdRng::seed_from_u64(seed))
        .unwrap();
    Trainer::new(m, cfg).unwrap()
}

/// Step k's data and dropout come from RNGs seeded by (seed, k), so a resumed run sees what an
/// uninterrupted one would.
fn step(trainer: &mut Trainer<EncoderDecoder>, k: u64) -> f64 {
    let mut data = StdRng::seed_from_u64(1000 + k);
    let pairs: Vec<(Vec<usize>, Vec<usize>)> = (0..6)
        .map(|_| {
            let s: Vec<usize> = (0..data.random_range(1..6))
                .map(|_| data.random_range(3..11))
                .collect();
            (s.clone(), s)
        })
        .collect();
    let batch = Seq2SeqBatch::from_pairs(&pairs, 1, 2, 0).unwrap();
    trainer
        .step(&[batch], &mut StdRng::seed_from_u64(2000 + k))
        .unwrap()
        .loss
        .loss
}

#[test]
fn resuming_continues_bit_for_bit() {
    let mut straight = trainer(3);
    let losses: Vec<f64> = (0..10).map(|k| step(&mut straight, k)).collect();
    let mut first = trainer(3);
    for k in 0..4 {
        step(&mut first, k);
    }
    let path = temp("resume.safetensors");
    save_trainer(&path, &first).unwrap();
    let mut resumed: Trainer<EncoderDecoder> = load_trainer(&path).unwrap();
    assert_eq!(resumed.steps(), 4);
    let after: Vec<f64> = (4..10).map(|k| step(&mut resumed, k)).collect();
    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&after), bits(&losses[4..]));
    assert_eq!(resumed.model, straight.model);
    // A plain model file has no training state.
    save_model(&path, &first.model).unwrap();
    assert!(matches!(
        load_trainer::<EncoderDecoder>(&path),
        Err(Error::Checkpoint { .. })
    ));
}

#[test]
fn row_12_truncated_or_corrupted_files() {
    let path = temp("good.safetensors");
    save_model(&path, &model(4)).unwrap();
    let good = std::fs::read(&path).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("short file", good[..5].to_vec()),
        ("truncated data", good[..good.len() - 3].to_vec()),
        ("header length past the end", {
            let mut b = good.clone();
            b[..8].copy_from_slice(&(good.len() as u64).to_le_bytes());
            b
        }),
        ("bad UTF-8", raw_bytes(b"{\"a\xff\": 1}", &[])),
        (
            "bad JSON",
            raw(
                "{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]",
                &[0; 4],
            ),
        ),
        (
            "overlapping offsets",
            raw(
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
                &[0; 12],
            ),
        ),
        (
            "a gap",
            raw(
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#,
                &[0; 12],
            ),
        ),
        ("trailing bytes", {
            let mut b = good.clone();
            b.extend([0u8; 7]);
            b
        }),
        ("a flipped bit in the data", {
            let mut b = good.clone();
            let last = b.len() - 1;
            b[last] ^= 0x10;
            b
        }),
    ];
    for (what, bytes) in cases {
        std::fs::write(&path, &bytes).unwrap();
        let why = checkpoint_error(load_model(&path));
        assert!(!why.is_empty(), "{what}");
    }
}

#[test]
fn row_13_huge_declared_sizes_fail_before_allocating() {
    let path = temp("huge.safetensors");
    // A header length of 2^63.
    let mut b = (1u64 << 63).to_le_bytes().to_vec();
    b.extend(b"{}");
    std::fs::write(&path, &b).unwrap();
    assert!(checkpoint_error(load_model(&path)).contains("past the end"));
    // A shape whose product overflows.
    std::fs::write(
        &path,
        raw(
            r#"{"a":{"dtype":"F32","shape":[2,9223372036854775807],"data_offsets":[0,8]}}"#,
            &[0; 8],
        ),
    )
    .unwrap();
    checkpoint_error(load_model(&path));
    // A config with a vocabulary of 10^12 in an otherwise valid small file: refused by the
    // parameter count before the 10^12 × d_model embedding is allocated.
    save_model(&path, &model(5)).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let text = String::from_utf8_lossy(&bytes).to_string();
    let patched = text
        .replacen("\\\"src_vocab\\\":11", "\\\"src_vocab\\\":1000000000000", 1)
        .replacen("\\\"tgt_vocab\\\":11", "\\\"tgt_vocab\\\":1000000000000", 1);
    assert_ne!(patched, text, "the config should hold the vocabulary");
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = &patched.as_bytes()[8..8 + n + (patched.len() - text.len())];
    let data = &bytes[8 + n..];
    let edited = raw(std::str::from_utf8(header).unwrap(), data);
    // The checksum catches the edit first; resealed, the parameter bound does.
    std::fs::write(&path, &edited).unwrap();
    assert!(checkpoint_error(load_model(&path)).contains("checksum"));
    std::fs::write(&path, resealed(edited)).unwrap();
    let why = checkpoint_error(load_model(&path));
    assert!(
        why.contains("implies") && why.contains("more than a file"),
        "{why}"
    );
}

#[test]
fn row_14_a_checkpoint_for_another_config() {
    let path = temp("other.safetensors");
    save_model(&path, &model(6)).unwrap();
    // Same sizes, other head count and norm placement: the shapes match, the config does not.
    let other_cfg = EncoderDecoderConfig::new(11, 11, BlockConfig::new(8, 4, 12).with_norm_first(true), 1, 1)
        .with_share_embeddings(true)
        .with_tie_output(true);
    let mut other: EncoderDecoder = other_cfg.init(&mut StdRng::seed_from_u64(0)).unwrap();
    let why = match load_into(&path, &mut other) {
        Err(Error::Checkpoint { why, .. }) => why,
        r => panic!("{r:?}"),
    };
    assert!(
        why.contains("block.n_heads: model 4, file 2") && why.contains("block.norm_first"),
        "{why}"
    );
    // Other sizes: every mismatching tensor is listed.
    let bigger: EncoderDecoder = EncoderDecoderConfig::new(11, 11, BlockConfig::new(8, 2, 16), 1, 1)
        .with_share_embeddings(true)
        .with_tie_output(true)
        .init(&mut StdRng::seed_from_u64(0))
        .unwrap();
    save_model(&path, &bigger).unwrap();
    let mut m = model(0);
    let why = match load_into(&path, &mut m) {
        Err(Error::Checkpoint { why, .. }) => why,
        r => panic!("{r:?}"),
    };
    assert!(why.contains("d_ff: model 12, file 16"), "{why}");
    // The right model loads.
    save_model(&path, &model(7)).unwrap();
    load_into(&path, &mut m).unwrap();
    assert_eq!(m, model(7));
}

/// The checkpoint's header JSON and the bytes of its data, to rebuild modified files.
fn split(bytes: &[u8]) -> (serde_json::Value, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (
        serde_json::from_slice(&bytes[8..8 + n]).unwrap(),
        bytes[8 + n..].to_vec(),
    )
}

#[test]
fn rows_15_16_18_dtypes_alignment_missing_tied_weights() {
    let path = temp("dtypes.safetensors");
    let m = model(8);
    save_model(&path, &m).unwrap();
    let (header, data) = split(&std::fs::read(&path).unwrap());
    let name = "src_embed.weight";
    let entry = header[name].clone();
    let [start, end] = [
        entry["data_offsets"][0].as_u64().unwrap() as usize,
        entry["data_offsets"][1].as_u64().unwrap() as usize,
    ];
    // Row 15: BF16 of the same values rounded is converted exactly; I64 is refused by name.
    let rebuild = |dtype: &str, tensor_bytes: Vec<u8>| {
        let mut h = header.clone();
        let mut d = Vec::new();
        let offsets = by_offset(&h);
        for (k, s, e) in offsets {
            let bytes = if k == name {
                tensor_bytes.clone()
            } else {
                data[s..e].to_vec()
            };
            h[&k]["data_offsets"] = serde_json::json!([d.len(), d.len() + bytes.len()]);
            if k == name {
                h[&k]["dtype"] = serde_json::json!(dtype);
            }
            d.extend(bytes);
        }
        raw(&h.to_string(), &d)
    };
    let f32s: Vec<f32> = data[start..end]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let bf16: Vec<u8> = f32s
        .iter()
        .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())
        .collect();
    std::fs::write(&path, resealed(rebuild("BF16", bf16))).unwrap();
    let loaded: EncoderDecoder = load_model(&path).unwrap();
    let got = &loaded.src_embed.p.weight;
    assert!(
        got.iter()
            .zip(&f32s)
            .all(|(g, w)| *g == f32::from_bits((w.to_bits() >> 16) << 16))
    );
    let i64s: Vec<u8> = f32s.iter().flat_map(|v| (*v as i64).to_le_bytes()).collect();
    std::fs::write(&path, resealed(rebuild("I64", i64s))).unwrap();
    let why = checkpoint_error(load_model(&path));
    assert!(why.contains(name) && why.contains("I64"), "{why}");
    // Row 16: a byte length that is not a whole number of elements is refused.
    std::fs::write(&path, rebuild("F32", data[start..end - 2].to_vec())).unwrap();
    checkpoint_error(load_model(&path));
    // Row 16: unaligned data (an odd-length U8 tensor first shifts every offset) decodes.
    let mut h = header.clone();
    let mut d = vec![7u8; 3];
    h["odd"] = serde_json::json!({"dtype": "U8", "shape": [3], "data_offsets": [0, 3]});
    let entries = by_offset(&header);
    for (k, s, e) in entries {
        h[&k]["data_offsets"] = serde_json::json!([d.len(), d.len() + (e - s)]);
        d.extend(&data[s..e]);
    }
    let shifted = resealed(raw(&h.to_string(), &d));
    // Every F32 tensor now starts 3 bytes past a multiple of 4: read by copying, its values
    // are the original ones.
    let file = vaswani::io::TensorFile::from_bytes("shifted", shifted.clone()).unwrap();
    assert_eq!(
        file.float::<f32>(name).unwrap(),
        m.src_embed.p.weight.clone().into_dyn()
    );
    // The model loader reads it too, and refuses only the tensor it does not know.
    std::fs::write(&path, shifted).unwrap();
    let why = checkpoint_error(load_model(&path));
    assert!(why.contains("unexpected [\"odd\"]"), "{why}");
    // Row 18: the shared, tied embedding missing: the error names it.
    let mut h = header.clone();
    h.as_object_mut().unwrap().remove(name);
    let mut d = Vec::new();
    let entries = by_offset(&h);
    for (k, s, e) in entries {
        h[&k]["data_offsets"] = serde_json::json!([d.len(), d.len() + (e - s)]);
        d.extend(&data[s..e]);
    }
    std::fs::write(&path, resealed(raw(&h.to_string(), &d))).unwrap();
    let why = checkpoint_error(load_model(&path));
    assert!(why.contains("missing") && why.contains(name), "{why}");
}

#[test]
fn row_17_not_a_checkpoint_at_all() {
    let path = temp("other_format.bin");
    for (bytes, expect) in [
        (b"PK\x03\x04\x14\x00\x00\x00archive".to_vec(), "zip"),
        (vec![0x80, 0x02, b'c', b'_', b'_'], "pickle"),
        (
            b"hello, this is a text file, not a checkpoint".to_vec(),
            "not a safetensors file",
        ),
    ] {
        std::fs::write(&path, bytes).unwrap();
        let why = checkpoint_error(load_model(&path));
        assert!(why.contains(expect), "{why}");
    }
    // A safetensors file that is not a vaswani checkpoint.
    std::fs::write(
        &path,
        raw(
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
            &[0; 4],
        ),
    )
    .unwrap();
    assert!(checkpoint_error(load_model(&path)).contains("not a vaswani checkpoint"));
    // A file that does not exist: the operating system's error is kept, kind and all.
    let err = load_model::<EncoderDecoder>(temp("absent")).unwrap_err();
    match &err {
        Error::Io { source, .. } => assert_eq!(source.kind(), std::io::ErrorKind::NotFound),
        other => panic!("expected an I/O error, got {other:?}"),
    }
    let source = std::error::Error::source(&err).expect("an I/O error has a source");
    let io = source
        .downcast_ref::<std::io::Error>()
        .expect("the source is the io::Error");
    assert_eq!(io.kind(), std::io::ErrorKind::NotFound);
    assert_eq!(err.clone(), err);
}

/// Run as a child process by `row_19_…`: saves a large model to the path in a loop until it
/// is killed.
#[test]
fn save_forever_when_asked() {
    let Ok(path) = std::env::var("VASWANI_SAVE_FOREVER") else {
        return;
    };
    let big: EncoderDecoder = EncoderDecoderConfig::new(4000, 4000, BlockConfig::new(128, 4, 256), 2, 2)
        .init(&mut StdRng::seed_from_u64(9))
        .unwrap();
    loop {
        save_model(&path, &big).unwrap();
    }
}

#[test]
fn row_19_a_save_killed_midway_leaves_the_previous_checkpoint() {
    let path = temp("killed.safetensors");
    let first = model(10);
    save_model(&path, &first).unwrap();
    let exe = std::env::current_exe().unwrap();
    // The saving test by its name in this binary (its module path without the crate's name),
    // which must pick exactly that test: a name that picked none would pass here unheard.
    let name = format!(
        "{}::save_forever_when_asked",
        module_path!().split_once("::").unwrap().1
    );
    let listed = Command::new(&exe)
        .args(["--exact", &name, "--list"])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert_eq!(
        listed.matches(": test").count(),
        1,
        "{name} picks one test: {listed}"
    );
    for delay_ms in [30, 90, 200, 400] {
        let mut child = Command::new(&exe)
            .args(["--exact", &name, "--nocapture", "--test-threads", "1"])
            .env("VASWANI_SAVE_FOREVER", &path)
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap();
        child.wait().unwrap();
        // Whatever moment it died at, the path holds a whole checkpoint: the first one or a
        // complete later one.
        let info = inspect(&path).unwrap();
        if info.params == first.num_params() as u64 {
            assert_eq!(load_model::<EncoderDecoder>(&path).unwrap(), first);
        } else {
            assert!(load_model::<EncoderDecoder>(&path).is_ok());
        }
    }
}

#[test]
fn mutated_checkpoints_give_errors_or_identical_models_never_panics() {
    let path = temp("fuzz.safetensors");
    let m = model(11);
    save_model(&path, &m).unwrap();
    let good = std::fs::read(&path).unwrap();
    let header_len = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let mut rng = StdRng::seed_from_u64(12);
    let (mut errors, mut identical) = (0, 0);
    for case in 0..2400 {
        let mut bytes = good.clone();
        match case % 6 {
            // Truncation anywhere.
            0 => bytes.truncate(rng.random_range(0..good.len())),
            // Flipped bits in the header.
            1 => {
                for _ in 0..rng.random_range(1..4) {
                    let i = rng.random_range(0..8 + header_len);
                    bytes[i] ^= 1 << rng.random_range(0..8);
                }
            }
            // Flipped bits anywhere.
            2 => {
                let i = rng.random_range(0..bytes.len());
                bytes[i] ^= 1 << rng.random_range(0..8);
            }
            // A header spliced from another position of itself.
            3 => {
                let a = rng.random_range(8..8 + header_len);
                let b = rng.random_range(8..8 + header_len);
                let len = rng.random_range(1..32).min(8 + header_len - a.max(b));
                let chunk = good[b..b + len].to_vec();
                bytes[a..a + len].copy_from_slice(&chunk);
            }
            // A random header length.
            4 => bytes[..8].copy_from_slice(&rng.random::<u64>().to_le_bytes()),
            // Bytes inserted or removed in the middle.
            _ => {
                let i = rng.random_range(0..bytes.len());
                if rng.random() {
                    bytes.insert(i, rng.random());
                } else {
                    bytes.remove(i);
                }
            }
        }
        std::fs::write(&path, &bytes).unwrap();
        match load_model::<EncoderDecoder>(&path) {
            Err(_) => errors += 1,
            Ok(loaded) => {
                // The checksum covers every byte that matters: whatever loads is the original
                // (a flip can land in JSON whitespace, or in padding nothing reads).
                assert_eq!(loaded, m, "case {case} loaded a different model");
                identical += 1;
            }
        }
    }
    assert!(errors > 1500, "{errors} errors, {identical} identical");
}

#[test]
fn every_model_kind_round_trips() {
    use vaswani::models::{
        DecoderOnly, DecoderOnlyConfig, EncoderOnly, EncoderOnlyConfig, Head, InputKind, Positions,
    };
    let path = temp("kinds.safetensors");
    let lm: DecoderOnly = DecoderOnlyConfig::new(13, BlockConfig::new(8, 2, 12).with_norm_first(true), 2)
        .with_positions(Positions::Learned { max_len: 9 })
        .init(&mut StdRng::seed_from_u64(13))
        .unwrap();
    save_model(&path, &lm).unwrap();
    assert_eq!(load_model::<DecoderOnly>(&path).unwrap(), lm);
    assert_eq!(inspect(&path).unwrap().kind, "decoder_only");
    // Another kind's loader refuses it by name, in English.
    let why = checkpoint_error(load_model(&path));
    assert!(
        why.contains("holds a decoder_only model, not an encoder_decoder"),
        "{why}"
    );
    let clf: EncoderOnly = EncoderOnlyConfig::new(
        InputKind::Features { d_in: 5 },
        BlockConfig::new(8, 2, 12),
        1,
        Head::Classify { classes: 4 },
    )
    .init(&mut StdRng::seed_from_u64(14))
    .unwrap();
    save_model(&path, &clf).unwrap();
    assert_eq!(load_model::<EncoderOnly>(&path).unwrap(), clf);
}

#[test]
fn a_learning_rate_that_is_not_positive_is_a_config_error() {
    let m = model(15);
    for lr in [0.0, -1e-3, f64::NAN] {
        let cfg = TrainerConfig {
            optimizer: OptimizerConfig::Adam(AdamConfig::paper()),
            schedule: Schedule::Constant { lr },
            clip_norm: None,
            label_smoothing: 0.1,
            precision: vaswani::Precision::F32,
        };
        assert!(matches!(
            Trainer::new(m.clone(), cfg),
            Err(Error::InvalidConfig { field: "lr", .. })
        ));
    }
}

/// The same model and training state give the same file, byte for byte, whichever process
/// writes it: the state is rebuilt from scratch (new hash maps, new random hash seeds)
/// between the two saves.
#[test]
fn the_same_state_gives_the_same_bytes() {
    let build = || {
        let mut t = trainer(21);
        for k in 0..2 {
            step(&mut t, k);
        }
        t
    };
    let (a, b) = (temp("same_a.safetensors"), temp("same_b.safetensors"));
    save_trainer(&a, &build()).unwrap();
    save_trainer(&b, &build()).unwrap();
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    save_model(&a, &model(22)).unwrap();
    save_model(&b, &model(22)).unwrap();
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    // Many saves of one state: a hash map's order would differ between some of them.
    let first = std::fs::read(&a).unwrap();
    for _ in 0..8 {
        save_model(&b, &model(22)).unwrap();
        assert_eq!(std::fs::read(&b).unwrap(), first);
    }
}

/// SGD with momentum and AdamW are chosen in the settings, trained, saved and resumed bit for
/// bit like Adam; their settings are checked.
#[test]
fn every_optimizer_is_choosable_and_resumes_exactly() {
    use vaswani::train::OptimizerState;
    for optimizer in [
        OptimizerConfig::Sgd { momentum: 0.9 },
        OptimizerConfig::Adam(AdamConfig::adamw(0.01)),
    ] {
        let with = |seed| {
            let t = trainer(seed);
            let cfg = t.cfg.clone().with_optimizer(optimizer.clone());
            Trainer::new(t.model, cfg).unwrap()
        };
        let mut straight = with(23);
        match (&straight.optimizer, &optimizer) {
            (OptimizerState::Sgd(s), OptimizerConfig::Sgd { momentum }) => assert_eq!(s.momentum, *momentum),
            (OptimizerState::Adam(a), OptimizerConfig::Adam(c)) => assert_eq!(&a.cfg, c),
            (state, cfg) => panic!("{cfg:?} built {state:?}"),
        }
        let losses: Vec<f64> = (0..6).map(|k| step(&mut straight, k)).collect();
        let mut first = with(23);
        for k in 0..3 {
            step(&mut first, k);
        }
        let path = temp("optimizers.safetensors");
        save_trainer(&path, &first).unwrap();
        let mut resumed: Trainer<EncoderDecoder> = load_trainer(&path).unwrap();
        assert_eq!(resumed.cfg.optimizer, optimizer);
        assert_eq!(resumed.steps(), 3);
        let after: Vec<f64> = (3..6).map(|k| step(&mut resumed, k)).collect();
        assert_eq!(after, losses[3..], "{optimizer:?}");
        assert_eq!(resumed.model, straight.model, "{optimizer:?}");
    }
    // Validated where the trainer is built, naming the field.
    for (bad, field) in [
        (OptimizerConfig::Sgd { momentum: 1.0 }, "momentum"),
        (OptimizerConfig::Sgd { momentum: f64::NAN }, "momentum"),
        (OptimizerConfig::Adam(AdamConfig::adamw(-0.1)), "weight_decay"),
        (
            OptimizerConfig::Adam(AdamConfig {
                beta1: 1.5,
                ..AdamConfig::paper()
            }),
            "beta1",
        ),
    ] {
        let cfg = TrainerConfig::default().with_optimizer(bad);
        match Trainer::new(model(24), cfg) {
            Err(Error::InvalidConfig { field: f, .. }) => assert_eq!(f, field),
            other => panic!("expected a config error for {field}, got {:?}", other.map(|_| ())),
        }
    }
}
