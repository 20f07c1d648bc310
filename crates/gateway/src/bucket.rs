//! A token bucket: what a connection may do per second, after a burst.

use std::time::Duration;

use tokio::time::Instant;

/// `capacity` tokens at most, refilled at `per_second`. Single precision: every
/// connection and user holds a few of these, and a count of tokens needs no more.
#[derive(Debug, Clone)]
pub struct Bucket {
    tokens: f32,
    capacity: f32,
    per_second: f32,
    refilled: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn new(capacity: u32, per_second: f64) -> Self {
        #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
        let (capacity, per_second) = (capacity as f32, per_second as f32);
        Self {
            tokens: capacity,
            capacity,
            per_second,
            refilled: Instant::now(),
        }
    }

    fn refill(&self, now: Instant) -> f64 {
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        (f64::from(self.tokens) + elapsed * f64::from(self.per_second))
            .min(f64::from(self.capacity))
    }

    /// Whether the bucket has refilled to its capacity.
    pub fn is_full(&self) -> bool {
        self.refill(Instant::now()) >= f64::from(self.capacity)
    }

    /// Takes `n` tokens if there are that many; else says how long until there would
    /// be (and takes none). More than the capacity can never be taken.
    pub fn take(&mut self, n: u32) -> Result<(), Duration> {
        let now = Instant::now();
        let tokens = self.refill(now);
        self.refilled = now;
        let wanted = f64::from(n);
        let (left, result) = if tokens >= wanted {
            (tokens - wanted, Ok(()))
        } else if wanted > f64::from(self.capacity) {
            (tokens, Err(Duration::MAX))
        } else {
            let wait = (wanted - tokens) / f64::from(self.per_second);
            (tokens, Err(Duration::from_secs_f64(wait)))
        };
        #[allow(clippy::cast_possible_truncation)]
        {
            self.tokens = left as f32;
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_then_the_rate() {
        let mut bucket = Bucket::new(3, 2.0);
        for _ in 0..3 {
            assert!(bucket.take(1).is_ok());
        }
        let wait = bucket.take(1).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(bucket.take(1).is_ok());
        assert!(bucket.take(4).unwrap_err() == Duration::MAX);
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(bucket.take(3).is_ok(), "refilled to the capacity, no more");
        assert!(bucket.take(1).is_err());
    }
}
