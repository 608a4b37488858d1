use ndarray::Array2;
use std::time::Instant;
fn main() {
    for &(m, k, n) in &[(1, 512, 512), (8, 512, 512), (8, 512, 8000), (16, 256, 1000), (16, 512, 2048), (4, 64, 64)] {
        let a = Array2::from_shape_fn((m, k), |(i, j)| ((i * 7 + j * 3) % 11) as f32 * 0.1);
        let w = Array2::from_shape_fn((n, k), |(i, j)| ((i * 5 + j) % 13) as f32 * 0.1);
        let a_cm = a.t().as_standard_layout().into_owned(); // [k, m] so a_cm.t() is column-major A: forces matrixmultiply
        let mut c = Array2::<f32>::zeros((m, n));
        let reps = (2e8 / (2.0 * (m * k * n) as f64)).max(10.0) as usize;
        let t = Instant::now();
        for _ in 0..reps { vaswani::kernels::gemm(1.0, a.view(), w.t(), 0.0, c.view_mut()); }
        let small = t.elapsed().as_secs_f64() / reps as f64;
        let t = Instant::now();
        for _ in 0..reps { vaswani::kernels::gemm(1.0, a_cm.t(), w.t(), 0.0, c.view_mut()); }
        let mm = t.elapsed().as_secs_f64() / reps as f64;
        let fl = 2.0 * (m * k * n) as f64;
        println!("m={m:3} k={k:4} n={n:5}: small {:8.1} µs ({:5.1} GFLOP/s)  matrixmultiply {:8.1} µs ({:5.1} GFLOP/s)", small * 1e6, fl / small / 1e9, mm * 1e6, fl / mm / 1e9);
    }
}
