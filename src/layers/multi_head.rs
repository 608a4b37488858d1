//! Multi-head attention (§3.2.2):
//! `MultiHead(Q, K, V) = Concat(head₁, …, head_h)·W_O`, `headᵢ = Attention(Q·W_Qᵢ, K·W_Kᵢ, V·W_Vᵢ)`.
//!
//! h heads of width `d_k = d_v = d_model / h` attend in parallel, each in its own learned
//! subspace; their outputs are **concatenated** (not averaged) and projected back to
//! d_model by W_O. With `d_k = d_model/h` the cost is that of one head of full width (§3.2.2).
//!
//! The projections are single GEMMs over all `[B·T, d_model]` rows. Head i of `Q·W_Qᵀ` is
//! columns `i·d_k .. (i+1)·d_k` of the result; the attention core reads it through a strided
//! `[B, H, T, d_k]` view and writes its output straight into the concatenated layout, so
//! splitting and concatenating heads cost no copies.
//!
//! - Self-attention: queries, keys and values all come from x (`memory = None`).
//! - Cross-attention (encoder-decoder attention, §3.2.3): queries from the decoder stream x,
//!   keys and values from the encoder output `memory`, which may be of another length.
//! - Decoding one position at a time: [`MultiHead::empty_cache`] and [`MultiHead::project_kv`]
//!   begin a [key/value cache](crate::layers::kv_cache), which [`MultiHead::infer_cached`]
//!   grows by each step's positions and attends over.
//!
//! Each W is stored `[out, in]` as in PyTorch (`y = x·Wᵀ + b`), with the paper's names:
//! `w_q`, `w_k`, `w_v` (PyTorch packs them as the rows of `in_proj_weight`, in that order)
//! and `w_o` (`out_proj.weight`).
//!
//! # Backward
//! Through `W_O` as a linear layer, through the attention core (see
//! [`crate::layers::attention`]), then through `W_Q`, `W_K`, `W_V` as linear layers. In
//! self-attention x feeds all three projections and its gradient is their sum.
//!
//! PyTorch equivalent: `nn.MultiheadAttention(d_model, n_heads, dropout=p_drop,
//! batch_first=True)`, called as `mha(x, x, x)` or `mha(x, memory, memory)`.
//!
//! # Example
//! ```
//! use vaswani::ndarray::Array3;
//! use vaswani::rand::{SeedableRng, rngs::StdRng};
//! use vaswani::layers::{Mask, MultiHeadConfig};
//!
//! let mut rng = StdRng::seed_from_u64(0);
//! let mha = MultiHeadConfig::new(16, 4).init(&mut rng)?;
//! let x = Array3::<f32>::ones((2, 5, 16)); // [B, T, d_model]
//! let memory = Array3::<f32>::ones((2, 7, 16)); // [B, S, d_model]
//! let (y, weights) = mha.infer_with_weights(x.view(), Some(memory.view()), &Mask::none());
//! assert_eq!(y.dim(), (2, 5, 16));
//! assert_eq!(weights.dim(), (2, 4, 5, 7)); // [B, H, T, S]: one map per head
//! # Ok::<(), vaswani::Error>(())
//! ```

use ndarray::{
    Array1, Array2, Array3, Array4, ArrayView2, ArrayView3, ArrayView4, ArrayViewMut2, ArrayViewMut4, Axis,
    CowArray, Ix2, s,
};
use rand::Rng;

use crate::error::{Result, check};
use crate::kernels::parallel::join_gradients;
use crate::kernels::precision::{Precision, precision};
use crate::kernels::workspace::Recycle;
use crate::kernels::{
    Float, PackedB, add_column_sums, bias_sums_in_packing, filled, gemm, gemm_packed, gemm_weight_grad,
};
use crate::layers::attention::{
    AttentionCoreCache, Pass, attention_backward, attention_infer, resolve_or_panic,
};
use crate::layers::kv_cache::{KvRows, KvView};
use crate::layers::linear::{affine, affine_backward, check_backward_weights};
use crate::layers::mask::{Mask, ResolvedMask};
use crate::params::xavier_uniform;

// The cache of `MultiHead::empty_cache` and `project_kv`, defined in `kv_cache`; named here too.
pub use crate::layers::kv_cache::KvCache;

/// Configuration of [`MultiHead`] attention.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct MultiHeadConfig {
    /// Model width; must be divisible by `n_heads`.
    pub d_model: usize,
    /// Number of heads h.
    pub n_heads: usize,
    /// Dropout on the attention weights (training only). PyTorch's `nn.Transformer` passes
    /// its `dropout` (0.1) here.
    pub p_drop: f32,
    /// Whether the four projections have biases.
    pub bias: bool,
}

