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
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn paces_to_the_rate() {
        let t = Throttle::new(8); // 1 MB/s
        let start = tokio::time::Instant::now();
        for _ in 0..20 {
            t.take(100_000).await;
        }
        let took = start.elapsed().as_secs_f64();
        assert!((1.9..=2.1).contains(&took), "2 MB at 1 MB/s took {took} s");
    }
}
