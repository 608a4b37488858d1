//! One source for parameter counts and FLOPs: each layer and block config counts its own, the
//! models sum them, and every count equals the parameters of what `init` builds.

use vaswani::Params;
use vaswani::blocks::{BlockConfig, DecoderConfig, EncoderConfig};
use vaswani::layers::{
    EmbeddingConfig, FeedForwardConfig, LayerNormConfig, LearnedPositionalConfig, LinearConfig,
    MultiHeadConfig,
};
use vaswani::rand::{SeedableRng, rngs::StdRng};

#[test]
fn every_config_counts_the_parameters_init_builds() {
    let rng = &mut StdRng::seed_from_u64(0);
    for bias in [true, false] {
        let c = LinearConfig::new(7, 5).with_bias(bias);
        assert_eq!(c.params(), c.init(rng).unwrap().num_params() as f64);
        let c = MultiHeadConfig::new(12, 3).with_bias(bias);
        assert_eq!(c.params(), c.init(rng).unwrap().num_params() as f64);
        let c = FeedForwardConfig::new(12, 20).with_bias(bias);
        assert_eq!(c.params(), c.init(rng).unwrap().num_params() as f64);
        for norm_first in [false, true] {
            let block = BlockConfig::new(12, 3, 20)
                .with_bias(bias)
                .with_norm_first(norm_first);
            let e = EncoderConfig::new(block.clone(), 2);
            assert_eq!(e.params(), e.init(rng).unwrap().num_params() as f64, "{e:?}");
            let d = DecoderConfig::new(block, 3);
            assert_eq!(d.params(), d.init(rng).unwrap().num_params() as f64, "{d:?}");
        }
    }
    let c = EmbeddingConfig::new(9, 4);
    assert_eq!(c.params(), c.init(rng).unwrap().num_params() as f64);
    let c = LayerNormConfig::new(6);
    assert_eq!(c.params(), c.init(rng).unwrap().num_params() as f64);
    let c = LearnedPositionalConfig::new(10, 4);
    assert_eq!(c.params(), c.init(rng).unwrap().num_params() as f64);
}

#[test]
fn flops_follow_the_model_of_the_performance_figures() {
    // Dense m → n: 2mn per row; attention 4·Tq·Tk·d; nothing else.
    let (d, f, t, s) = (16.0, 64.0, 10.0, 7.0);
    assert_eq!(LinearConfig::new(16, 64).flops(10), 2.0 * d * f * t);
    assert_eq!(FeedForwardConfig::new(16, 64).flops(10), 4.0 * d * f * t);
    let mha = MultiHeadConfig::new(16, 4);
    assert_eq!(
        mha.flops(10, 10),
        2.0 * d * 3.0 * d * t + 4.0 * t * t * d + 2.0 * d * d * t
    );
    assert_eq!(
        mha.flops(10, 7),
        2.0 * d * d * t + 2.0 * d * 2.0 * d * s + 4.0 * t * s * d + 2.0 * d * d * t
    );
    let block = BlockConfig::new(16, 4, 64);
    assert_eq!(block.encoder_layer_flops(10), mha.flops(10, 10) + 4.0 * d * f * t);
    assert_eq!(
        DecoderConfig::new(block, 2).flops(10, 7),
        2.0 * (mha.flops(10, 10) + mha.flops(10, 7) + 4.0 * d * f * t)
    );
}
