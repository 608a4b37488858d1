//! Every layer and block takes an empty batch (B = 0, or N = 0 rows) and gives an empty
//! result of the right shape, forward, inference and backward, with every mask kind; the
//! gradients of the parameters stay zero.

use ndarray::{Array2, Array3};
use rand::{SeedableRng, rngs::StdRng};
use vaswani::Params;
use vaswani::blocks::{BlockConfig, DecoderConfig, EncoderConfig};
use vaswani::layers::{
    AttentionConfig, DropoutConfig, EmbeddingConfig, FeedForwardConfig, LayerNormConfig,
    LearnedPositionalConfig, LinearConfig, Mask, MultiHeadConfig, ResidualConfig, SinusoidalConfig,
};

const D: usize = 8;

fn masks() -> Vec<(&'static str, Mask)> {
    let flags = Array2::<bool>::from_elem((0, 3), false);
    vec![
        ("none", Mask::none()),
        ("causal", Mask::causal()),
        ("key lengths", Mask::key_lengths(&[])),
        ("key padding", Mask::key_padding(flags.view())),
        ("causal and lengths", Mask::causal().and(Mask::key_lengths(&[]))),
    ]
}

fn zero<P: Params<f32>>(g: &P) -> bool {
    g.sq_norm() == 0.0
}

#[test]
fn layers_take_zero_rows() {
    let rng = &mut StdRng::seed_from_u64(1);
    let x = Array2::<f32>::zeros((0, D));

    let linear = LinearConfig::new(D, 5).init(rng).unwrap();
    let (y, cache) = linear.forward(x.view());
    assert_eq!(y.dim(), (0, 5));
    assert_eq!(linear.infer(x.view()).dim(), (0, 5));
    let mut g = linear.zeros_like();
    assert_eq!(linear.backward(&cache, y.view(), &mut g.p).dim(), (0, D));
    assert!(zero(&g));

    let emb = EmbeddingConfig::new(9, D).init(rng).unwrap();
    let ids = Array2::<usize>::zeros((0, 3));
    let (y, cache) = emb.forward(ids.view()).unwrap();
    assert_eq!(y.dim(), (0, D));
    let mut g = emb.zeros_like();
    emb.backward(&cache, y.view(), &mut g.p);
    assert!(zero(&g));

    let norm = LayerNormConfig::new(D).init(rng).unwrap();
    let (y, cache) = norm.forward(x.view());
    assert_eq!(y.dim(), (0, D));
    let mut g = norm.zeros_like();
    assert_eq!(norm.backward(&cache, y.view(), &mut g.p).dim(), (0, D));
    assert!(zero(&g));

    let ffn = FeedForwardConfig::new(D, 16).init(rng).unwrap();
    let (y, cache) = ffn.forward(x.view(), rng);
    assert_eq!(y.dim(), (0, D));
    assert_eq!(ffn.infer(x.view()).dim(), (0, D));
    let mut g = ffn.zeros_like();
    assert_eq!(ffn.backward(&cache, y.view(), &mut g.p).dim(), (0, D));
    assert!(zero(&g));

    let dropout = DropoutConfig::new(0.1).init().unwrap();
    let (y, cache) = dropout.forward(x.view(), rng);
    assert_eq!(dropout.backward(&cache, y.view()).dim(), (0, D));

    let sin = SinusoidalConfig::new(D).init().unwrap();
    assert_eq!(sin.forward(x.view(), 3, 0).dim(), (0, D));
    let learned = LearnedPositionalConfig::new(4, D).init(rng).unwrap();
    let y = learned.forward(x.view(), 3, 0).unwrap();
    let mut g = learned.zeros_like();
    assert_eq!(learned.backward(y.view(), 3, 0, &mut g.p).dim(), (0, D));
    assert!(zero(&g));

    for norm_first in [false, true] {
        let residual = ResidualConfig::new(D)
            .with_norm_first(norm_first)
            .init(rng)
            .unwrap();
        let (y, cache) = residual.forward(x.view(), rng, |u, _| (u.to_owned(), ()));
        assert_eq!(y.dim(), (0, D));
        assert_eq!(residual.infer(x.view(), |u| u.to_owned()).dim(), (0, D));
        let mut g = residual.zeros_like();
        let gx = residual.backward(&cache, y.view(), &mut g.norm.p, |_, gu| gu.to_owned());
        assert_eq!(gx.dim(), (0, D));
        assert!(zero(&g));
    }
}

