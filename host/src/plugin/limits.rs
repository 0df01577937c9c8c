//! Per-call resource limits that remember whether they were hit, so a memory bomb is reported as such rather
//! than as a generic trap.

use wasmtime::{ResourceLimiter, StoreLimits, StoreLimitsBuilder};

/// Memory and table limits of one plugin call.
pub struct CallLimiter {
    inner: StoreLimits,
    memory_limit: usize,
    /// Set when the guest asked for more memory than its cap.
    pub(super) memory_exceeded: bool,
    /// The most linear memory the call's instance held (bytes, all memories' largest).
    pub(super) peak: usize,
}

impl CallLimiter {
    /// Limits for one call: `memory_limit` bytes of linear memory per memory; growing beyond traps.
    pub fn new(memory_limit: usize) -> Self {
        let inner = StoreLimitsBuilder::new()
            .memory_size(memory_limit)
            // Function tables of real plugins hold thousands of entries, not millions.
            .table_elements(1 << 20)
            .trap_on_grow_failure(true)
            .build();
        Self { inner, memory_limit, memory_exceeded: false, peak: 0 }
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
        } else {
            self.peak = self.peak.max(desired);
        }
        self.inner.memory_growing(current, desired, maximum)
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
