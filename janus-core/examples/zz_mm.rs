use burn::tensor::{Device, Distribution, Tensor};
use std::time::Instant;

fn bench(name: &str, f: impl Fn()) {
    f();
    let n = 3;
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    println!(
        "{name}: {:.2} ms",
        t.elapsed().as_secs_f64() * 1000.0 / n as f64 / 12.0
    );
}

fn main() {
    let dev = Device::flex();
    for (k, n) in [(2048usize, 5632usize), (5632, 2048), (2048, 2048)] {
        let ws: Vec<Tensor<2>> = (0..12)
            .map(|_| Tensor::random([n, k], Distribution::Default, &dev))
            .collect();
        println!("k={k} n={n}  (ms per weight)");
        for m in [8usize, 16, 39, 78, 128, 156, 256] {
            let x: Tensor<2> = Tensor::random([m, k], Distribution::Default, &dev);
            bench(&format!("m={m} W·Xt"), || {
                for w in &ws {
                    let _ = w
                        .clone()
                        .matmul(x.clone().transpose())
                        .transpose()
                        .reshape([1, m, n])
                        .into_data();
                }
            });
            bench(&format!("m={m} X·Wt"), || {
                for w in &ws {
                    let _ = x
                        .clone()
                        .matmul(w.clone().transpose())
                        .reshape([1, m, n])
                        .into_data();
                }
            });
        }
    }
}