#[test]
fn attention_takes_an_empty_batch() {
    let rng = &mut StdRng::seed_from_u64(2);
    let x = Array3::<f32>::zeros((0, 3, D));
    let attention = AttentionConfig::new().init().unwrap();
    let mha = MultiHeadConfig::new(D, 2).init(rng).unwrap();
    for (what, mask) in masks() {
        let (y, cache) = attention.forward(x.view(), x.view(), x.view(), &mask, rng);
        assert_eq!(y.dim(), (0, 3, D), "{what}");
        assert_eq!(
            attention.infer(x.view(), x.view(), x.view(), &mask).dim(),
            (0, 3, D)
        );
        let (gq, gk, gv) = attention.backward(&cache, y.view());
        assert_eq!((gq.dim(), gk.dim(), gv.dim()), ((0, 3, D), (0, 3, D), (0, 3, D)));

        for memory in [None, Some(x.view())] {
            let (y, cache) = mha.forward(x.view(), memory, &mask, rng);
            assert_eq!(y.dim(), (0, 3, D), "{what}");
            assert_eq!(mha.infer(x.view(), memory, &mask).dim(), (0, 3, D), "{what}");
            let mut g = mha.zeros_like();
            let (gx, gm) = mha.backward(&cache, y.view(), &mut g.p);
            assert_eq!(gx.dim(), (0, 3, D), "{what}");
            assert_eq!(gm.map(|m| m.dim()), memory.map(|m| m.dim()), "{what}");
            assert!(zero(&g), "{what}");
        }
    }
}

#[test]
fn blocks_take_an_empty_batch() {
    let rng = &mut StdRng::seed_from_u64(3);
    let x = Array3::<f32>::zeros((0, 3, D));
    let memory = Array3::<f32>::zeros((0, 4, D));
    for norm_first in [false, true] {
        let block = BlockConfig::new(D, 2, 16).with_norm_first(norm_first);
        let encoder = EncoderConfig::new(block.clone(), 2).init(rng).unwrap();
        let decoder = DecoderConfig::new(block, 2).init(rng).unwrap();
        for (what, mask) in masks() {
            let (y, cache) = encoder.forward(x.view(), &mask, rng);
            assert_eq!(y.dim(), (0, 3, D), "{what}");
            assert_eq!(encoder.infer(x.view(), &mask).dim(), (0, 3, D), "{what}");
            let mut g = encoder.zeros_like();
            assert_eq!(encoder.backward(&cache, y.view(), &mut g).dim(), (0, 3, D));
            assert!(zero(&g), "{what}");

            let memory_mask = Mask::key_lengths(&[]);
            let (y, cache) = decoder.forward(x.view(), memory.view(), &mask, &memory_mask, rng);
            assert_eq!(y.dim(), (0, 3, D), "{what}");
            let y_infer = decoder.infer(x.view(), memory.view(), &mask, &memory_mask);
            assert_eq!(y_infer.dim(), (0, 3, D), "{what}");
            let mut g = decoder.zeros_like();
            let (gx, gm) = decoder.backward(&cache, y.view(), &mut g);
            assert_eq!((gx.dim(), gm.dim()), ((0, 3, D), (0, 4, D)), "{what}");
            assert!(zero(&g), "{what}");
        }

        // Cached inference: the prompt, then one position.
        let mut caches = encoder.begin(0, 4);
        assert_eq!(encoder.infer_step(x.view(), &mut caches).dim(), (0, 3, D));
        let one = Array3::<f32>::zeros((0, 1, D));
        assert_eq!(encoder.infer_step(one.view(), &mut caches).dim(), (0, 1, D));
        let mut state = decoder.begin(memory.view(), 4);
        let step = decoder.infer_step(one.view(), &mut state, &Mask::none());
        assert_eq!(step.dim(), (0, 1, D));
    }
}

#[test]
fn pytorch_parity_takes_an_empty_batch() {
    use vaswani::io::{OwnedTensor, TensorFile, parity, write_tensor_file};
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let fixture = TensorFile::read(dir.join("post_gelu_d12h2_2x2_pad_causal.safetensors")).unwrap();
    // The same weights and config, every input with a batch of 0.
    let mut tensors = Vec::new();
    for t in fixture.tensors() {
        let mut shape = t.shape.clone();
        let input = ["src", "tgt", "grad_output"].contains(&t.name.as_str());
        let mask = t.name.ends_with("key_padding_mask");
        if input || mask {
            shape[0] = 0;
        }
        let tensor = if mask {
            OwnedTensor::bytes(ndarray::ArrayD::<u8>::zeros(shape).view())
        } else if input {
            OwnedTensor::float(ndarray::ArrayD::<f32>::zeros(shape).view())
        } else {
            OwnedTensor::float(fixture.float::<f32>(&t.name).unwrap().view())
        };
        tensors.push((t.name, tensor));
    }
    let out_dir = std::env::temp_dir().join(format!("vaswani-empty-{}", std::process::id()));
    std::fs::create_dir_all(&out_dir).unwrap();
    let (input, output) = (out_dir.join("in.safetensors"), out_dir.join("out.safetensors"));
    let metadata = fixture.metadata().clone().into_iter().collect();
    write_tensor_file(&input, &tensors, metadata).unwrap();
    parity(&input, &output).unwrap();
    let out = TensorFile::read(&output).unwrap();
    assert_eq!(out.float::<f32>("output").unwrap().shape()[0], 0);
    assert_eq!(out.float::<f32>("grad.src").unwrap().shape()[0], 0);
    for t in out.tensors().into_iter().filter(|t| t.name.starts_with("grad.")) {
        let g = out.float::<f32>(&t.name).unwrap();
        assert!(g.iter().all(|&v| v == 0.0), "{}", t.name);
    }
    std::fs::remove_dir_all(&out_dir).unwrap();
}
