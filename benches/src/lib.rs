//! Criterion benchmarks of each service core live in `benches/`; this library is empty.
