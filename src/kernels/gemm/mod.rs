//! General matrix multiplication, `C ← α·A·B + β·C`, over `matrixmultiply`.
//!
//! One safe entry, [`gemm`], takes ndarray views with any strides: a transposed operand is
//! `a.t()`, a stride swap, and is never copied. Per-head attention uses strided sub-views of
//! the `[B·T, d_model]` projections in the same way. [`gemm_batched`] runs one product per
//! index of a leading batch axis.
//!
//! Products with few rows (decoding steps) whose operands are laid out for it skip
//! `matrixmultiply`, whose packing of B would cost as much as the arithmetic, and use the
//! kernels of [`super::small_gemm`].
//!
//! # Threads and determinism
//!
//! Large products are split across the rayon pool by rows of C (or by columns when C has
//! few rows), never along the reduction axis k. `matrixmultiply` accumulates each element of
//! C over k in the same order whatever the number of rows or columns it is given, so the
//! result is bitwise identical for any thread count. `matrixmultiply`'s own `threading`
//! feature stays off: rayon is the one pool.

use std::any::TypeId;

use ndarray::{
    ArrayView1, ArrayView2, ArrayView3, ArrayViewMut1, ArrayViewMut2, ArrayViewMut3, Axis, ShapeBuilder, Zip,
    s,
};

use super::Float;
use super::activations::Activation;
use super::dropout::DropKey;
use super::precision::{Precision, with_precision};
use super::small_gemm;

pub mod bf16;
pub(crate) mod micro;
mod packed;
pub(crate) mod weights;

use packed::{Epilogue, Mat, MatMut, Panels};
pub use packed::{Isa, KC};
pub(crate) use packed::{exceed_last_level_cache, l2_cache_bytes, with_streamed_weights};

/// Below this many multiply-adds a product runs on the calling thread.
const PARALLEL_MIN_WORK: usize = 1 << 18;
/// Below this many multiply-adds a product with a packed weight ([`gemm_packed`]) runs on the
/// calling thread: a decoding step's few rows against a weight are too little work to cut in
/// two (each part packs its rows of A and, with AMX, configures the tiles). Measured on the
/// tiny workload, two threads: greedy decode 2.01–2.07 → 1.90–1.96 ms in `f32`, 1.61–1.69 →
/// 1.47–1.51 ms in bf16; eval and the small workload unchanged.
const PACKED_MIN_SPLIT: usize = 1 << 20;
/// A product with a packed weight of at least this many elements (256 KiB in `f32`) is cut
/// between the threads whatever its rows: a step of one sequence reads the whole weight for
/// one row, and two cores read it from L3 nearly twice as fast as one. Measured on an AMD EPYC
/// Zen 4, two threads, `bench --batch 1` (one sequence) of the small workload, builds
/// alternating: `lm_generate` 4.50–4.63 → 2.95–3.06 ms, its greedy decode 5.49–5.58 →
/// 3.57–3.80 ms; the tiny workload's weights are all below it.
const PACKED_SPLIT_WEIGHT: usize = 1 << 16;
/// A split never makes pieces with fewer rows (or columns) than this.
const MIN_SPLIT: usize = 32;

/// `C ← α·A·B + β·C`, with A `[m, k]`, B `[k, n]` and C `[m, n]` of any strides.
///
/// If β is zero, C is only written: NaN or garbage in C does not reach the result.
/// Large products run on the rayon pool, split by rows or columns of C; see the
/// [module docs](self) for why the result does not depend on the thread count.
///
/// # Panics
/// If the shapes do not chain: `a.ncols() != b.nrows()` or C is not `[a.nrows(), b.ncols()]`.
///
/// # Example
/// ```
/// use vaswani::ndarray::array;
/// let a = array![[1.0_f32, 2.0], [3.0, 4.0]];
/// let mut c = vaswani::ndarray::Array2::<f32>::zeros((2, 2));
/// // C = A·Aᵀ, the transpose by strides.
/// vaswani::kernels::gemm(1.0, a.view(), a.t(), 0.0, c.view_mut());
/// assert_eq!(c, array![[5.0, 11.0], [11.0, 25.0]]);
/// ```
pub fn gemm<F: Float>(alpha: F, a: ArrayView2<F>, b: ArrayView2<F>, beta: F, c: ArrayViewMut2<F>) {
    gemm_with(true, alpha, a, b, beta, c)
}

/// [`gemm`] without the few-row kernels of [`small_gemm`], which sum in another order: for a
/// product cut into blocks of rows (or columns), each element then has the bits that the
/// whole product gives it wherever that runs the packed kernels (or `matrixmultiply`).
///
/// # Panics
/// As [`gemm`].
pub(crate) fn gemm_blocks<F: Float>(
    alpha: F,
    a: ArrayView2<F>,
    b: ArrayView2<F>,
    beta: F,
    c: ArrayViewMut2<F>,
) {
    gemm_with(false, alpha, a, b, beta, c)
}

/// `grad_w += grad_yᵀ·x` and `grad_b += Σ_rows grad_y`: a linear layer's parameter
/// gradients. Where [`bias_sums_in_packing`] says so, the packed kernels add the column sums
/// of `grad_y` while they pack `grad_yᵀ` for the product (its values read once, not twice);
/// elsewhere [`super::add_column_sums`] runs after the product. Either way each column is
/// summed over the rows in order: the same bits.
///
/// # Panics
/// If the shapes do not chain (as [`gemm`]), or `grad_b` does not have one element per column
/// of `grad_y`.
pub(crate) fn gemm_weight_grad<F: Float>(
    grad_y: ArrayView2<F>,
    x: ArrayView2<F>,
    mut grad_w: ArrayViewMut2<F>,
    grad_b: Option<ArrayViewMut1<F>>,
) {
    let a = grad_y.t();
    check_shapes(a.dim(), x.dim(), grad_w.dim());
    let Some(mut gb) = grad_b else {
        return gemm(F::ONE, a, x, F::ONE, grad_w);
    };
    assert_eq!(
        gb.len(),
        grad_y.ncols(),
        "gemm_weight_grad: grad_b {:?} for grad_y {:?}",
        gb.shape(),
        grad_y.shape()
    );
    let (m, k) = a.dim();
    let n = x.ncols();
    // `gemm` takes its few-row kernels where these would (in `f32`), which do not pack.
    let few_rows = !bf16_applies::<F>() && small_gemm::takes(m, k);
    if bias_sums_in_packing::<F>()
        && m * n * k > 0
        && !few_rows
        && let Some(sums) = gb.as_slice_mut()
    {
        // F is f32 (bias_sums_in_packing), so the cast changes nothing but the type.
        let sums = Some(sums.as_mut_ptr() as *mut f32);
        let parts = parts_for(m, n, k, PARALLEL_MIN_WORK);
        let done = packed_f32(
            F::ONE,
            a,
            x,
            F::ONE,
            grad_w.view_mut(),
            parts,
            Fused::none(),
            sums,
        );
        debug_assert!(done, "bias_sums_in_packing promised the packed kernels");
        return;
    }
    gemm(F::ONE, a, x, F::ONE, grad_w);
    super::add_column_sums(grad_y, gb);
}

/// Whether [`gemm_weight_grad`] takes a bias gradient's sums in the packing of its product:
/// `f32` under bf16 precision on the AMX or AVX512-BF16 kernels (not `Emulated`, whose
/// products go through the `f32` kernels), and `f32` on the AVX-512 kernels. A layer whose
/// weight and input gradients run side by side ([`super::parallel::join_gradients`]) puts the
/// bias with the weight gradient then, and with the input gradient otherwise (whose operands
/// pack in less time).
pub(crate) fn bias_sums_in_packing<F: Float>() -> bool {
    if bf16_applies::<F>() {
        bf16::Bf16Path::best() != bf16::Bf16Path::Emulated
    } else {
        TypeId::of::<F>() == TypeId::of::<f32>() && Isa::best() == Some(Isa::Avx512)
    }
}