/// Parameters of [`MultiHead`] attention (and their gradients).
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(bound = ""))]
pub struct MultiHeadParams<F: Float = f32> {
    /// W_Q, `[d_model, d_model]`: all heads' query projections, head i in rows `i·d_k..`.
    pub w_q: Array2<F>,
    /// Query bias `[d_model]`.
    pub b_q: Option<Array1<F>>,
    /// W_K, `[d_model, d_model]`.
    pub w_k: Array2<F>,
    /// Key bias `[d_model]`.
    pub b_k: Option<Array1<F>>,
    /// W_V, `[d_model, d_model]`.
    pub w_v: Array2<F>,
    /// Value bias `[d_model]`.
    pub b_v: Option<Array1<F>>,
    /// W_O, `[d_model, d_model]`: projects the concatenated heads.
    pub w_o: Array2<F>,
    /// Output bias `[d_model]`.
    pub b_o: Option<Array1<F>>,
}
crate::impl_params!(MultiHeadParams {
    w_q,
    b_q,
    w_k,
    b_k,
    w_v,
    b_v,
    w_o,
    b_o
});

/// Multi-head attention. See the [module docs](self).
#[derive(Clone, Debug, PartialEq)]
pub struct MultiHead<F: Float = f32> {
    /// Its configuration.
    pub cfg: MultiHeadConfig,
    /// Its parameters.
    pub p: MultiHeadParams<F>,
}
crate::delegate_params!(MultiHead => p);

/// What [`MultiHead::backward`] needs from the forward pass.
#[derive(Clone, Debug)]
pub struct MultiHeadCache<F: Float = f32> {
    /// `(B, Tq, Tk)`.
    dims: (usize, usize, usize),
    /// Query input rows `[B·Tq, d]`.
    x: Array2<F>,
    /// Key/value input rows `[B·Tk, d]` for cross-attention; `None` in self-attention.
    memory: Option<Array2<F>>,
    q: Array2<F>,
    k: Array2<F>,
    v: Array2<F>,
    /// The concatenated head outputs `[B·Tq, d]`, input of W_O.
    ctx: Array2<F>,
    core: AttentionCoreCache<F>,
}
crate::kernels::workspace::impl_recycle!(MultiHeadCache<F: Float> { x, memory, q, k, v, ctx, core });

/// The projections of a [`MultiHead`] packed once for the many products of a decode
/// ([`crate::kernels::PackedB`]): W_Q, W_K and W_V side by side (self-attention) or W_Q alone
/// (cross-attention, whose keys and values are projected once), and W_O. Made by
/// [`MultiHead::pack`], valid while the layer is borrowed.
#[derive(Clone, Debug)]
pub(crate) struct PackedMultiHead<F: Float> {
    /// `[W_Q W_K W_V]ᵀ` (self-attention) or `W_Qᵀ` (cross-attention).
    input: PackedB,
    /// The biases of `input`, side by side.
    input_bias: Option<Array1<F>>,
    /// Cross-attention over a whole memory: `[W_K W_V]ᵀ` and their biases.
    memory: Option<(PackedB, Option<Array1<F>>)>,
    /// `W_Oᵀ`.
    output: PackedB,
}

impl<F: Float> PackedMultiHead<F> {
    /// The bytes of the weights a decoding step multiplies by: `input` and `output` (the
    /// memory's projections run once, before the steps).
    pub(crate) fn step_bytes(&self) -> usize {
        self.input.bytes() + self.output.bytes()
    }
}

impl MultiHeadConfig {
    /// Its number of parameters, W_Q, W_K, W_V, W_O and their biases, in `f64` (exact below 2⁵³; an absurd config saturates instead of wrapping around).
    pub fn params(&self) -> f64 {
        let d = self.d_model as f64;
        4.0 * d * d + if self.bias { 4.0 * d } else { 0.0 }
    }

    /// FLOPs of a forward pass of one sequence of `tq` queries over `tk` keys (self-attention:
    /// `tq = tk`): the projections, `2 · d_model²` per query for W_Q and W_O and per key for
    /// W_K and W_V, and the attention products, `4 · tq · tk · d_model` (Eq. 1: QKᵀ and the
    /// weighted sum of V). The softmax is not counted.
    pub fn flops(&self, tq: usize, tk: usize) -> f64 {
        let (d, q, k) = (self.d_model as f64, tq as f64, tk as f64);
        2.0 * d * d * (2.0 * q + 2.0 * k) + 4.0 * q * k * d
    }

    /// `n_heads` heads over `d_model`, with biases and PyTorch's `nn.Transformer` attention
    /// dropout of 0.1.
    pub fn new(d_model: usize, n_heads: usize) -> Self {
        MultiHeadConfig {
            d_model,
            n_heads,
            p_drop: 0.1,
            bias: true,
        }
    }

    /// The same config with attention dropout `p`.
    pub fn with_p_drop(mut self, p: f32) -> Self {
        self.p_drop = p;
        self
    }

    /// The same config with the projection biases on or off.
    pub fn with_bias(mut self, bias: bool) -> Self {
        self.bias = bias;
        self
    }

    /// The width of one head, `d_k = d_model / n_heads`.
    pub fn d_k(&self) -> usize {
        self.d_model / self.n_heads.max(1)
    }

    /// Builds the layer in `f32`, the type for training and inference;
    /// [`MultiHeadConfig::init_as`] builds it in another float type (`f64` for gradient checks).
    ///
    /// # Errors
    /// As [`MultiHeadConfig::init_as`].
    pub fn init(&self, rng: &mut impl Rng) -> Result<MultiHead> {
        self.init_as(rng)
    }

