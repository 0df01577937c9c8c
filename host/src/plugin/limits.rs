//! Per-call resource limits that remember whether they were hit, so a memory bomb is reported as such rather
//! than as a generic trap; and the process-wide budget that all running instances' linear memory is drawn from.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use wasmtime::{ResourceLimiter, StoreLimits, StoreLimitsBuilder};

/// Linear memory of every plugin instance running at once, summed over all plugins: a per-instance cap times
/// the concurrency caps would allow gigabytes (64 MiB x 64 calls per plugin by default), so instances draw what
/// they grow from this shared budget and a growth past it traps that one call.
#[derive(Debug)]
pub struct MemoryBudget {
    limit: usize,
    used: AtomicUsize,
}

impl MemoryBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self { limit, used: AtomicUsize::new(0) })
    }

    /// Bytes in use by running instances.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// The budget.
    pub fn limit(&self) -> usize {
        self.limit
    }

    fn reserve(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|&total| total <= self.limit)
            })
            .is_ok()
    }

    fn release(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// Memory and table limits of one plugin call.
pub struct CallLimiter {
    inner: StoreLimits,
    memory_limit: usize,
    budget: Arc<MemoryBudget>,
    /// Bytes this call holds of the budget (given back on drop).
    reserved: usize,
    /// Set when the guest asked for more memory than its cap.
    pub(super) memory_exceeded: bool,
    /// Set when growing would have exceeded the process-wide budget.
    pub(super) budget_exceeded: bool,
    /// The most linear memory the call's instance held (bytes, all memories' largest).
    pub(super) peak: usize,
}

impl CallLimiter {
    /// Limits for one call: `memory_limit` bytes of linear memory per memory; growing beyond traps.
    pub fn new(memory_limit: usize, budget: Arc<MemoryBudget>) -> Self {
        let inner = StoreLimitsBuilder::new()
            .memory_size(memory_limit)
            // Function tables of real plugins hold thousands of entries, not millions.
            .table_elements(1 << 20)
            .trap_on_grow_failure(true)
            .build();
        Self { inner, memory_limit, budget, reserved: 0, memory_exceeded: false, budget_exceeded: false, peak: 0 }
    }

    /// The cap this limiter enforces.
    pub fn memory_limit(&self) -> usize {
        self.memory_limit
    }
}

impl ResourceLimiter for CallLimiter {
    fn memory_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.memory_limit {
            self.memory_exceeded = true;
            return self.inner.memory_growing(current, desired, maximum);
        }
        let allowed = self.inner.memory_growing(current, desired, maximum)?;
        if !allowed {
            return Ok(false);
        }
        let growth = desired.saturating_sub(current);
        if !self.budget.reserve(growth) {
            self.budget_exceeded = true;
            // Same as a cap hit: the grow fails and, with trap_on_grow_failure, traps the call.
            return Err(wasmtime::format_err!("process-wide plugin memory budget exhausted"));
        }
        self.reserved += growth;
        self.peak = self.peak.max(desired);
        Ok(true)
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.inner.memory_grow_failed(error)
    }

    fn table_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        self.inner.table_growing(current, desired, maximum)
    }

    fn instances(&self) -> usize {
        self.inner.instances()
    }

    fn tables(&self) -> usize {
        self.inner.tables()
    }

    fn memories(&self) -> usize {
        self.inner.memories()
    }
}

impl Drop for CallLimiter {
    fn drop(&mut self) {
        self.budget.release(self.reserved);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_share_the_budget_and_give_it_back() {
        let budget = MemoryBudget::new(10 << 20);
        let mut a = CallLimiter::new(8 << 20, budget.clone());
        let mut b = CallLimiter::new(8 << 20, budget.clone());
        assert!(a.memory_growing(0, 6 << 20, None).unwrap());
        assert!(b.memory_growing(0, 6 << 20, None).is_err(), "6 + 6 MiB exceeds the 10 MiB budget");
        assert!(b.budget_exceeded && !b.memory_exceeded);
        assert!(b.memory_growing(0, 4 << 20, None).unwrap());
        assert_eq!(budget.used(), 10 << 20);
        drop(a);
        assert_eq!(budget.used(), 4 << 20);
        drop(b);
        assert_eq!(budget.used(), 0);
    }
}