fn gemm_with<F: Float>(
    few_rows: bool,
    alpha: F,
    a: ArrayView2<F>,
    b: ArrayView2<F>,
    beta: F,
    mut c: ArrayViewMut2<F>,
) {
    check_shapes(a.dim(), b.dim(), c.dim());
    let (m, k) = a.dim();
    let n = b.ncols();
    if few_rows && small_gemm::takes(m, k) && m * n * k > 0 && !bf16_applies::<F>() {
        let unit = |stride: isize, len: usize| stride == 1 || len <= 1;
        if unit(a.strides()[1], k) && unit(b.strides()[0], k) {
            return small_gemm::dot_rows(alpha, a, b, beta, c);
        }
        if m <= 8 && beta == F::ZERO && unit(b.strides()[1], n) && unit(c.strides()[1], n) {
            return small_gemm::axpy_rows(alpha, a, b, beta, c);
        }
    }
    let parts = parts_for(m, n, k, PARALLEL_MIN_WORK);
    if packed_f32(alpha, a, b, beta, c.view_mut(), parts, Fused::none(), None) {
        return;
    }
    if parts < 2 {
        return gemm_serial(alpha, a, b, beta, c);
    }
    // matrixmultiply, split into whole rows (or columns) of C.
    let (by_rows, len) = if m >= 2 * MIN_SPLIT {
        (true, m)
    } else if n >= 2 * MIN_SPLIT {
        (false, n)
    } else {
        return gemm_serial(alpha, a, b, beta, c);
    };
    let chunk = chunk_len(len, parts);
    let pieces = len.div_ceil(chunk);
    let c_ptr = SendPtr(c.as_mut_ptr());
    let c_strides = (c.strides()[0], c.strides()[1]);
    let c_dim = c.dim();
    super::parallel::for_each_index(pieces, |i| {
        let range = i * chunk..((i + 1) * chunk).min(len);
        // SAFETY: pieces are disjoint rows (or columns) of C, which the caller lends mutably.
        let c = unsafe { raw_view_mut(c_ptr, c_dim, c_strides) };
        if by_rows {
            gemm_serial(
                alpha,
                a.slice(s![range.clone(), ..]),
                b,
                beta,
                c.slice_move(s![range, ..]),
            );
        } else {
            gemm_serial(
                alpha,
                a,
                b.slice(s![.., range.clone()]),
                beta,
                c.slice_move(s![.., range]),
            );
        }
    });
}

/// `C ← A·B + bias`, then `max(·, 0)` if `relu`: the product of a linear layer with its bias
/// (one per column of C, broadcast over the rows), and of the first layer of a ReLU
/// feed-forward network, in one pass over C. C is only written.
///
/// # Panics
/// If the shapes do not chain, or the bias does not have one element per column of C.
pub fn gemm_bias<F: Float>(
    a: ArrayView2<F>,
    b: ArrayView2<F>,
    bias: Option<ArrayView1<F>>,
    relu: bool,
    c: ArrayViewMut2<F>,
) {
    gemm_fused(
        a,
        b,
        Fused {
            bias,
            relu,
            dropout: None,
            gate: None,
        },
        c,
    );
}

impl<F: Float> Fused<'_, F> {
    /// Nothing: the product as it is.
    pub fn none() -> Self {
        Fused {
            bias: None,
            relu: false,
            dropout: None,
            gate: None,
        }
    }
}

/// What [`gemm_fused`] does to `A·B` before it lands in C, in this order.
#[derive(Clone, Copy, Debug)]
pub struct Fused<'a, F: Float> {
    /// A bias per column of C, added to the product.
    pub bias: Option<ArrayView1<'a, F>>,
    /// `max(·, 0)`.
    pub relu: bool,
    /// Dropout by the flat (row-major) index of C's elements: the FFN's inner dropout, with
    /// no mask written out.
    pub dropout: Option<DropKey>,
    /// `(g, s)`: each element times s where g's element (g has C's shape) is above 0, else 0:
    /// the ReLU backward through the activation g, times the dropout scale s.
    pub gate: Option<(ArrayView2<'a, F>, F)>,
}

/// `C ← post(A·B)`: a GEMM whose stores apply [`Fused`]'s bias, ReLU, dropout and gate, so
/// that those cost no pass of their own over C. C is only written.
///
/// # Panics
/// If the shapes do not chain, the bias does not have one element per column of C, or the
/// gate does not have C's shape.
pub fn gemm_fused<F: Float>(a: ArrayView2<F>, b: ArrayView2<F>, post: Fused<'_, F>, mut c: ArrayViewMut2<F>) {
    check_shapes(a.dim(), b.dim(), c.dim());
    let (m, k) = a.dim();
    let n = b.ncols();
    if let Some(bias) = &post.bias {
        assert_eq!(
            bias.len(),
            n,
            "gemm_fused: bias {:?} for C {:?}",
            bias.shape(),
            c.shape()
        );
    }
    if let Some((g, _)) = &post.gate {
        assert_eq!(
            g.dim(),
            c.dim(),
            "gemm_fused: gate {:?} for C {:?}",
            g.shape(),
            c.shape()
        );
    }
    if !small_gemm::takes(m, k) {
        let owned = post.bias.as_ref().map(|b| b.as_standard_layout());
        let post = Fused {
            bias: owned.as_ref().map(|b| b.view()),
            ..post
        };
        if packed_f32(
            F::ONE,
            a,
            b,
            F::ZERO,
            c.view_mut(),
            parts_for(m, n, k, PARALLEL_MIN_WORK),
            post,
            None,
        ) {
            return;
        }
    }
    match post.bias {
        Some(bias) => {
            c.assign(&bias.broadcast((m, n)).expect("bias broadcasts over rows"));
            gemm(F::ONE, a, b, F::ONE, c.view_mut());
        }
        None => gemm(F::ONE, a, b, F::ZERO, c.view_mut()),
    }
    if post.relu {
        c.mapv_inplace(|v| Activation::Relu.apply(v));
    }
    if let Some(key) = post.dropout {
        for (r, mut row) in c.rows_mut().into_iter().enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                *v *= key.factor(r * n + j);
            }
        }
    }
    if let Some((g, s)) = post.gate {
        Zip::from(&mut c)
            .and(&g)
            .for_each(|v, &g| *v = if g > F::ZERO { *v * s } else { F::ZERO });
    }
}

/// The B operand of `C ← A·B` packed once for many products: a weight at inference
/// (`B = Wᵀ` of an `[out, in]` weight), so that a decoding step, whose products have a few
/// rows, reads each weight once in the kernels' layout instead of copying it first.
///
/// Only `f32` packs: on a CPU with the crate's vector kernels, or under bf16 precision on any
/// CPU; elsewhere the constructors return `None` and callers use [`gemm`]. The packed copy
/// does not follow later changes of the matrix it was made from: hold it only while that
/// matrix is borrowed.
#[derive(Clone, Debug)]
pub struct PackedB {
    k: usize,
    n: usize,
    data: Packing,
}

/// How a [`PackedB`] holds B.
#[derive(Clone, Debug)]
enum Packing {
    /// `f32` for the kernels of `isa`.
    F32 { isa: Isa, data: packed::Aligned<f32> },
    /// bf16 for a vector bf16 path.
    Bf16 {
        path: bf16::Bf16Path,
        data: packed::Aligned<u16>,
    },
    /// Rounded to bf16 for the `f32` kernels of `isa` (the emulated path), in their layout,
    /// stored as bf16 bits (half the bytes of `f32`) and widened as the products read them;
    /// for AVX2 each step's 16 columns in the order those kernels widen them (see
    /// `packed::narrow`).
    Rounded { isa: Isa, data: packed::Aligned<u16> },
}

impl PackedB {
    /// B `[k, n]` (any strides) packed, or `None` where nothing packs.
    ///
    /// Made under [`Precision::Bf16`] (see [`with_precision`]),
    /// B is converted to bf16 here, once, and every product with it runs in bf16 wherever it
    /// is used.
    pub fn new<F: Float>(b: ArrayView2<F>) -> Option<PackedB> {
        PackedB::on(b, bf16::Bf16Path::best())
    }

