//! The Pebble harness lives in `tern-fixtures` (fixtures/src/pebble.rs), shared with the ACME benchmark.

pub use tern_fixtures::pebble::*;