    /// Builds the layer. W_Q, W_K and W_V are Xavier-uniform as the `[3·d_model, d_model]`
    /// matrix PyTorch packs them in (fan-out 3·d_model), W_O Xavier-uniform, biases zero:
    /// PyTorch's initialisation.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) if d_model or n_heads is 0,
    /// d_model is not divisible by n_heads, or the dropout rate is not in [0, 1).
    pub fn init_as<F: Float>(&self, rng: &mut impl Rng) -> Result<MultiHead<F>> {
        check::heads(self.d_model, self.n_heads)?;
        check::tensor("d_model", &[3, self.d_model, self.d_model], size_of::<F>())?;
        check::dropout("p_drop", self.p_drop)?;
        let d = self.d_model;
        let mut in_proj = || xavier_uniform((d, d), d, 3 * d, rng);
        let (w_q, w_k, w_v) = (in_proj(), in_proj(), in_proj());
        let w_o = xavier_uniform((d, d), d, d, rng);
        let bias = || self.bias.then(|| Array1::zeros(d));
        Ok(MultiHead {
            cfg: self.clone(),
            p: MultiHeadParams {
                w_q,
                b_q: bias(),
                w_k,
                b_k: bias(),
                w_v,
                b_v: bias(),
                w_o,
                b_o: bias(),
            },
        })
    }
}

impl<F: Float> MultiHead<F> {
    /// Forward pass in training mode (attention dropout on), keeping what backward needs.
    ///
    /// `memory = None` is self-attention; `Some(m)` is cross-attention with keys and values
    /// from m.
    ///
    /// # Shapes
    /// `x` `[B, Tq, d_model]`, `memory` `[B, Tk, d_model]` → `[B, Tq, d_model]`; the mask is
    /// for `(B, Tq, Tk)` (Tk = Tq in self-attention).
    ///
    /// # Panics
    /// If a width is not d_model, the batch sizes differ, or the mask does not fit.
    pub fn forward(
        &self,
        x: ArrayView3<F>,
        memory: Option<ArrayView3<F>>,
        mask: &Mask,
        rng: &mut impl Rng,
    ) -> (Array3<F>, MultiHeadCache<F>) {
        let (y, cache) = self.run(x, memory, mask, Pass::Train(rng));
        (y, cache.expect("kept"))
    }

    /// Forward pass without dropout and without cache.
    ///
    /// # Panics
    /// As [`MultiHead::forward`].
    pub fn infer(&self, x: ArrayView3<F>, memory: Option<ArrayView3<F>>, mask: &Mask) -> Array3<F> {
        self.run(x, memory, mask, Pass::Infer).0
    }

    /// Forward pass without dropout that also hands back every head's attention weights,
    /// `[B, H, Tq, Tk]` (PyTorch: `need_weights=True, average_attn_weights=False`).
    ///
    /// # Panics
    /// As [`MultiHead::forward`].
    pub fn infer_with_weights(
        &self,
        x: ArrayView3<F>,
        memory: Option<ArrayView3<F>>,
        mask: &Mask,
    ) -> (Array3<F>, Array4<F>) {
        let (y, cache) = self.run(x, memory, mask, Pass::Weights);
        (y, cache.expect("kept").core.into_weights())
    }

    /// `(B, Tq, Tk)` of queries `x` `[B, Tq, d_model]` over `memory` `[B, Tk, d_model]` (or
    /// over `x` itself).
    ///
    /// # Panics
    /// If the shapes do not fit together.
    fn check_pair(&self, x: ArrayView3<F>, memory: Option<ArrayView3<F>>) -> (usize, usize, usize) {
        let d = self.cfg.d_model;
        let (b, tq, dx) = x.dim();
        let src = memory.unwrap_or(x);
        let (bm, tk, dm) = src.dim();
        assert!(
            dx == d && dm == d && bm == b,
            "MultiHead: x {:?}, memory {:?}: expected [B, Tq, d_model = {d}] and [B, Tk, d_model = {d}]",
            x.shape(),
            src.shape()
        );
        (b, tq, tk)
    }

    /// The output, and the cache for the backward pass unless `pass` is [`Pass::Infer`].
    fn run(
        &self,
        x: ArrayView3<F>,
        memory: Option<ArrayView3<F>>,
        mask: &Mask,
        pass: Pass<'_>,
    ) -> (Array3<F>, Option<MultiHeadCache<F>>) {
        let d = self.cfg.d_model;
        let (b, tq, tk) = self.check_pair(x, memory);
        let mask = resolve_or_panic(mask, b, tq, tk);
        let x_rows = rows(x);
        let m_rows = memory.map(rows);
        let src_rows = m_rows.as_ref().unwrap_or(&x_rows);
        let p = &self.p;
        let q = affine(x_rows.view(), p.w_q.view(), p.b_q.as_ref().map(|b| b.view()));
        let k = affine(src_rows.view(), p.w_k.view(), p.b_k.as_ref().map(|b| b.view()));
        let v = affine(src_rows.view(), p.w_v.view(), p.b_v.as_ref().map(|b| b.view()));
        let (ctx, core) = self.all_heads(
            self.heads(q.view(), b, tq),
            self.heads(k.view(), b, tk),
            self.heads(v.view(), b, tk),
            mask,
            pass,
        );
        let y = affine(ctx.view(), p.w_o.view(), p.b_o.as_ref().map(|b| b.view()));
        let y = y.into_shape_with_order((b, tq, d)).expect("standard layout");
        let cache = core.map(|core| MultiHeadCache {
            dims: (b, tq, tk),
            x: x_rows,
            memory: m_rows,
            q,
            k,
            v,
            ctx,
            core,
        });
        (y, cache)
    }