    /// [`PackedB::new`], its bf16 products on `path` (one this process runs).
    fn on<F: Float>(b: ArrayView2<F>, path: bf16::Bf16Path) -> Option<PackedB> {
        if TypeId::of::<F>() != TypeId::of::<f32>() {
            return None;
        }
        // Without vector kernels an `f32` B is not packed (`matrixmultiply` multiplies it as
        // it is), but a bf16 one is, rounded, for the portable kernels: its products then run
        // in bf16 wherever they are called, as on every other CPU.
        let isa = match Isa::best() {
            Some(isa) => isa,
            None if bf16_applies::<F>() => Isa::Scalar,
            None => return None,
        };
        let (k, n) = b.dim();
        let mb = Mat {
            ptr: b.as_ptr() as *const f32,
            rs: b.strides()[0],
            cs: b.strides()[1],
        };
        let parts = super::parallel::threads();
        // SAFETY (every packing): the view addresses its own k × n elements, which are f32
        // (checked above).
        let data = if !bf16_applies::<F>() {
            Packing::F32 {
                isa,
                data: unsafe { packed::pack_b_all(isa, k, n, mb, parts) },
            }
        } else {
            match path {
                bf16::Bf16Path::Emulated => {
                    let values = unsafe {
                        bf16::with_rounded(bf16::Operand::B, mb, k, n, |rb| {
                            packed::pack_b_all(isa, k, n, rb, parts)
                        })
                    };
                    let mut data = packed::Aligned::zeroed(values.len());
                    packed::narrow(isa, &values, &mut data);
                    Packing::Rounded { isa, data }
                }
                path => Packing::Bf16 {
                    path,
                    data: unsafe { bf16::pack_b_all(k, n, mb, parts) },
                },
            }
        };
        Some(PackedB { k, n, data })
    }

    /// The precision of the products with this B.
    pub fn precision(&self) -> Precision {
        match self.data {
            Packing::F32 { .. } => Precision::F32,
            _ => Precision::Bf16,
        }
    }

    /// Several B with the same number of rows, side by side (`[B₀ B₁ …]`, `k × Σ nᵢ`): one
    /// product for several weights, such as the query, key and value projections.
    ///
    /// # Panics
    /// If the operands have different numbers of rows, or there are none.
    pub fn concat<F: Float>(bs: &[ArrayView2<F>]) -> Option<PackedB> {
        assert!(
            !bs.is_empty() && bs.iter().all(|b| b.nrows() == bs[0].nrows()),
            "PackedB::concat: operands of shapes {:?}",
            bs.iter().map(|b| b.shape().to_vec()).collect::<Vec<_>>()
        );
        let whole = ndarray::concatenate(Axis(1), bs).expect("same number of rows");
        PackedB::new(whole.view())
    }

    /// `(k, n)`: the shape of B.
    pub fn dim(&self) -> (usize, usize) {
        (self.k, self.n)
    }

    /// The bytes of its packing.
    pub(crate) fn bytes(&self) -> usize {
        match &self.data {
            Packing::F32 { data, .. } => std::mem::size_of_val(&data[..]),
            Packing::Bf16 { data, .. } | Packing::Rounded { data, .. } => std::mem::size_of_val(&data[..]),
        }
    }
}

/// `C ← A·B + bias`, then `max(·, 0)` if `relu`, with B packed beforehand: [`gemm_bias`] for
/// a weight used many times. C is only written.
///
/// # Panics
/// If the shapes do not chain or the bias does not fit, or the element type is not `f32`
/// (a [`PackedB`] exists only for `f32`).
pub fn gemm_packed<F: Float>(
    a: ArrayView2<F>,
    b: &PackedB,
    bias: Option<ArrayView1<F>>,
    relu: bool,
    mut c: ArrayViewMut2<F>,
) {
    assert!(
        TypeId::of::<F>() == TypeId::of::<f32>(),
        "gemm_packed: a PackedB multiplies f32 only"
    );
    check_shapes(a.dim(), b.dim(), c.dim());
    let (m, k) = a.dim();
    let n = b.n;
    let bias = bias.map(|bias| {
        assert_eq!(
            bias.len(),
            n,
            "gemm_packed: bias {:?} for C {:?}",
            bias.shape(),
            c.shape()
        );
        bias.as_standard_layout().into_owned()
    });
    let ma = Mat {
        ptr: a.as_ptr() as *const f32,
        rs: a.strides()[0],
        cs: a.strides()[1],
    };
    let mc = MatMut {
        ptr: c.as_mut_ptr() as *mut f32,
        rs: c.strides()[0],
        cs: c.strides()[1],
    };
    let ep = Epilogue {
        bias: bias.as_ref().map(|b| b.as_ptr() as *const f32),
        relu,
        ..Epilogue::default()
    };
    let parts = if n.saturating_mul(k) >= PACKED_SPLIT_WEIGHT {
        super::parallel::threads()
    } else {
        parts_for(m, n, k, PACKED_MIN_SPLIT)
    };
    // SAFETY (every arm): F is f32 (asserted); the views address their own elements, C is
    // exclusive, the shapes chain (checked), the bias is contiguous with n elements, and `b`
    // was packed for its kernels, which were found on this CPU.
    match &b.data {
        Packing::F32 { isa, data } => unsafe {
            packed::gemm_packed_b(
                *isa,
                m,
                k,
                n,
                1.0,
                ma,
                Panels::F32(data),
                0.0,
                mc,
                parts,
                ep,
                true,
            )
        },
        Packing::Bf16 { path, data } => unsafe {
            bf16::gemm_packed_b(*path, m, k, n, 1.0, ma, data, 0.0, mc, parts, ep)
        },
        Packing::Rounded { isa, data } => unsafe {
            bf16::with_rounded(bf16::Operand::A, ma, m, k, |ra| {
                packed::gemm_packed_b(
                    *isa,
                    m,
                    k,
                    n,
                    1.0,
                    ra,
                    Panels::Bf16(data),
                    0.0,
                    mc,
                    parts,
                    ep,
                    true,
                )
            })
        },
    }
}

/// Whether the products of `F` run in bf16 here: `f32` under [`Precision::Bf16`].
fn bf16_applies<F: Float>() -> bool {
    TypeId::of::<F>() == TypeId::of::<f32>() && super::precision::precision() == Precision::Bf16
}

/// How many threads a product of this size is split over: one below `min_work` multiply-adds.
fn parts_for(m: usize, n: usize, k: usize, min_work: usize) -> usize {
    if m.saturating_mul(n).saturating_mul(k) < min_work {
        1
    } else {
        super::parallel::threads()
    }
}

/// A pointer to send to the threads that write disjoint parts of what it points to.
#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);
// SAFETY: only used to rebuild disjoint views of a mutably borrowed array (see `gemm`).
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

/// # Safety
/// The pointer, shape and strides come from a live mutable view, and no two threads use the
/// same elements of the view returned.
unsafe fn raw_view_mut<'a, F>(
    p: SendPtr<F>,
    dim: (usize, usize),
    strides: (isize, isize),
) -> ArrayViewMut2<'a, F> {
    // SAFETY: forwarded from this function's contract; ndarray takes strides in elements.
    unsafe { ArrayViewMut2::from_shape_ptr(dim.strides((strides.0 as usize, strides.1 as usize)), p.0) }
}

/// The crate's packed kernels ([`packed`]) when the element type is `f32` and the CPU has a
/// vector [`Isa`]; `false` when the caller must fall back to `matrixmultiply`. `a_sums` (m
/// floats, for the bf16 vector kernels only: [`gemm_weight_grad`]) takes A's row sums.
#[allow(clippy::too_many_arguments)]
fn packed_f32<F: Float>(
    alpha: F,
    a: ArrayView2<F>,
    b: ArrayView2<F>,
    beta: F,
    mut c: ArrayViewMut2<F>,
    parts: usize,
    post: Fused<'_, F>,
    a_sums: Option<*mut f32>,
) -> bool {
    if TypeId::of::<F>() != TypeId::of::<f32>() {
        return false;
    }
    let bf16 = bf16_applies::<F>();
    let isa = match Isa::best() {
        Some(isa) => isa,
        None if bf16 => Isa::Scalar,
        None => return false,
    };
    let (m, k) = a.dim();
    let n = b.ncols();
    // F is f32 (checked above), so these casts change nothing but the type.
    let mat = |v: &ArrayView2<F>| Mat {
        ptr: v.as_ptr() as *const f32,
        rs: v.strides()[0],
        cs: v.strides()[1],
    };
    let (ma, mb) = (mat(&a), mat(&b));
    let mc = MatMut {
        ptr: c.as_mut_ptr() as *mut f32,
        rs: c.strides()[0],
        cs: c.strides()[1],
    };
    let ep = Epilogue {
        bias: post.bias.map(|b| b.as_ptr() as *const f32),
        relu: post.relu,
        dropout: post.dropout,
        gate: post.gate.map(|(g, s)| {
            (
                g.as_ptr() as *const f32,
                g.strides()[0],
                g.strides()[1],
                s.to_f64() as f32,
            )
        }),
        a_sums,
    };
    let (alpha, beta) = (alpha.to_f64() as f32, beta.to_f64() as f32);
    // SAFETY: each view addresses exactly its own elements (ndarray's invariant, for negative
    // strides too), C is borrowed mutably and so aliases neither A nor B, the shapes were
    // checked by the callers, the bias is contiguous with n elements, the gate has C's shape,
    // `best` checked the CPU, and `Bf16Path::best` runs in this process.
    unsafe {
        if bf16 {
            bf16::gemm(
                bf16::Bf16Path::best(),
                m,
                k,
                n,
                alpha,
                ma,
                mb,
                beta,
                mc,
                parts,
                ep,
            )
        } else {
            packed::gemm(isa, m, k, n, alpha, ma, mb, beta, mc, parts, ep)
        }
    };
    true
}

