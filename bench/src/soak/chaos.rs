//! Redis chaos: outages of the certificate store at random intervals, each ended by a restart from its RDB file.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::redis_server::Redis;
use crate::state::{Ctx, Rng};

/// Kills Redis (after SAVE) every `every` seconds (±20 %), keeps it down, restarts it from its RDB file.
pub async fn chaos(
    mut ctx: Ctx,
    mut redis: Redis,
    every: f64,
    (down_min, down_max): (f64, f64),
    seed: u64,
) -> Result<Redis> {
    let mut rng = Rng::new(seed);
    let shared = ctx.shared.clone();
    let mut wait = every / 2.0 * rng.between(0.8, 1.2);
    while ctx.pause(Duration::from_secs_f64(wait)).await {
        let down = rng.between(down_min, down_max);
        // An outage that cannot end before the deadline is not started.
        if Instant::now() + Duration::from_secs_f64(down + 10.0) > shared.deadline {
            break;
        }
        let guard = tokio::select! {
            guard = shared.redis_lock.lock() => guard,
            _ = ctx.stop.wait_for(|s| *s) => break,
        };
        redis.save_and_kill().await?;
        shared.redis_up.store(false, Relaxed);
        shared.event("redis_down", &format!("planned {down:.0}s"));
        let finished = ctx.pause(Duration::from_secs_f64(down)).await;
        redis.start().await?;
        shared.redis_up.store(true, Relaxed);
        shared.event("redis_up", "");
        drop(guard);
        if !finished {
            break;
        }
        wait = every * rng.between(0.8, 1.2);
    }
    // Redis lives until the end of the soak.
    let _ = ctx.stop.wait_for(|s| *s).await;
    Ok(redis)
}