    /// Backward pass: adds the parameter gradients into `g` and returns `(∂L/∂x, ∂L/∂memory)`
    /// (`None` in self-attention, where x's gradient already includes the key and value paths).
    ///
    /// # Panics
    /// If `grad_y` is not `[B, Tq, d_model]`.
    pub fn backward(
        &self,
        cache: &MultiHeadCache<F>,
        grad_y: ArrayView3<F>,
        g: &mut MultiHeadParams<F>,
    ) -> (Array3<F>, Option<Array3<F>>) {
        let (b, tq, tk) = cache.dims;
        let d = self.cfg.d_model;
        assert_eq!(
            grad_y.dim(),
            (b, tq, d),
            "MultiHead::backward: grad_y is {:?}, expected [B, Tq, d_model] = {:?}",
            grad_y.shape(),
            [b, tq, d]
        );
        let p = &self.p;
        let grad_y = grad_y.as_standard_layout();
        let grad_y = grad_y
            .view()
            .into_shape_with_order((b * tq, d))
            .expect("standard layout");
        let grad_ctx = affine_backward(
            cache.ctx.view(),
            p.w_o.view(),
            grad_y,
            g.w_o.view_mut(),
            g.b_o.as_mut().map(|b| b.view_mut()),
        );
        // The three gradients come from the workspace unzeroed: `attention_backward` writes
        // every element of them before it reads any (each pair of sequence and head writes
        // its own rows: products with β = 0, and zeros for keys past the key limit).
        let core =
            |gq: ndarray::ArrayViewMut2<F>, gk: ndarray::ArrayViewMut2<F>, gv: ndarray::ArrayViewMut2<F>| {
                attention_backward(
                    self.heads(cache.q.view(), b, tq),
                    self.heads(cache.k.view(), b, tk),
                    self.heads(cache.v.view(), b, tk),
                    &cache.core,
                    self.heads(grad_ctx.view(), b, tq),
                    self.heads_mut(gq, b, tq),
                    self.heads_mut(gk, b, tk),
                    self.heads_mut(gv, b, tk),
                )
            };
        let (mut grad_k, mut grad_v) = (None, None);
        // SAFETY: `core` writes every element of the three views before reading any (above).
        let grad_q = unsafe {
            filled((b * tq, d), |gq| {
                grad_k = Some(filled((b * tk, d), |gk| {
                    grad_v = Some(filled((b * tk, d), |gv| core(gq, gk, gv)));
                }));
            })
        };
        let (grad_k, grad_v) = (grad_k.expect("filled"), grad_v.expect("filled"));
        grad_ctx.give_back();
        let src = cache.memory.as_ref().unwrap_or(&cache.x);
        // Weight gradients, then the input gradients summed by the GEMMs themselves (β = 1):
        // ∂L/∂x = G_Q·W_Q (+ G_K·W_K + G_V·W_V in self-attention).
        fn bias<F: Float>(b: &mut Option<Array1<F>>) -> Option<ndarray::ArrayViewMut1<'_, F>> {
            b.as_mut().map(|b| b.view_mut())
        }
        let (gw, gb) = (
            [g.w_q.view_mut(), g.w_k.view_mut(), g.w_v.view_mut()],
            [bias(&mut g.b_q), bias(&mut g.b_k), bias(&mut g.b_v)],
        );
        let (grads, inputs) = ([&grad_q, &grad_k, &grad_v], [&cache.x, src, src]);
        for i in 0..3 {
            check_backward_weights(
                inputs[i].view(),
                grads[i].view(),
                gw[i].view(),
                gb[i].as_ref().map(|b| b.len()),
            );
        }
        // The biases' column sums with the weight gradients where their bf16 packing takes
        // them, else with the input gradients, whose operands pack in less time.
        let in_packing = bias_sums_in_packing::<F>();
        let (gb_w, gb_x) = if in_packing {
            (gb, [None, None, None])
        } else {
            ([None, None, None], gb)
        };
        let weights = || {
            for ((i, gw), gb) in gw.into_iter().enumerate().zip(gb_w) {
                gemm_weight_grad(grads[i].view(), inputs[i].view(), gw, gb);
            }
        };
        let biases = || {
            for (i, gb) in gb_x.into_iter().enumerate() {
                if let Some(gb) = gb {
                    add_column_sums(grads[i].view(), gb);
                }
            }
        };
        // The input gradients beside the weight gradients (same FLOPs), into arrays taken here.
        let mut grad_src = None;
        // SAFETY: a GEMM with β = 0 writes every element (then the others add to it).
        let grad_x = unsafe {
            filled((b * tq, d), |gx| match cache.memory {
                Some(_) => {
                    grad_src = Some(filled((b * tk, d), |gs| {
                        join_gradients(weights, || {
                            gemm(F::ONE, grad_q.view(), p.w_q.view(), F::ZERO, gx);
                            let mut gs = gs;
                            gemm(F::ONE, grad_k.view(), p.w_k.view(), F::ZERO, gs.view_mut());
                            gemm(F::ONE, grad_v.view(), p.w_v.view(), F::ONE, gs);
                            biases();
                        })
                    }));
                }
                None => join_gradients(weights, || {
                    let mut gx = gx;
                    gemm(F::ONE, grad_q.view(), p.w_q.view(), F::ZERO, gx.view_mut());
                    gemm(F::ONE, grad_k.view(), p.w_k.view(), F::ONE, gx.view_mut());
                    gemm(F::ONE, grad_v.view(), p.w_v.view(), F::ONE, gx);
                    biases();
                }),
            })
        };
        (grad_q, grad_k, grad_v).give_back();
        let to3 = |a: Array2<F>, t: usize| a.into_shape_with_order((b, t, d)).expect("standard layout");
        (to3(grad_x, tq), grad_src.map(|gs| to3(gs, tk)))
    }

    /// An empty self-attention cache for `b` sequences, with room for `capacity` positions
    /// before it grows; in bf16 for an `f32` layer in bf16 precision (see [`KvCache`]).
    pub fn empty_cache(&self, b: usize, capacity: usize) -> KvCache<F> {
        let (h, dk) = (self.cfg.n_heads, self.cfg.d_k());
        let bf16 =
            precision() == Precision::Bf16 && std::any::TypeId::of::<F>() == std::any::TypeId::of::<f32>();
        KvCache::empty(bf16, b, h, dk, capacity)
    }

    /// Cross-attention keys and values of `memory` `[B, S, d_model]`, projected once for a
    /// whole decode.
    ///
    /// # Panics
    /// If `memory` is not `[B, S, d_model]`.
    pub fn project_kv(&self, memory: ArrayView3<F>) -> KvCache<F> {
        let (b, s_len, d) = memory.dim();
        assert_eq!(
            d,
            self.cfg.d_model,
            "MultiHead::project_kv: memory is {:?}, expected [B, S, d_model = {}]",
            memory.shape(),
            self.cfg.d_model
        );
        let m = rows_in_place(memory);
        let p = &self.p;
        let k = affine(m.view(), p.w_k.view(), p.b_k.as_ref().map(|b| b.view()));
        let v = affine(m.view(), p.w_v.view(), p.b_v.as_ref().map(|b| b.view()));
        let mut cache = self.empty_cache(b, s_len);
        cache.push(self.heads(k.view(), b, s_len), self.heads(v.view(), b, s_len));
        cache
    }

    /// Self-attention for new positions `x` `[B, Tq, d_model]` that follow the `cache.len()`
    /// positions already cached: their keys and values are appended, and each new position
    /// attends causally to every position up to itself. Equal to [`MultiHead::infer`] over the
    /// whole sequence with a causal mask, restricted to the new rows.
    ///
    /// # Panics
    /// If `x` is not `[B, Tq, d_model]` for the cache's B.
    pub fn infer_cached(&self, x: ArrayView3<F>, cache: &mut KvCache<F>) -> Array3<F> {
        let tq = x.dim().1;
        let y = self.infer_cached_rows(x, &mut cache.rows_mut(tq));
        cache.advance(tq);
        y
    }

    /// [`MultiHead::infer_cached`] over a run of a cache's sequences.
    fn infer_cached_rows(&self, x: ArrayView3<F>, cache: &mut KvRows<F>) -> Array3<F> {
        let (b, tq, d) = x.dim();
        assert!(
            d == self.cfg.d_model && b == cache.batch_size(),
            "MultiHead::infer_cached: x is {:?}, expected [B = {}, Tq, d_model = {}]",
            x.shape(),
            cache.batch_size(),
            self.cfg.d_model
        );
        let x_rows = rows_in_place(x);
        let p = &self.p;
        let k = affine(x_rows.view(), p.w_k.view(), p.b_k.as_ref().map(|b| b.view()));
        let v = affine(x_rows.view(), p.w_v.view(), p.b_v.as_ref().map(|b| b.view()));
        cache.push(self.heads(k.view(), b, tq), self.heads(v.view(), b, tq));
        self.attend(x_rows.view(), tq, cache.view(), &Mask::causal())
    }

    /// Attention of `x` `[B, Tq, d_model]` over cached keys and values (cross-attention over a
    /// memory from [`MultiHead::project_kv`]); `mask` is for `(B, Tq, cache.len())`.
    ///
    /// # Panics
    /// If `x` does not fit the cache or the mask does not fit.
    pub fn infer_with_cache(&self, x: ArrayView3<F>, cache: &KvCache<F>, mask: &Mask) -> Array3<F> {
        self.infer_with_view(x, cache.view(), mask)
    }

    /// [`MultiHead::infer_with_cache`] over a run of a cache's sequences.
    fn infer_with_view(&self, x: ArrayView3<F>, cache: KvView<F>, mask: &Mask) -> Array3<F> {
        let (b, tq, d) = x.dim();
        assert!(
            d == self.cfg.d_model && b == cache.batch_size(),
            "MultiHead::infer_with_cache: x is {:?}, expected [B = {}, Tq, d_model = {}]",
            x.shape(),
            cache.batch_size(),
            self.cfg.d_model
        );
        self.attend(rows_in_place(x).view(), tq, cache, mask)
    }

    /// Queries from `x_rows` (`tq` positions per sequence), attention over the cache, W_O.
    fn attend(&self, x_rows: ArrayView2<F>, tq: usize, cache: KvView<F>, mask: &Mask) -> Array3<F> {
        let b = cache.batch_size();
        let d = self.cfg.d_model;
        let p = &self.p;
        let q = affine(x_rows, p.w_q.view(), p.b_q.as_ref().map(|b| b.view()));
        // One query over a bf16 cache reads it in place rather than widened into a copy;
        // over an `f32` one this path keeps the general attention (and its bits).
        let ctx = self.context(q.view(), tq, cache, mask, tq == 1 && cache.is_bf16());
        let y = affine(ctx.view(), p.w_o.view(), p.b_o.as_ref().map(|b| b.view()));
        y.into_shape_with_order((b, tq, d)).expect("standard layout")
    }

    /// The heads' outputs `[B·Tq, d_model]` for projected queries `q` `[B·Tq, d_model]` over
    /// the cache: one query per sequence on the decoding step's path when `step`, else the
    /// general attention.
    fn context(&self, q: ArrayView2<F>, tq: usize, cache: KvView<F>, mask: &Mask, step: bool) -> Array2<F> {
        let b = cache.batch_size();
        let mask = resolve_or_panic(mask, b, tq, cache.len());
        // SAFETY: both `attention_step` and `attention_infer` write every element of their
        // output.
        unsafe {
            crate::kernels::workspace::filled((b * tq, self.cfg.d_model), |mut ctx| {
                if step {
                    cache.attend_step(q, &mask, ctx);
                } else {
                    attention_infer(
                        self.heads(q.as_standard_layout().view(), b, tq),
                        cache.keys().view(),
                        cache.values().view(),
                        &mask,
                        self.heads_mut(ctx.view_mut(), b, tq),
                    );
                }
            })
        }
    }

    /// The projections packed for decoding: Q, K and V together for self-attention
    /// (`self_attention`), Q alone for cross-attention; `None` where nothing packs (see
    /// [`PackedB`]).
    pub(crate) fn pack(&self, self_attention: bool) -> Option<PackedMultiHead<F>> {
        self.pack_with(self_attention, false)
    }

    /// [`MultiHead::pack`], for cross-attention with W_K and W_V packed too (`memory`), for
    /// products over a whole memory rather than over a cache projected once.
    pub(crate) fn pack_with(&self, self_attention: bool, memory: bool) -> Option<PackedMultiHead<F>> {
        let p = &self.p;
        let both = |a: &Option<Array1<F>>, b: &Option<Array1<F>>| match (a, b) {
            (Some(a), Some(b)) => Some(Some(
                ndarray::concatenate(Axis(0), &[a.view(), b.view()]).expect("1-D"),
            )),
            (None, None) => Some(None),
            _ => None,
        };
        let memory = if memory && !self_attention {
            Some((PackedB::concat(&[p.w_k.t(), p.w_v.t()])?, both(&p.b_k, &p.b_v)?))
        } else {
            None
        };
        let (input, input_bias) = if self_attention {
            let input = PackedB::concat(&[p.w_q.t(), p.w_k.t(), p.w_v.t()])?;
            let bias = match (&p.b_q, &p.b_k, &p.b_v) {
                (Some(q), Some(k), Some(v)) => {
                    Some(ndarray::concatenate(Axis(0), &[q.view(), k.view(), v.view()]).expect("1-D"))
                }
                _ => None,
            };
            (input, bias)
        } else {
            (PackedB::new(p.w_q.t())?, p.b_q.clone())
        };
        if self_attention && input_bias.is_none() && (p.b_q.is_some() || p.b_k.is_some() || p.b_v.is_some()) {
            // Some but not all of the three biases: not a layout this crate builds.
            return None;
        }
        Some(PackedMultiHead {
            input,
            input_bias,
            memory,
            output: PackedB::new(p.w_o.t())?,
        })
    }

    /// [`MultiHead::infer`] with the projections of [`MultiHead::pack_with`] (`None`: the weights
    /// as they are): Q, K and V in one product in self-attention, K and V in one in
    /// cross-attention.
    pub(crate) fn infer_packed(
        &self,
        x: ArrayView3<F>,
        memory: Option<ArrayView3<F>>,
        mask: &Mask,
        packed: Option<&PackedMultiHead<F>>,
    ) -> Array3<F> {
        let packed = match packed {
            Some(p) if memory.is_none() || p.memory.is_some() => p,
            _ => return self.infer(x, memory, mask),
        };
        let d = self.cfg.d_model;
        let (b, tq, tk) = self.check_pair(x, memory);
        let mask = resolve_or_panic(mask, b, tq, tk);
        let x_rows = rows_in_place(x);
        let product = |a: ArrayView2<F>, w: &PackedB, bias: &Option<Array1<F>>| {
            // SAFETY: gemm_packed writes every element.
            unsafe {
                filled((a.nrows(), w.dim().1), |c| {
                    gemm_packed(a, w, bias.as_ref().map(|b| b.view()), false, c)
                })
            }
        };
        let input = product(x_rows.view(), &packed.input, &packed.input_bias);
        let kv = memory.map(|m| {
            let (w, bias) = packed.memory.as_ref().expect("checked above");
            product(rows_in_place(m).view(), w, bias)
        });
        let (q, k, v) = match &kv {
            None => {
                let [q, k, v] = self.split_heads::<3>(input.view(), b, tq);
                (q, k, v)
            }
            Some(kv) => {
                let [q] = self.split_heads::<1>(input.view(), b, tq);
                let [k, v] = self.split_heads::<2>(kv.view(), b, tk);
                (q, k, v)
            }
        };
        let (ctx, _) = self.all_heads(q, k, v, mask, Pass::Infer);
        let y = product(ctx.view(), &packed.output, &self.p.b_o);
        (input, kv, ctx).give_back();
        y.into_shape_with_order((b, tq, d)).expect("standard layout")
    }

    /// `[B·T, N·d_model]` rows (N projections side by side) as N `[B, H, T, d_k]` per-head
    /// views, without copies.
    fn split_heads<'a, const N: usize>(
        &self,
        x: ArrayView2<'a, F>,
        b: usize,
        t: usize,
    ) -> [ArrayView4<'a, F>; N] {
        let (h, dk) = (self.cfg.n_heads, self.cfg.d_k());
        let x = x
            .into_shape_with_order((b, t, N, h, dk))
            .expect("standard layout");
        std::array::from_fn(|i| x.index_axis_move(Axis(2), i).permuted_axes([0, 2, 1, 3]))
    }

    /// [`MultiHead::infer_cached`] with the projections of [`MultiHead::pack`] (`None`: the
    /// weights as they are).
    pub(crate) fn infer_cached_packed(
        &self,
        x: ArrayView3<F>,
        cache: &mut KvRows<F>,
        packed: Option<&PackedMultiHead<F>>,
    ) -> Array3<F> {
        let Some(packed) = packed else {
            return self.infer_cached_rows(x, cache);
        };
        let (b, tq, d) = x.dim();
        assert!(
            d == self.cfg.d_model && b == cache.batch_size() && packed.input.dim() == (d, 3 * d),
            "MultiHead::infer_cached: x is {:?}, expected [B = {}, Tq, d_model = {}]",
            x.shape(),
            cache.batch_size(),
            self.cfg.d_model
        );
        let x_rows = rows_in_place(x);
        // SAFETY: gemm_packed writes every element.
        let qkv = unsafe {
            filled((b * tq, 3 * d), |c| {
                gemm_packed(
                    x_rows.view(),
                    &packed.input,
                    packed.input_bias.as_ref().map(|b| b.view()),
                    false,
                    c,
                )
            })
        };
        // Q, K and V read where the product left them, side by side in each row: copied out
        // first, the three parts and the input rows had been a twentieth of the main
        // thread's time in a small greedy decode on two threads, while the other waited.
        let [_, k, v] = self.split_heads::<3>(qkv.view(), b, tq);
        cache.push(k, v);
        let y = self.attend_projected(
            qkv.slice(s![.., ..d]),
            tq,
            cache.view(),
            &Mask::causal(),
            &packed.output,
        );
        qkv.give_back();
        y
    }

    /// [`MultiHead::infer_with_cache`] with the projections of [`MultiHead::pack`].
    pub(crate) fn infer_with_cache_packed(
        &self,
        x: ArrayView3<F>,
        cache: KvView<F>,
        mask: &Mask,
        packed: Option<&PackedMultiHead<F>>,
    ) -> Array3<F> {
        let Some(packed) = packed else {
            return self.infer_with_view(x, cache, mask);
        };
        let (b, tq, d) = x.dim();
        assert!(
            d == self.cfg.d_model && b == cache.batch_size() && packed.input.dim() == (d, d),
            "MultiHead::infer_with_cache: x is {:?}, expected [B = {}, Tq, d_model = {}]",
            x.shape(),
            cache.batch_size(),
            self.cfg.d_model
        );
        let x_rows = rows_in_place(x);
        // SAFETY: gemm_packed writes every element.
        let q = unsafe {
            filled((b * tq, d), |c| {
                gemm_packed(
                    x_rows.view(),
                    &packed.input,
                    packed.input_bias.as_ref().map(|b| b.view()),
                    false,
                    c,
                )
            })
        };
        let y = self.attend_projected(q.view(), tq, cache, mask, &packed.output);
        q.give_back();
        y
    }

    /// Attention of projected queries `[B·Tq, d_model]` over the cache, then W_O packed.
    fn attend_projected(
        &self,
        q: ArrayView2<F>,
        tq: usize,
        cache: KvView<F>,
        mask: &Mask,
        w_o: &PackedB,
    ) -> Array3<F> {
        let b = cache.batch_size();
        let d = self.cfg.d_model;
        let ctx = self.context(q, tq, cache, mask, tq == 1);
        // SAFETY: gemm_packed writes every element.
        let y = unsafe {
            filled((b * tq, d), |c| {
                gemm_packed(ctx.view(), w_o, self.p.b_o.as_ref().map(|b| b.view()), false, c)
            })
        };
        ctx.give_back();
        y.into_shape_with_order((b, tq, d)).expect("standard layout")
    }

    /// `[B·T, d_model]` rows as `[B, H, T, d_k]` per-head views (no copy).
    fn heads<'a>(&self, x: ArrayView2<'a, F>, b: usize, t: usize) -> ArrayView4<'a, F> {
        let (h, dk) = (self.cfg.n_heads, self.cfg.d_k());
        x.into_shape_with_order((b, t, h, dk))
            .expect("standard layout")
            .permuted_axes([0, 2, 1, 3])
    }

    /// The attention core over every head (`q` `[B, H, Tq, d_k]`, `k` and `v` `[B, H, Tk,
    /// d_k]`) for `pass`: the context `[B·Tq, d]`, its heads concatenated, and the core's
    /// cache unless `pass` is [`Pass::Infer`]. The context is not zeroed first: the core writes
    /// every element of it.
    fn all_heads(
        &self,
        q: ArrayView4<'_, F>,
        k: ArrayView4<'_, F>,
        v: ArrayView4<'_, F>,
        mask: ResolvedMask,
        pass: Pass<'_>,
    ) -> (Array2<F>, Option<AttentionCoreCache<F>>) {
        let (b, tq) = (q.dim().0, q.dim().2);
        let mut core = None;
        // SAFETY: `attention_forward` and `attention_infer` write every element of their output.
        let ctx = unsafe {
            crate::kernels::workspace::filled((b * tq, self.cfg.d_model), |ctx| {
                core = pass.attend(q, k, v, mask, self.cfg.p_drop, self.heads_mut(ctx, b, tq));
            })
        };
        (ctx, core)
    }

    fn heads_mut<'a>(&self, x: ArrayViewMut2<'a, F>, b: usize, t: usize) -> ArrayViewMut4<'a, F> {
        let (h, dk) = (self.cfg.n_heads, self.cfg.d_k());
        x.into_shape_with_order((b, t, h, dk))
            .expect("standard layout")
            .permuted_axes([0, 2, 1, 3])
    }
}