/// `C ← α·A·B + β·C` in `f32` by the kernels of `isa`, on up to `parts` threads: every path of
/// [`gemm`] on its own, for tests and benchmarks.
///
/// # Panics
/// If the shapes do not chain, or the CPU does not run `isa`.
pub fn gemm_f32_with(
    isa: Isa,
    alpha: f32,
    a: ArrayView2<f32>,
    b: ArrayView2<f32>,
    beta: f32,
    mut c: ArrayViewMut2<f32>,
    parts: usize,
) {
    check_shapes(a.dim(), b.dim(), c.dim());
    assert!(
        Isa::available().contains(&isa),
        "gemm: this CPU does not run {isa:?}"
    );
    let (m, k) = a.dim();
    let n = b.ncols();
    let (ma, mb, mc) = (Mat::of(&a), Mat::of(&b), MatMut::of(&mut c));
    // SAFETY: the views address their own elements, C is exclusive, the shapes chain and the
    // CPU runs `isa` (both checked above).
    unsafe { packed::gemm(isa, m, k, n, alpha, ma, mb, beta, mc, parts, Epilogue::default()) };
}

/// `C[i] ← α·A[i]·B[i] + β·C[i]` for every index i of the leading axis, in parallel over i.
///
/// Each product runs whole on one thread, so the result does not depend on the thread
/// count.
///
/// # Panics
/// If the batch sizes differ or the shapes of one product do not chain.
pub fn gemm_batched<F: Float>(
    alpha: F,
    a: ArrayView3<F>,
    b: ArrayView3<F>,
    beta: F,
    mut c: ArrayViewMut3<F>,
) {
    assert!(
        a.len_of(Axis(0)) == b.len_of(Axis(0)) && a.len_of(Axis(0)) == c.len_of(Axis(0)),
        "gemm_batched: batch sizes differ: A {:?}, B {:?}, C {:?}",
        a.shape(),
        b.shape(),
        c.shape()
    );
    let (_, m, k) = a.dim();
    check_shapes((m, k), (b.dim().1, b.dim().2), (c.dim().1, c.dim().2));
    let precision = super::precision::precision();
    Zip::from(c.axis_iter_mut(Axis(0)))
        .and(a.axis_iter(Axis(0)))
        .and(b.axis_iter(Axis(0)))
        .par_for_each(|c, a, b| with_precision(precision, || gemm_serial(alpha, a, b, beta, c)));
}

/// Rows (or columns) per piece: `len` cut into about `parts` pieces, a multiple of 16 (the
/// widest micro-kernel), none smaller than [`MIN_SPLIT`].
fn chunk_len(len: usize, parts: usize) -> usize {
    len.div_ceil(parts).next_multiple_of(16).max(MIN_SPLIT)
}

fn check_shapes(a: (usize, usize), b: (usize, usize), c: (usize, usize)) {
    assert!(
        a.1 == b.0 && c == (a.0, b.1),
        "gemm: shapes do not chain: A {:?} · B {:?} into C {:?} (expected C {:?})",
        [a.0, a.1],
        [b.0, b.1],
        [c.0, c.1],
        [a.0, b.1]
    );
}

/// One product on the calling thread: the packed kernels, or `matrixmultiply`.
fn gemm_serial<F: Float>(alpha: F, a: ArrayView2<F>, b: ArrayView2<F>, beta: F, mut c: ArrayViewMut2<F>) {
    if packed_f32(alpha, a, b, beta, c.view_mut(), 1, Fused::none(), None) {
        return;
    }
    let (m, k) = a.dim();
    let n = b.ncols();
    debug_assert_eq!(b.nrows(), k);
    debug_assert_eq!(c.dim(), (m, n));
    let [rsa, csa] = [a.strides()[0], a.strides()[1]];
    let [rsb, csb] = [b.strides()[0], b.strides()[1]];
    let [rsc, csc] = [c.strides()[0], c.strides()[1]];
    // SAFETY: each view's pointer and strides address exactly its own elements, all inside
    // the allocation the view borrows (ndarray's invariant, for negative strides too, since
    // `as_ptr` is the element [0, 0]). `c` is borrowed mutably while `a` and `b` are borrowed
    // shared, so C cannot alias A or B, and a mutable view never maps two indices to one
    // address. The dimensions were checked above. matrixmultiply reads C only when β ≠ 0.
    unsafe {
        F::gemm_raw(
            m,
            k,
            n,
            alpha,
            a.as_ptr(),
            rsa,
            csa,
            b.as_ptr(),
            rsb,
            csb,
            beta,
            c.as_mut_ptr(),
            rsc,
            csc,
        );
    }
}

