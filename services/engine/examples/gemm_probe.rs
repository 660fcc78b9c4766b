use ndarray::Array2;
use ndarray::linalg::general_mat_mul;
use std::time::Instant;
extern crate llorch_engine;
fn main() {
    let threads: usize = std::env::args().nth(1).map(|a| a.parse().unwrap()).unwrap_or(2);
    llorch_engine::threads::set_threads(threads);
    println!("openblas threads {}", llorch_engine::blas::threads());
    for (m, k, n) in
        [(256usize, 768usize, 2304usize), (256, 768, 3072), (256, 3072, 768), (1024, 1024, 1024)]
    {
        let a = Array2::<f32>::from_elem((m, k), 0.5);
        let b = Array2::<f32>::from_elem((k, n), 0.25);
        let mut c = Array2::<f32>::zeros((m, n));
        general_mat_mul(1.0, &a, &b, 0.0, &mut c);
        let reps = 10;
        let t = Instant::now();
        for _ in 0..reps {
            general_mat_mul(1.0, &a, &b, 0.0, &mut c);
        }
        let s = t.elapsed().as_secs_f64() / reps as f64;
        println!("{m}x{k}x{n}: {:.1} GFLOP/s", 2.0 * (m * k * n) as f64 / s / 1e9);
    }
}
