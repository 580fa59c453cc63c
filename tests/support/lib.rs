//! Shared helpers of the end-to-end tests and benchmarks (the root package's
//! library): sample data, receiver and agent processes, and waiting on
//! conditions with deadlines.