/// The naive twin of [`gemm`]: three loops, accumulating in `f64`. For tests.
pub fn gemm_naive<F: Float>(alpha: F, a: ArrayView2<F>, b: ArrayView2<F>, beta: F, mut c: ArrayViewMut2<F>) {
    check_shapes(a.dim(), b.dim(), c.dim());
    for i in 0..a.nrows() {
        for j in 0..b.ncols() {
            let mut acc = 0.0;
            for p in 0..a.ncols() {
                acc += a[[i, p]].to_f64() * b[[p, j]].to_f64();
            }
            let prev = if beta == F::ZERO {
                0.0
            } else {
                beta.to_f64() * c[[i, j]].to_f64()
            };
            c[[i, j]] = F::from_f64(alpha.to_f64() * acc + prev);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array1, Array2, Array3, s};
    use rand::{Rng, SeedableRng, rngs::StdRng};

    /// Small integers, so that every product and sum is exact in f32 and the fast and naive
    /// results must agree bit for bit.
    fn int_matrix(rng: &mut StdRng, r: usize, c: usize) -> Array2<f32> {
        Array2::from_shape_fn((r, c), |_| rng.random_range(-4..=4) as f32)
    }

    /// Packed operands kept for many products start on a 64-byte boundary, clones too (an
    /// AMX tile row or a vector load across two cache lines is slow).
    #[test]
    fn packed_b_is_cache_line_aligned() {
        fn aligned(p: &PackedB) -> bool {
            let ptr = match &p.data {
                Packing::F32 { data, .. } => data.as_ptr() as usize,
                Packing::Bf16 { data, .. } | Packing::Rounded { data, .. } => data.as_ptr() as usize,
            };
            ptr % 64 == 0
        }
        for (k, n) in [(3, 5), (64, 100), (512, 300)] {
            let b = Array2::from_shape_fn((k, n), |(i, j)| (i * n + j) as f32);
            for precision in [Precision::F32, Precision::Bf16] {
                let Some(p) = with_precision(precision, || PackedB::new(b.view())) else {
                    return; // nothing packs on this CPU
                };
                assert!(aligned(&p), "{k}×{n} {precision:?}");
                assert!(aligned(&p.clone()), "{k}×{n} {precision:?} clone");
            }
        }
        for len in [0, 1, 7, 1000] {
            let a = packed::Aligned::<u16>::zeroed(len);
            assert_eq!((a.len(), a.as_ptr() as usize % 64), (len, 0));
            assert_eq!(a.clone().as_ptr() as usize % 64, 0);
        }
    }

    #[test]
    fn matches_naive_at_odd_sizes_and_layouts() {
        let mut rng = StdRng::seed_from_u64(1);
        for &(m, k, n) in &[
            (1, 1, 1),
            (3, 5, 7),
            (17, 33, 9),
            (65, 17, 130),
            (129, 64, 3),
            (0, 4, 3),
            (3, 0, 4),
        ] {
            let a = int_matrix(&mut rng, m, k);
            let at = a.t().as_standard_layout().into_owned(); // [k, m] so that at.t() is A by strides
            let b = int_matrix(&mut rng, k, n);
            let bt = b.t().as_standard_layout().into_owned();
            let mut want = Array2::<f32>::from_elem((m, n), f32::NAN);
            gemm_naive(1.0, a.view(), b.view(), 0.0, want.view_mut());
            for (a_view, b_view) in [
                (a.view(), b.view()),
                (at.t(), b.view()),
                (a.view(), bt.t()),
                (at.t(), bt.t()),
            ] {
                // Output pre-filled with NaN: with β = 0 none of it may survive.
                let mut got = Array2::<f32>::from_elem((m, n), f32::NAN);
                gemm(1.0, a_view, b_view, 0.0, got.view_mut());
                assert_eq!(got, want, "m={m} k={k} n={n}");
                // Column-major output.
                let mut got_f = Array2::<f32>::from_elem((n, m), f32::NAN);
                gemm(1.0, a_view, b_view, 0.0, got_f.view_mut().reversed_axes());
                assert_eq!(got_f.t(), want, "column-major C, m={m} k={k} n={n}");
            }
        }
    }

    /// Every kernel family of this CPU against the naive twin, exactly (small integers), at
    /// sizes that cross the tile, panel-block and k-block edges, with every operand layout,
    /// β = 0 over NaN and β ≠ 0, on 1, 2 and 3 threads.
    #[test]
    fn every_kernel_path_matches_naive() {
        let mut rng = StdRng::seed_from_u64(7);
        for isa in Isa::available() {
            for &(m, k, n) in &[
                (1, 1, 1),
                (5, 3, 17),
                (13, 31, 33),
                (25, KC + 1, 40),
                (12 * 16 + 7, 2 * KC + 3, 65),
                // Past one block of A (at most 64 panels of 8 rows or 42 of 12 on a 2 MiB L2).
                (64 * 8 + 13, 40, 33),
                (200, 64, 7),
                (3, 100, 300),
                // A decoding step's rows, by spans of k over several blocks of k: up to 6 in
                // one pass, 7 and 8 as 6 over each panel then the rest over groups of panels
                // (of 6 and 3 panels, a short last group and panel); 10 in panels of equal
                // height (5 + 5) over one panel of B at a time.
                (8, 70, 48),
                (10, 33, 20),
                (8, 2 * KC + 3, 9 * 16 + 5),
                (7, KC + 5, 7 * 16 + 3),
                (7, 40, 16),
                (8, 40, 4 * 16 + 1),
                (6, 2 * KC + 3, 100),
                (3, KC + 7, 50),
                (2, 2 * KC + 3, 4 * 16 + 9),
                (1, KC + 5, 3 * 16),
            ] {
                let a = int_matrix(&mut rng, m, k);
                let at = a.t().as_standard_layout().into_owned();
                let b = int_matrix(&mut rng, k, n);
                let bt = b.t().as_standard_layout().into_owned();
                let c0 = int_matrix(&mut rng, m, n);
                for (alpha, beta) in [(1.0, 0.0), (2.0, -3.0), (1.0, 1.0)] {
                    let mut want = c0.clone();
                    gemm_naive(alpha, a.view(), b.view(), beta, want.view_mut());
                    for (a_view, b_view) in [(a.view(), b.view()), (at.t(), bt.t())] {
                        for parts in [1, 2, 3] {
                            let mut got = if beta == 0.0 {
                                Array2::from_elem((m, n), f32::NAN)
                            } else {
                                c0.clone()
                            };
                            gemm_f32_with(isa, alpha, a_view, b_view, beta, got.view_mut(), parts);
                            assert_eq!(
                                got, want,
                                "{isa:?} m={m} k={k} n={n} alpha={alpha} beta={beta} parts={parts}"
                            );
                            // Column-major C.
                            let mut got_f = Array2::<f32>::from_elem((n, m), f32::NAN);
                            got_f.view_mut().reversed_axes().assign(&c0);
                            if beta == 0.0 {
                                got_f.fill(f32::NAN);
                            }
                            gemm_f32_with(
                                isa,
                                alpha,
                                a_view,
                                b_view,
                                beta,
                                got_f.view_mut().reversed_axes(),
                                parts,
                            );
                            assert_eq!(got_f.t(), want, "{isa:?} column-major C m={m} k={k} n={n}");
                        }
                    }
                }
            }
        }
    }

    /// The vector kernels round exactly as their scalar twin (same products, same order, same
    /// fused updates), on values where the order matters, at any thread count: with AVX-512's
    /// short tiles (64 rows) and tall ones (77 rows, edge rows included), several blocks of
    /// panels of B (300 columns), several blocks of A (520 rows) and a decoding step's few rows
    /// (11, which pass over one panel of B at a time; 8, 7, 5 and 2, by spans of k, the rows
    /// after the sixth over several panels at once, 2 rows over groups of panels).
    #[test]
    fn kernel_paths_agree_bit_for_bit_with_the_scalar_twin() {
        assert_eq!((Isa::Avx512.tile_rows(64), Isa::Avx512.tile_rows(77)), (8, 12));
        let mut rng = StdRng::seed_from_u64(8);
        for (m, k, n) in [
            (64, 2 * KC + 9, 70),
            (77, 2 * KC + 9, 300),
            (520, KC + 9, 40),
            (11, 2 * KC + 9, 300),
            (8, 2 * KC + 9, 300),
            (7, KC + 9, 300),
            (5, 2 * KC + 9, 300),
            (2, 2 * KC + 9, 300),
        ] {
            let a = Array2::from_shape_fn((m, k), |_| rng.random::<f32>() - 0.5);
            let b = Array2::from_shape_fn((k, n), |_| rng.random::<f32>() - 0.5);
            let c0 = Array2::from_shape_fn((m, n), |_| rng.random::<f32>() - 0.5);
            let run = |isa: Isa, parts: usize| {
                let mut c = c0.clone();
                gemm_f32_with(isa, 0.7, a.view(), b.view(), 1.3, c.view_mut(), parts);
                c
            };
            let want = run(Isa::Scalar, 1);
            for isa in Isa::available() {
                for parts in [1, 2] {
                    let got = run(isa, parts);
                    assert!(
                        got.iter()
                            .zip(want.iter())
                            .all(|(x, y)| x.to_bits() == y.to_bits()),
                        "{isa:?} parts={parts} m={m} k={k} n={n}"
                    );
                }
            }
        }
    }

    /// Products with B packed beforehand (alone or side by side with others), with a bias and
    /// a ReLU, against the naive twin, on 1 and 2 threads; a decoding step's few rows over a
    /// large B too, whose later row panels ask for the next block of B (across a block of k).
    #[test]
    fn prepacked_products_match_naive_with_bias_and_relu() {
        let mut rng = StdRng::seed_from_u64(9);
        for &(m, k, n) in &[
            (1, 7, 5),
            (8, 64, 96),
            (33, KC + 5, 70),
            (40, KC + 5, 300),
            (16, 256, 1000),
            (7, KC + 5, 300),
            (1, 256, 300),
        ] {
            let a = int_matrix(&mut rng, m, k);
            let w1 = int_matrix(&mut rng, n, k); // [out, in], used as W1ᵀ
            let w2 = int_matrix(&mut rng, 3, k);
            let bias = int_matrix(&mut rng, 1, n + 3).row(0).to_owned();
            let Some(packed) = PackedB::concat(&[w1.t(), w2.t()]) else {
                return; // nothing packs on this CPU
            };
            assert_eq!(packed.dim(), (k, n + 3));
            let both = ndarray::concatenate(Axis(0), &[w1.view(), w2.view()]).unwrap();
            let mut want = Array2::<f32>::zeros((m, n + 3));
            gemm_naive(1.0, a.view(), both.t(), 0.0, want.view_mut());
            want += &bias;
            let want_relu = want.mapv(|v| v.max(0.0));
            for threads in [1, 2] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                for relu in [false, true] {
                    let mut got = Array2::from_elem((m, n + 3), f32::NAN);
                    pool.install(|| gemm_packed(a.view(), &packed, Some(bias.view()), relu, got.view_mut()));
                    assert_eq!(
                        got,
                        if relu { want_relu.clone() } else { want.clone() },
                        "m={m} k={k} n={n}"
                    );
                }
            }
        }
    }

    /// Products with weights taken as streaming from memory ([`with_streamed_weights`]: rows
    /// of up to 96 over one panel of B at a time rather than over blocks) cover every tile
    /// (exact integers against the naive product) and give the same bits as those without
    /// (random values, whose sums would show another order), `f32` and bf16 weights, 1 and 2
    /// threads, with a bias and a ReLU, past a block of k and an edge panel.
    #[test]
    fn products_of_streamed_weights_match_naive_and_keep_their_bits() {
        use crate::kernels::precision::{Precision, with_precision};
        let mut rng = StdRng::seed_from_u64(30);
        for &(m, k, n) in &[
            (9, 40, 50),
            (13, KC + 5, 70),
            (16, 64, 300),
            (31, 200, 33),
            (96, 70, 40),
            (97, 30, 20),
        ] {
            for precision in [Precision::F32, Precision::Bf16] {
                let exact = int_matrix(&mut rng, m, k);
                let a = Array2::from_shape_fn((m, k), |_| rng.random_range(-1.0f32..1.0));
                let w = Array2::from_shape_fn((n, k), |_| rng.random_range(-1.0f32..1.0));
                let w_exact = int_matrix(&mut rng, n, k);
                let bias = Array2::from_shape_fn((1, n), |_| rng.random_range(-1.0f32..1.0))
                    .row(0)
                    .to_owned();
                let (Some(packed), Some(packed_exact)) =
                    with_precision(precision, || (PackedB::new(w.t()), PackedB::new(w_exact.t())))
                else {
                    return; // nothing packs on this CPU
                };
                let mut want = Array2::<f32>::zeros((m, n));
                gemm_naive(1.0, exact.view(), w_exact.t(), 0.0, want.view_mut());
                for threads in [1, 2] {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    let run = |streamed: bool, a: &Array2<f32>, w: &PackedB, bias: Option<&Array1<f32>>| {
                        let mut got = Array2::from_elem((m, n), f32::NAN);
                        pool.install(|| {
                            with_streamed_weights(streamed, || {
                                gemm_packed(
                                    a.view(),
                                    w,
                                    bias.map(|b| b.view()),
                                    bias.is_some(),
                                    got.view_mut(),
                                )
                            })
                        });
                        got
                    };
                    let what = format!("m={m} k={k} n={n} {precision:?} threads={threads}");
                    assert_eq!(run(true, &exact, &packed_exact, None), want, "{what}");
                    let streamed = run(true, &a, &packed, Some(&bias));
                    let kept = run(false, &a, &packed, Some(&bias));
                    let bits = |x: &Array2<f32>| x.mapv(f32::to_bits);
                    assert_eq!(bits(&streamed), bits(&kept), "{what}");
                }
            }
        }
    }

    /// Weights packed for the emulated bf16 path are stored as bf16 bits and widened as the
    /// products read them: the same bits as the `f32` products of the rounded operands with
    /// the rounded weights packed as `f32`, at decoding steps' few rows (one panel of B at a
    /// time) and at many, A by rows and by columns, with k past a block, edge panels, a bias
    /// and a ReLU, on 1 and 2 threads.
    #[test]
    fn weights_packed_as_bf16_bits_give_the_f32_products_of_the_rounded_values() {
        use super::bf16::{Bf16Path, round_bf16};
        let mut rng = StdRng::seed_from_u64(12);
        for &(m, k, n) in &[
            (8, 64, 40),
            (8, KC + 37, 100),
            (3, 200, 100),
            (5, 64, 70),
            (7, KC + 37, 100),
            (10, KC + 37, 70),
            (32, 96, 100),
            (70, 2 * KC + 5, 33),
        ] {
            let a = Array2::from_shape_fn((m, k), |_| rng.random_range(-1.0f32..1.0));
            let w = Array2::from_shape_fn((n, k), |_| rng.random_range(-1.0f32..1.0)); // [out, in]
            let bias = Array2::from_shape_fn((1, n), |_| rng.random_range(-1.0f32..1.0))
                .row(0)
                .to_owned();
            let bits = with_precision(Precision::Bf16, || PackedB::on(w.t(), Bf16Path::Emulated))
                .expect("a bf16 B always packs");
            assert!(matches!(bits.data, Packing::Rounded { .. }));
            let Some(values) = PackedB::new(w.mapv(round_bf16).t()) else {
                return; // no vector kernels: f32 weights are not packed here
            };
            let a_rounded = a.mapv(round_bf16);
            for threads in [1, 2] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                // A by rows (read in place by the AVX2 kernel, with the bits) and by columns
                // (packed, with B widened a block at a time).
                let a_by_columns = a.t().as_standard_layout().into_owned();
                for a in [a.view(), a_by_columns.t()] {
                    for (bias, relu) in [(None, false), (Some(bias.view()), true)] {
                        let mut got = Array2::from_elem((m, n), f32::NAN);
                        let mut want = Array2::from_elem((m, n), f32::NAN);
                        pool.install(|| {
                            gemm_packed(a, &bits, bias, relu, got.view_mut());
                            gemm_packed(a_rounded.view(), &values, bias, relu, want.view_mut());
                        });
                        let bits_of = |x: &Array2<f32>| x.mapv(f32::to_bits);
                        assert_eq!(
                            bits_of(&got),
                            bits_of(&want),
                            "{m}×{k}×{n}, A strides {:?}, {threads} threads, relu {relu}",
                            a.strides()
                        );
                    }
                }
            }
        }
    }

    /// The fused stores (bias, ReLU, dropout by key, gate) of the vector kernels against the
    /// same arithmetic written out, bit for bit, at sizes with edge tiles, on 1 and 2 threads.
    #[test]
    fn fused_stores_match_the_written_out_arithmetic() {
        let mut rng = StdRng::seed_from_u64(10);
        for &(m, k, n) in &[
            (5, 7, 9),
            (37, KC + 3, 70),
            (64, 40, 64),
            (8, KC + 3, 70),
            (7, 40, 100),
        ] {
            let a = int_matrix(&mut rng, m, k);
            let b = int_matrix(&mut rng, k, n);
            let bias = int_matrix(&mut rng, 1, n).row(0).to_owned();
            let gate = int_matrix(&mut rng, m, n);
            let key = DropKey::draw(0.3, &mut rng);
            let mut prod = Array2::<f32>::zeros((m, n));
            gemm_naive(1.0, a.view(), b.view(), 0.0, prod.view_mut());
            let forward = Array2::from_shape_fn((m, n), |(i, j)| {
                let v = (prod[[i, j]] + bias[j]).max(0.0);
                v * key.factor::<f32>(i * n + j)
            });
            let backward = Array2::from_shape_fn((m, n), |(i, j)| {
                if gate[[i, j]] > 0.0 {
                    prod[[i, j]] * 1.25
                } else {
                    0.0
                }
            });
            for threads in [1, 2] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut got = Array2::from_elem((m, n), f32::NAN);
                let post = Fused {
                    bias: Some(bias.view()),
                    relu: true,
                    dropout: Some(key),
                    gate: None,
                };
                pool.install(|| gemm_fused(a.view(), b.view(), post, got.view_mut()));
                assert_eq!(got, forward, "forward m={m} k={k} n={n} threads={threads}");
                let post = Fused {
                    gate: Some((gate.view(), 1.25)),
                    ..Fused::none()
                };
                pool.install(|| gemm_fused(a.view(), b.view(), post, got.view_mut()));
                assert_eq!(got, backward, "backward m={m} k={k} n={n} threads={threads}");
            }
            // Every kernel path the CPU has, called directly (`gemm_fused` takes the best, or
            // the small products' path): whole tiles and edge tiles with each tail.
            for isa in Isa::available() {
                let mat = |x: &Array2<f32>| Mat {
                    ptr: x.as_ptr(),
                    rs: x.strides()[0],
                    cs: 1,
                };
                let tails = [
                    (
                        Epilogue {
                            bias: Some(bias.as_ptr()),
                            relu: true,
                            dropout: Some(key),
                            ..Epilogue::default()
                        },
                        &forward,
                    ),
                    (
                        Epilogue {
                            gate: Some((gate.as_ptr(), n as isize, 1, 1.25)),
                            ..Epilogue::default()
                        },
                        &backward,
                    ),
                ];
                for (ep, want) in tails {
                    let mut got = Array2::from_elem((m, n), f32::NAN);
                    let mc = MatMut {
                        ptr: got.as_mut_ptr(),
                        rs: n as isize,
                        cs: 1,
                    };
                    // SAFETY: the matrices address their own elements (A m × k, B k × n, C and
                    // the gate m × n, the bias n); the CPU runs isa.
                    unsafe { packed::gemm(isa, m, k, n, 1.0, mat(&a), mat(&b), 0.0, mc, 1, ep) };
                    assert_eq!(&got, want, "{isa:?} m={m} k={k} n={n} gate {}", ep.gate.is_some());
                }
            }
        }
    }

    /// The ReLU of every kernel's stores keeps NaN (as PyTorch's ReLU), gives 0 for negatives
    /// and −0, and keeps positives: on full and edge tiles.
    #[test]
    fn relu_stores_keep_nan_on_every_path() {
        let values = [f32::NAN, -1.0, 2.0, -0.0, 0.5, f32::NEG_INFINITY, f32::INFINITY];
        for isa in Isa::available() {
            for n in [5, 16, 40] {
                // C[i][j] = values[i % 7]·1 + 0·1.
                let m = 9;
                let a = Array2::from_shape_fn((m, 2), |(i, k)| if k == 0 { values[i % 7] } else { 0.0 });
                let b = Array2::<f32>::ones((2, n));
                let mut c = Array2::from_elem((m, n), 7.0f32);
                let (ma, mb) = (
                    Mat {
                        ptr: a.as_ptr(),
                        rs: 2,
                        cs: 1,
                    },
                    Mat {
                        ptr: b.as_ptr(),
                        rs: n as isize,
                        cs: 1,
                    },
                );
                let mc = MatMut {
                    ptr: c.as_mut_ptr(),
                    rs: n as isize,
                    cs: 1,
                };
                let ep = Epilogue {
                    relu: true,
                    ..Epilogue::default()
                };
                // SAFETY: the matrices address their own elements; the CPU runs isa.
                unsafe { packed::gemm(isa, m, 2, n, 1.0, ma, mb, 0.0, mc, 1, ep) };
                for ((i, j), &got) in c.indexed_iter() {
                    let want = Activation::Relu.apply(values[i % 7] + 0.0);
                    assert!(
                        got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                        "{isa:?} n={n} ({i}, {j}): relu({}) gave {got}",
                        values[i % 7]
                    );
                }
                assert!(c.row(0).iter().all(|v| v.is_nan()), "{isa:?}: NaN lost");
            }
        }
    }

    #[test]
    fn alpha_beta_and_strided_output() {
        let mut rng = StdRng::seed_from_u64(2);
        let (m, k, n) = (37, 21, 45);
        let a = int_matrix(&mut rng, m, 2 * k);
        let b = int_matrix(&mut rng, k, n);
        let c0 = int_matrix(&mut rng, 2 * m, 3 * n);
        // A as every other column, C as every other row and every third column.
        let a_view = a.slice(s![.., ..;2]);
        let mut got = c0.clone();
        gemm(2.0, a_view, b.view(), -3.0, got.slice_mut(s![..;2, ..;3]));
        let mut want = c0.clone();
        gemm_naive(2.0, a_view, b.view(), -3.0, want.slice_mut(s![..;2, ..;3]));
        assert_eq!(got, want);
        // Elements outside the strided view are untouched.
        assert_eq!(got.slice(s![1..;2, ..]), c0.slice(s![1..;2, ..]));
    }

    #[test]
    fn negative_strides() {
        let mut rng = StdRng::seed_from_u64(3);
        let a = int_matrix(&mut rng, 19, 23);
        let b = int_matrix(&mut rng, 23, 11);
        let a_rev = a.slice(s![..;-1, ..]);
        let mut got = Array2::<f32>::from_elem((19, 11), f32::NAN);
        gemm(1.0, a_rev, b.slice(s![.., ..;-1]), 0.0, got.view_mut());
        let mut want = Array2::<f32>::zeros((19, 11));
        gemm_naive(1.0, a_rev, b.slice(s![.., ..;-1]), 0.0, want.view_mut());
        assert_eq!(got, want);
    }

    #[test]
    fn weight_gradients_take_the_bias_sums_with_the_same_bits() {
        // grad_yᵀ with rows past the last group of 16 (d_out 37 and 300) and terms past a
        // whole chunk of 32 and across a block of KC (1100 tokens); two threads cut the
        // product by rows (300 rows) or by columns (bf16: 37 rows, 1500 columns; `f32`: 20
        // rows).
        let mut rng = StdRng::seed_from_u64(9);
        for &(tokens, d_in, d_out) in &[(1100, 40, 300), (70, 1500, 37), (70, 1500, 20), (64, 64, 32)] {
            let mut rand = |r, c| Array2::from_shape_fn((r, c), |_| rng.random::<f32>() - 0.5);
            let (gy, x, gw0) = (rand(tokens, d_out), rand(tokens, d_in), rand(d_out, d_in));
            let gb0 = rand(1, d_out).into_shape_with_order(d_out).unwrap();
            let mut want_b = gb0.clone();
            crate::kernels::add_column_sums(gy.view(), want_b.view_mut());
            for precision in [Precision::F32, Precision::Bf16] {
                for threads in [1, 2] {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    let (mut gw, mut gb, mut want_w) = (gw0.clone(), gb0.clone(), gw0.clone());
                    pool.install(|| {
                        with_precision(precision, || {
                            gemm_weight_grad(gy.view(), x.view(), gw.view_mut(), Some(gb.view_mut()));
                            gemm(1.0, gy.t(), x.view(), 1.0, want_w.view_mut());
                        })
                    });
                    let at = format!("{precision:?}, {threads} threads, {tokens} × {d_in} → {d_out}");
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(gw.as_slice().unwrap()),
                        bits(want_w.as_slice().unwrap()),
                        "{at}"
                    );
                    assert_eq!(
                        bits(gb.as_slice().unwrap()),
                        bits(want_b.as_slice().unwrap()),
                        "{at}"
                    );
                }
            }
        }
        let in_packing = with_precision(Precision::Bf16, bias_sums_in_packing::<f32>);
        eprintln!(
            "bf16 path {:?}: bias sums in packing {in_packing}",
            bf16::Bf16Path::best()
        );
    }

    /// The pieces of a product cut by rows cover every row once, with or without a share's last
    /// block apart, and the pieces take as many blocks of A (passes over B) as the shares
    /// whole would: a share's first blocks, then its last.
    #[test]
    fn tile_runs_cover_every_row_once_in_whole_blocks() {
        let blocks =
            |rows: &std::ops::Range<usize>, mr: usize, bp: usize| rows.len().div_ceil(mr).div_ceil(bp);
        for (m, mr, block_panels) in [
            (1024, 6, 42),
            (512, 6, 42),
            (525, 8, 64),
            (100, 6, 4),
            (37, 6, 2),
            (6, 6, 1),
        ] {
            for parts in [2, 3, 4] {
                for even in [false, true] {
                    for bp in [0, block_panels] {
                        let got = std::sync::Mutex::new(Vec::new());
                        packed::for_tile_runs(parts, m, mr, 2, even, bp, |rows, panels| {
                            assert_eq!(panels, 0..2);
                            got.lock().unwrap().push(rows);
                        });
                        let mut got = got.into_inner().unwrap();
                        got.sort_by_key(|r| r.start);
                        let at = format!("m={m} mr={mr} parts={parts} even={even} block panels={bp}");
                        let mut next = 0;
                        for r in &got {
                            assert!(r.start == next && !r.is_empty(), "{at}: {got:?}");
                            next = r.end;
                        }
                        assert_eq!(next, m, "{at}: {got:?}");
                        if bp > 0 {
                            let whole = std::sync::Mutex::new(Vec::new());
                            packed::for_tile_runs(parts, m, mr, 2, even, 0, |rows, _| {
                                whole.lock().unwrap().push(rows)
                            });
                            let passes = |runs: &[std::ops::Range<usize>]| {
                                runs.iter().map(|r| blocks(r, mr, bp)).sum::<usize>()
                            };
                            assert_eq!(
                                passes(&got),
                                passes(&whole.into_inner().unwrap()),
                                "{at}: {got:?}"
                            );
                        }
                    }
                }
            }
        }
        // Two threads, 1024 rows in blocks of 42 panels of 6: each share of 512 rows (86
        // panels, three blocks of 29 and 28) as 348 + 164 rows.
        let got = std::sync::Mutex::new(Vec::new());
        packed::for_tile_runs(2, 1024, 6, 2, true, 42, |rows, _| got.lock().unwrap().push(rows));
        let mut got = got.into_inner().unwrap();
        got.sort_by_key(|r| r.start);
        assert_eq!(got, [0..348, 348..512, 512..860, 860..1024]);
        // Taken from the front, share 0's first blocks then its last; from the back, share 1's
        // first blocks then its last.
        let order: Vec<_> = (0..4).map(packed::share_pieces).collect();
        assert_eq!(order, [(0, false), (0, true), (1, true), (1, false)]);
    }

    /// A's rows read in place by the vector kernels (products over a few panels of B) give the
    /// bits of A packed (its columns contiguous) and the exact products of small integers:
    /// every count of rows a pass can take (1 to 12, and runs of them), k within a block and
    /// past one, edge panels, a B of ten panels (which AVX-512 passes over with A's rows in
    /// place only when they are fewer than a tile, `DIRECT_ROWS_BELOW`), B packed per call
    /// and packed beforehand, on 1 and 2 threads; rows 4 KiB apart (packed instead) too.
    #[test]
    fn rows_of_a_read_in_place_give_the_bits_of_a_packed() {
        let mut rng = StdRng::seed_from_u64(13);
        let pools: Vec<_> = [1, 2]
            .map(|t| rayon::ThreadPoolBuilder::new().num_threads(t).build().unwrap())
            .into();
        for m in (1..=13).chain([24, 25, 37, 100]) {
            for &(k, n) in &[(40, 33), (KC + 37, 70), (64, 256), (1024, 40), (100, 300)] {
                let a = int_matrix(&mut rng, m, k);
                let a_by_columns = a.t().as_standard_layout().into_owned();
                let b = int_matrix(&mut rng, k, n);
                let c0 = int_matrix(&mut rng, m, n);
                let mut want = c0.clone();
                gemm_naive(1.0, a.view(), b.view(), 0.5, want.view_mut());
                let packed_b = PackedB::new(b.view());
                for pool in &pools {
                    let mut got = [c0.clone(), c0.clone()];
                    let mut prepacked = [
                        Array2::from_elem((m, n), f32::NAN),
                        Array2::from_elem((m, n), f32::NAN),
                    ];
                    for (i, a) in [a.view(), a_by_columns.t()].into_iter().enumerate() {
                        pool.install(|| {
                            // β = 0.5 keeps the products off the few-row kernels.
                            gemm(1.0, a, b.view(), 0.5, got[i].view_mut());
                            if let Some(packed_b) = &packed_b {
                                gemm_packed(a, packed_b, None, false, prepacked[i].view_mut());
                            }
                        });
                    }
                    let name = format!("{m}×{k}×{n}, {} threads", pool.current_num_threads());
                    assert_eq!(got[0], want, "{name}: A by rows");
                    assert_eq!(got[1], want, "{name}: A by columns");
                    let bits = |x: &Array2<f32>| x.mapv(f32::to_bits);
                    assert_eq!(
                        bits(&prepacked[0]),
                        bits(&prepacked[1]),
                        "{name}: B packed beforehand"
                    );
                }
            }
        }
    }

    /// Two products side by side in a team of two (as a backward pass runs a weight gradient
    /// beside an input gradient), each offering its blocks of A to the thread done with the
    /// other, give the same bits as on one thread: A's rows read in place and A packed (its
    /// columns contiguous), over rows enough for several blocks on any L2.
    #[test]
    fn products_side_by_side_keep_their_bits() {
        let mut rng = StdRng::seed_from_u64(9);
        let (m, k, n) = (1100, 70, 40);
        let a = Array2::from_shape_fn((m, k), |_| rng.random::<f32>() - 0.5);
        let at = a.t().as_standard_layout().into_owned();
        let b = Array2::from_shape_fn((k, n), |_| rng.random::<f32>() - 0.5);
        let product = |a: ArrayView2<f32>| {
            let mut c = Array2::<f32>::zeros((m, n));
            gemm(1.0, a, b.view(), 0.0, c.view_mut());
            c
        };
        let (want_rows, want_cols) = (product(a.view()), product(at.t()));
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for _ in 0..3 {
            let (mut rows, mut cols) = (None, None);
            pool.install(|| {
                super::super::parallel::with_team(|| {
                    super::super::parallel::join(
                        || rows = Some(product(a.view())),
                        || cols = Some(product(at.t())),
                    )
                })
            });
            let same =
                |x: &Array2<f32>, y: &Array2<f32>| x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits());
            assert!(same(&rows.unwrap(), &want_rows), "A's rows in place");
            assert!(same(&cols.unwrap(), &want_cols), "A packed");
        }
    }

    #[test]
    fn large_products_split_across_threads_match_naive() {
        // Big enough to take the parallel row split (tall C) and column split (wide C).
        let mut rng = StdRng::seed_from_u64(4);
        for &(m, k, n) in &[(301, 67, 129), (40, 97, 1031)] {
            let a = int_matrix(&mut rng, m, k);
            let b = int_matrix(&mut rng, k, n);
            let mut want = Array2::<f32>::zeros((m, n));
            gemm_naive(1.0, a.view(), b.view(), 0.0, want.view_mut());
            for threads in [1, 2, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut got = Array2::<f32>::from_elem((m, n), f32::NAN);
                pool.install(|| gemm(1.0, a.view(), b.view(), 0.0, got.view_mut()));
                assert_eq!(got, want, "threads={threads} m={m} k={k} n={n}");
            }
        }
    }

    #[test]
    fn bitwise_identical_for_one_and_two_threads() {
        // Non-integer values: here the rounding order matters, and must not change.
        let mut rng = StdRng::seed_from_u64(5);
        let (m, k, n) = (257, 300, 190);
        let a = Array2::from_shape_fn((m, k), |_| rng.random::<f32>() - 0.5);
        let b = Array2::from_shape_fn((k, n), |_| rng.random::<f32>() - 0.5);
        let run = |threads: usize, b: ArrayView2<f32>| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut c = Array2::<f32>::zeros((m, b.ncols()));
            pool.install(|| gemm(1.0, a.view(), b, 0.0, c.view_mut()));
            c
        };
        let one = run(1, b.view());
        let two = run(2, b.view());
        assert!(
            one.iter()
                .zip(two.iter())
                .all(|(x, y)| x.to_bits() == y.to_bits())
        );
        let wide_b = Array2::from_shape_fn((k, 2000), |_| rng.random::<f32>() - 0.5);
        let a_short = a.slice(s![..40, ..]);
        let run_wide = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut c = Array2::<f32>::zeros((40, 2000));
            pool.install(|| gemm(1.0, a_short, wide_b.view(), 0.0, c.view_mut()));
            c
        };
        let (one, two) = (run_wide(1), run_wide(2));
        assert!(
            one.iter()
                .zip(two.iter())
                .all(|(x, y)| x.to_bits() == y.to_bits())
        );
    }

    #[test]
    fn batched_matches_naive_with_transposed_operand() {
        let mut rng = StdRng::seed_from_u64(6);
        let (batch, m, k, n) = (5, 7, 9, 6);
        let a = Array3::from_shape_fn((batch, m, k), |_| rng.random_range(-4..=4) as f64);
        let b_t = Array3::from_shape_fn((batch, n, k), |_| rng.random_range(-4..=4) as f64);
        let b = b_t.view().permuted_axes([0, 2, 1]); // [batch, k, n] by strides
        let mut got = Array3::<f64>::from_elem((batch, m, n), f64::NAN);
        gemm_batched(1.0, a.view(), b, 0.0, got.view_mut());
        for i in 0..batch {
            let mut want = Array2::<f64>::zeros((m, n));
            gemm_naive(
                1.0,
                a.index_axis(Axis(0), i),
                b.index_axis(Axis(0), i),
                0.0,
                want.view_mut(),
            );
            assert_eq!(got.index_axis(Axis(0), i), want);
        }
    }

    #[test]
    fn f64_uses_dgemm() {
        let a = ndarray::array![[1.0_f64 + 1e-12, 0.0], [0.0, 1.0]];
        let mut c = Array2::<f64>::zeros((2, 2));
        gemm(1.0, a.view(), a.view(), 0.0, c.view_mut());
        // In f32 the 1e-12 would be lost.
        assert!(c[[0, 0]] > 1.0);
    }

    #[test]
    #[should_panic(expected = "shapes do not chain")]
    fn mismatched_shapes_panic_with_both_shapes() {
        let a = Array2::<f32>::zeros((2, 3));
        let b = Array2::<f32>::zeros((4, 5));
        let mut c = Array2::<f32>::zeros((2, 5));
        gemm(1.0, a.view(), b.view(), 0.0, c.view_mut());
    }
}
