//! A fixed-bucket latency histogram that lives in shared memory as plain
//! counters: the worker adds, any backend reads percentiles, no locks.
//!
//! Buckets are log-linear: 8 per power of two of microseconds, so a
//! reported percentile is within 1/8 (12.5 %) of the true value, from 1 µs
//! to about 2^(BUCKETS/8) µs; anything larger lands in the last bucket.

pub const BUCKETS: usize = 8 * 34; // up to ~2^34 µs ≈ 4.8 hours

/// The bucket a latency of `us` microseconds falls into.
pub fn bucket(us: u64) -> usize {
    if us < 8 {
        return us as usize;
    }
    let exp = 63 - us.leading_zeros() as usize; // floor(log2(us)) >= 3
    let frac = ((us >> (exp - 3)) & 7) as usize; // next 3 bits
    (8 * (exp - 2) + frac).min(BUCKETS - 1)
}

/// The largest latency a bucket holds (its upper bound, inclusive).
pub fn upper_bound(b: usize) -> u64 {
    if b < 8 {
        return b as u64;
    }
    let exp = b / 8 + 2;
    let frac = (b % 8) as u64;
    ((8 + frac + 1) << (exp - 3)) - 1
}

/// The `p`-quantile (0.0..=1.0) of the counts, as a bucket upper bound;
/// None when there is no sample.
pub fn quantile(counts: &[u64], p: f64) -> Option<u64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = ((p * total as f64).ceil() as u64).clamp(1, total);
    let mut seen = 0;
    for (b, &c) in counts.iter().enumerate() {
        seen += c;
        if seen >= rank {
            return Some(upper_bound(b));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_is_within_its_bucket_and_12_5_percent() {
        let mut prev = 0;
        for us in (0..100_000u64).chain([1 << 20, 123_456_789, 1 << 33]) {
            let b = bucket(us);
            assert!(b >= prev || us > 100_000);
            prev = b;
            assert!(us <= upper_bound(b), "{us} > upper bound of bucket {b}");
            if b > 0 {
                assert!(us > upper_bound(b - 1), "{us} belongs to an earlier bucket");
            }
            assert!((upper_bound(b) - us) as f64 <= us as f64 / 8.0 + 1.0, "{us}: bucket too wide");
        }
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn quantiles() {
        let mut counts = vec![0u64; BUCKETS];
        assert_eq!(quantile(&counts, 0.5), None);
        for us in 1..=1000u64 {
            counts[bucket(us * 10)] += 1; // 10 µs .. 10 ms, uniform
        }
        let p50 = quantile(&counts, 0.5).unwrap();
        let p99 = quantile(&counts, 0.99).unwrap();
        assert!((5000..=5000 + 5000 / 8).contains(&p50), "{p50}");
        assert!((9900..=9900 + 9900 / 8).contains(&p99), "{p99}");
        assert_eq!(quantile(&counts, 1.0).unwrap(), upper_bound(bucket(10_000)));
    }
}
