//! Cost of one reading in a window aggregate: exact decimal moments (readings like `21.37`,
//! integer `Σk`/`Σk²`) against the floating-point fallback (readings without a decimal form,
//! Welford), plus the decimal test alone. Reported as ns per reading and as the ratio of the
//! two paths measured in the same run.
//!
//! ```sh
//! cargo bench --bench aggregate
//! ```
//! Without `--bench` (as `cargo test --all-targets` runs it) it runs a few iterations and
//! checks only that both paths are taken.

use edgeferry::model::aggregate::{Aggregate, decimal_of};
use std::hint::black_box;
use std::time::Instant;

/// ns per reading of adding `values` to fresh 10-reading aggregates (a 10 s window at 1 Hz).
fn add_cost(values: &[f64], rounds: usize) -> (f64, Aggregate) {
    let started = Instant::now();
    let mut last = Aggregate::new();
    for _ in 0..rounds {
        for window in values.chunks(10) {
            let mut agg = Aggregate::new();
            for (i, &v) in window.iter().enumerate() {
                agg.add(black_box(v), i as i64 * 1000);
            }
            last = black_box(agg);
        }
    }
    let n = (rounds * values.len()) as f64;
    (started.elapsed().as_nanos() as f64 / n, last)
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let rounds = if full { 2_000 } else { 2 };
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    // 2-decimal temperatures and 6-decimal readings (what the ingest benchmark publishes).
    let two: Vec<f64> = (0..10_000)
        .map(|_| (2_000 + next() % 700) as f64 / 100.0)
        .collect();
    let six: Vec<f64> = (0..10_000)
        .map(|_| (20_000_000 + next() % 200_000) as f64 / 1e6)
        .collect();
    // No decimal form (mostly; one non-decimal reading switches the window to floating
    // point): the Welford path, over the same range as the 2-decimal readings so that the
    // sketches have the same number of bins.
    let thirds: Vec<f64> = (0..10_000)
        .map(|_| 20.0 + (next() % 2_100) as f64 / 300.0)
        .collect();

    let (two_ns, a) = add_cost(&two, rounds);
    assert!(a.is_exact());
    let (six_ns, a) = add_cost(&six, rounds);
    assert!(a.is_exact());
    let (float_ns, a) = add_cost(&thirds, rounds);
    assert!(!a.is_exact());
    let started = Instant::now();
    for _ in 0..rounds {
        for &v in &six {
            black_box(decimal_of(black_box(v)));
        }
    }
    let decimal_ns = started.elapsed().as_nanos() as f64 / (rounds * six.len()) as f64;

    println!("Aggregate::add, 10-reading windows, {rounds} × 10,000 readings per case\n");
    println!("| readings | path | ns per reading |");
    println!("|---|---|---|");
    println!("| 2 decimals (21.37) | exact | {two_ns:.1} |");
    println!("| 6 decimals (20.123456) | exact | {six_ns:.1} |");
    println!("| no decimal form (20 + j/300) | float (Welford) | {float_ns:.1} |");
    println!("| 6 decimals | `decimal_of` alone | {decimal_ns:.1} |");
    println!(
        "\nexact ÷ float, same run: {:.2} (2 decimals), {:.2} (6 decimals)",
        two_ns / float_ns,
        six_ns / float_ns
    );
}
