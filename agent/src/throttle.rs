//! A token bucket that caps the agent's send rate (`--limit-mbps`), shared by
//! all data streams of a session.

use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::Mutex;

/// Largest burst, in seconds of the rate.
const BURST_SECS: f64 = 0.05;

/// Caps bytes per second across every stream that shares it.
#[derive(Debug)]
pub struct Throttle {
    bytes_per_sec: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl Throttle {
    /// A bucket for `mbps` megabits (10^6 bits) per second; starts empty so
    /// that a transfer never runs ahead of the rate.
    pub fn new(mbps: u32) -> Self {
        let bytes_per_sec = f64::from(mbps.max(1)) * 1_000_000.0 / 8.0;
        let burst = (bytes_per_sec * BURST_SECS).max(64.0 * 1024.0);
        Self {
            bytes_per_sec,
            burst,
            state: Mutex::new((0.0, Instant::now())),
        }
    }

    /// Wait until `n` bytes may be sent.
    pub async fn take(&self, n: usize) {
        let wait = {
            let mut st = self.state.lock().await;
            let now = Instant::now();
            let refill = now.duration_since(st.1).as_secs_f64() * self.bytes_per_sec;
            st.0 = (st.0 + refill).min(self.burst);
            st.1 = now;
            st.0 -= n as f64;
            if st.0 >= 0.0 {
                return;
            }
            Duration::from_secs_f64(-st.0 / self.bytes_per_sec)
        };
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    //! On a paused clock (`start_paused`): time moves only when every task
    //! waits, by exactly what they wait for, so the pacing is checked to the
    //! millisecond without depending on the machine. How long a capped
    //! transfer takes on real hardware is a benchmark figure.
    use std::sync::Arc;

    use super::*;

    /// Seconds since `start`, on the paused clock.
    fn since(start: Instant) -> f64 {
        start.elapsed().as_secs_f64()
    }

    #[tokio::test(start_paused = true)]
    async fn paces_to_the_rate() {
        let t = Throttle::new(8); // 1 MB/s
        let start = Instant::now();
        for _ in 0..20 {
            t.take(100_000).await;
        }
        let took = since(start);
        assert!((1.9..=2.1).contains(&took), "2 MB at 1 MB/s took {took} s");
    }

    /// 50 MiB at 100 Mbit/s, in the agent's 64 KiB blocks, takes the
    /// 4.194 s the rate allows: the bucket starts empty, so nothing runs
    /// ahead, and nothing is lost to rounding.
    #[tokio::test(start_paused = true)]
    async fn fifty_mib_at_100_mbps_takes_what_the_rate_allows() {
        let t = Throttle::new(100);
        let start = Instant::now();
        for _ in 0..(50 << 20) / (64 << 10) {
            t.take(64 << 10).await;
        }
        let expected = f64::from(50u32 << 20) * 8.0 / 100e6;
        let took = since(start);
        assert!(
            (took - expected).abs() < 0.001,
            "took {took} s; expected {expected} s"
        );
    }

    /// Several streams sharing one bucket get the rate between them, not
    /// each.
    #[tokio::test(start_paused = true)]
    async fn streams_share_the_rate() {
        let t = Arc::new(Throttle::new(80)); // 10 MB/s
        let start = Instant::now();
        let streams: Vec<_> = (0..4)
            .map(|_| {
                let t = Arc::clone(&t);
                tokio::spawn(async move {
                    for _ in 0..50 {
                        t.take(100_000).await; // 5 MB per stream
                    }
                })
            })
            .collect();
        for s in streams {
            s.await.unwrap();
        }
        let took = since(start);
        assert!(
            (took - 2.0).abs() < 0.001,
            "4 x 5 MB at 10 MB/s took {took} s"
        );
    }

    /// An idle bucket fills only up to the burst (at least 64 KiB): that
    /// much goes at once, the rest at the rate.
    #[tokio::test(start_paused = true)]
    async fn an_idle_bucket_holds_one_burst() {
        let t = Throttle::new(8); // 1 MB/s: the burst is the 64 KiB floor
        tokio::time::advance(Duration::from_secs(10)).await;
        let start = Instant::now();
        t.take(64 << 10).await;
        assert_eq!(since(start), 0.0, "the burst waited");
        t.take(1_000_000).await;
        let took = since(start);
        assert!(
            (took - 1.0).abs() < 0.001,
            "1 MB after the burst took {took} s"
        );
    }
}