impl<F: Float> MultiHeadCache<F> {
    /// Every head's attention weights of the forward pass, `[B, H, Tq, Tk]`, before dropout.
    pub fn weights(&self) -> ArrayView4<'_, F> {
        self.core.weights()
    }
}

/// `[B, T, d]` as `[B·T, d]` rows: a view where `x` is in standard layout, else a copy.
fn rows_in_place<F: Float>(x: ArrayView3<'_, F>) -> CowArray<'_, F, Ix2> {
    let (b, t, d) = x.dim();
    if x.is_standard_layout() {
        x.into_shape_with_order((b * t, d))
            .expect("standard layout")
            .into()
    } else {
        rows(x).into()
    }
}

/// `[B, T, d]` as owned standard-layout rows `[B·T, d]`.
fn rows<F: Float>(x: ArrayView3<F>) -> Array2<F> {
    let (b, t, d) = x.dim();
    crate::kernels::workspace::owned(x)
        .into_shape_with_order((b * t, d))
        .expect("standard layout")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gemm::bf16::round_bf16;
    use crate::kernels::precision::with_precision;
    use rand::{SeedableRng, rngs::StdRng};

    /// A bf16 cache holds the pushed keys and values rounded to bf16 through growth and
    /// selection, and a decoding step over it gives the bits of a step over an `f32` cache of
    /// the rounded values.
    #[test]
    fn a_bf16_cache_holds_rounded_values_and_attends_as_f32_over_them() {
        let mut rng = StdRng::seed_from_u64(3);
        let layer: MultiHead = MultiHeadConfig::new(32, 4).init(&mut rng).unwrap();
        let (b, h, dk) = (3, 4, 8);
        let mut half = with_precision(Precision::Bf16, || layer.empty_cache(b, 2));
        let mut full = layer.empty_cache(b, 2);
        assert!(half.is_bf16() && !full.is_bf16());
        let random = |rng: &mut StdRng, t: usize| {
            Array4::from_shape_fn((b, h, t, dk), |_| rng.random_range(-2.0f32..2.0))
        };
        // Three pushes grow both past their capacity of 2.
        for t in [1, 2, 3] {
            let (k, v) = (random(&mut rng, t), random(&mut rng, t));
            half.push(k.view(), v.view());
            full.push(k.mapv(round_bf16).view(), v.mapv(round_bf16).view());
        }
        assert_eq!(half.len(), 6);
        assert_eq!(half, full, "the same values after growing");
        for rows in [vec![2, 0, 0], vec![1]] {
            half.select(&rows);
            full.select(&rows);
            assert_eq!(half, full, "the same values after selecting {rows:?}");
        }
        assert!(half.is_bf16());
        let q = Array2::from_shape_fn((1, h * dk), |_| rng.random_range(-2.0f32..2.0));
        let mask = Mask::none().resolve(1, 1, half.len()).unwrap();
        let (mut a, mut c) = (Array2::zeros((1, h * dk)), Array2::zeros((1, h * dk)));
        half.view().attend_step(q.view(), &mask, a.view_mut());
        full.view().attend_step(q.view(), &mask, c.view_mut());
        assert!(a.iter().zip(&c).all(|(x, y)| x.to_bits() == y.to_bits()));
        assert!(a.iter().any(|&x| x != 0.0));
    }
}
